"""phijax-experiment: the shipped reproductions, one command each.

    pts-arith   PTS-DPO against sequence DPO on arithmetic word problems (CONFIG [key=value ...])
    arith-data  write the arithmetic task's train / held-out / validation / PTS files
"""
from __future__ import annotations

import argparse
import json
import sys

from phijax.cli import run_main
from phijax.errors import ConfigError


def _pts_arith(args) -> int:
    from experiments.pts_arith.run import format_table, load_experiment, run, summary

    cfg = load_experiment(args.config, args.overrides)
    results = run(cfg)
    print(format_table(results, cfg))
    print(json.dumps(summary(results, cfg)))
    return 0


def _arith_data(args) -> int:
    from experiments.pts_arith.arith import write_task

    for flag in ("train", "heldout", "valid", "pts"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.max_number < 4:
        raise ConfigError(f"--max-number must be at least 4, got {args.max_number}")
    counts = write_task(args.out, args.train, args.heldout, args.pts, args.seed, args.max_number,
                        valid=args.valid)
    print(json.dumps({"out": str(args.out), **counts, "seed": args.seed,
                      "max_number": args.max_number}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from experiments.pts_arith.arith import MAX_NUMBER

    p = argparse.ArgumentParser(prog="phijax-experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pts-arith", help="PTS-DPO against sequence DPO (data -> base -> pairs "
                       "-> DPO -> held-out accuracy); rerun to resume")
    s.add_argument("config", help="experiment YAML, e.g. configs/experiments/pts-arith.yaml")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. out=runs/x pts.rollouts=16")
    s.set_defaults(fn=_pts_arith)
    s = sub.add_parser("arith-data", help="write the arithmetic task (JSONL files)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, default=20000, help="training chats")
    s.add_argument("--heldout", type=int, default=500, help="held-out-template questions")
    s.add_argument("--valid", type=int, default=0,
                   help="more held-out-template questions, none a held-out one")
    s.add_argument("--pts", type=int, default=1000,
                   help="train-template questions with fresh numbers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-number", type=int, default=MAX_NUMBER,
                   help="largest starting amount or addition")
    s.set_defaults(fn=_arith_data)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
