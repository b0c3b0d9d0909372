"""phijax-experiment: the shipped reproductions, one command each.

    pts-arith   PTS-DPO against sequence DPO on arithmetic word problems (CONFIG [key=value ...])
    arith-data  write the arithmetic task's train / held-out / validation / PTS files
    mixture     pre-training mixture arms at equal tokens on a toy world: reasoning vs knowledge
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


def _mixture(args) -> int:
    from experiments.mixture.run import MixtureExperiment, format_table, run

    for flag in ("seeds", "steps", "people", "knowledge", "reasoning", "share_seeds"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, "
                              f"got {getattr(args, flag)}")
    for o in args.set:
        if "=" not in o:
            raise ConfigError(f"--set {o}: expected KEY=VALUE")
    sweeps = ["configs/sweeps/mixture-arms.yaml"] + \
        (["configs/sweeps/mixture-shares.yaml"] if args.shares else [])
    cfg = MixtureExperiment(out=args.out, world_seed=args.world_seed, people=args.people,
                            towns=max(4, args.people // 15),
                            seeds=args.seeds, steps=args.steps, overrides=args.set,
                            share_seeds=args.share_seeds,
                            knowledge=args.knowledge, reasoning=args.reasoning, sweeps=sweeps,
                            error_rate=args.error_rate, max_new_tokens=args.max_new_tokens)
    results = run(cfg)
    for name, rows in results["tables"].items():
        print(f"{name}:\n{format_table(rows)}")
    print(json.dumps({"out": args.out, "tables": results["tables"],
                      "seconds": results["seconds"]}))
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
    s = sub.add_parser("mixture", help="web / synthetic / web-rewrite / phi-4 mixture arms at "
                       "equal tokens on a toy world (world -> teacher pipelines -> stores -> "
                       "sweep -> eval -> table); rerun to resume")
    s.add_argument("--out", default="runs/mixture", help="output directory")
    s.add_argument("--seeds", type=int, default=3, help="training seeds per arm")
    s.add_argument("--share-seeds", type=int, help="with --shares: seeds per share (default: "
                   "--seeds)")
    s.add_argument("--steps", type=int, default=500, help="training steps of every cell")
    s.add_argument("--shares", action="store_true",
                   help="also sweep the synthetic share 0..0.8, the rest web")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training key for every cell, e.g. train.batch_size=8 (repeatable)")
    s.add_argument("--world-seed", type=int, default=0)
    s.add_argument("--people", type=int, default=300,
                   help="people in the toy world (towns: one per 15 people, at least 4)")
    s.add_argument("--knowledge", type=int, default=200, help="held-out knowledge questions")
    s.add_argument("--reasoning", type=int, default=200, help="held-out reasoning questions")
    s.add_argument("--error-rate", type=float, default=0.1, help="the scripted teacher's")
    s.add_argument("--max-new-tokens", type=int, default=96,
                   help="per reasoning answer (knowledge answers: at most 16)")
    s.set_defaults(fn=_mixture)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
