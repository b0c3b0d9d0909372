from phijax.cli import main

if __name__ == "__main__":  # worker processes may import this module; they must not rerun the CLI
    raise SystemExit(main())
