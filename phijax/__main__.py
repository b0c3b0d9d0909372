from phijax.cli import main

raise SystemExit(main())
