"""`python -m tools run PIPELINE.yaml [--set key=value ...] [--executor local|ray]`."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools", description="phijax data tools")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume a teacher pipeline (tools/pipeline.py)")
    run.add_argument("pipeline", help="pipeline YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="dotted override, e.g. --set shards=8 "
                     "--set teacher.concurrency=16 (repeatable)")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: one process, one async teacher (default); ray: needs ray")
    run.add_argument("--ray-num-cpus", type=int, default=None, metavar="N",
                     help="--executor ray without RAY_ADDRESS: CPUs of the local Ray instance "
                     "(default: all); one shard task per CPU at a time")
    run.add_argument("--retry-failed", action="store_true",
                     help="process seeds recorded in failures.jsonl again")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    run.add_argument("--check", action="store_true",
                     help="validate the pipeline and exit (no network)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if argv is None:  # a real process: SIGTERM saves finished seeds like Ctrl-C does
        import signal

        def _term(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, _term)
    from tools.pipeline import PipelineError, load_pipeline, run_pipeline, run_pipeline_ray
    try:
        if args.executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise PipelineError("ray is not installed; pip install ray") from None
        pipe = load_pipeline(args.pipeline, args.overrides)
        if args.check:
            print(f"ok: {args.pipeline}: {len(pipe.stages)} stages, {pipe.shards} shards, "
                  f"output {pipe.output}")
            return 0
        if args.executor == "ray":
            summary = run_pipeline_ray(pipe, progress=not args.no_progress,
                                       retry_failed=args.retry_failed,
                                       num_cpus=args.ray_num_cpus)
        else:
            summary = asyncio.run(run_pipeline(pipe, progress=not args.no_progress,
                                               retry_failed=args.retry_failed))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished seeds are saved, rerun to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
