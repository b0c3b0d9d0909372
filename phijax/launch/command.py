"""`phijax launch TARGET CONFIG [key=value ...]`: the command around `render` and `submit`."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from phijax.config import load
from phijax.errors import ConfigError
from phijax.launch.spec import TARGETS, LaunchSpec

log = logging.getLogger("phijax.launch")

# command-line options that are LaunchSpec fields, under the same names
SPEC_OPTIONS = ("name", "topology", "nodes", "gpus_per_node", "gpu_type", "slices", "workers",
                "max_restarts", "image", "venv", "port", "project", "zone", "cluster",
                "namespace", "partition", "time", "bucket")


def add_parser(sub) -> None:
    s = sub.add_parser(
        "launch", help="render a job for a cluster (--dry-run, the default) or submit it with "
        "your own gcloud, xpk, kubectl, sbatch or sky (--submit); local: run it here",
        description="Every host runs `phijax train CONFIG key=value ...`.")
    s.add_argument("target", help=", ".join(TARGETS))
    s.add_argument("config", help="training config every host trains (it must be readable "
                   "there too, at the same path)")
    s.add_argument("overrides", nargs="*", help="dotted overrides passed to every host")
    s.add_argument("--name", required=True, help="job name: lowercase letters, digits and '-'")
    hw = s.add_argument_group("hardware (one of)")
    hw.add_argument("--topology", help="a TPU slice as phijax plan names it (v5p-128, v6e-16, "
                    "v5e-16, v4-32), h100xN or h200xN")
    hw.add_argument("--nodes", type=int, help="GPU or CPU nodes ...")
    hw.add_argument("--gpus-per-node", type=int, help="... with this many GPUs each (default 0: "
                    "CPU nodes)")
    hw.add_argument("--gpu-type", help="SkyPilot's name for the GPUs (default H100)")
    s.add_argument("--image", help="container image with phijax installed (xpk, jobset, "
                   "k8s-job need one)")
    s.add_argument("--venv", help="or: virtual environment holding phijax, at this path on "
                   "every host")
    s.add_argument("--slices", type=int, help="TPU slices joined over the data-center network")
    s.add_argument("--workers", type=int, help="independent copies of the job (default 1)")
    s.add_argument("--max-restarts", type=int, help="restarts after a failure (default 3); "
                   "exit 42, preempted after a checkpoint, restarts without counting")
    s.add_argument("--port", type=int, help="JAX coordinator port (default 8476)")
    where = s.add_argument_group("where it runs")
    where.add_argument("--project", help="Google Cloud project (tpu-vm, xpk)")
    where.add_argument("--zone", help="Google Cloud zone (tpu-vm, xpk, skypilot)")
    where.add_argument("--cluster", help="xpk cluster")
    where.add_argument("--namespace", help="Kubernetes namespace (jobset, k8s-job)")
    where.add_argument("--partition", help="SLURM partition")
    where.add_argument("--time", help="SLURM time limit, e.g. 24:00:00")
    where.add_argument("--bucket", help="gs://BUCKET or s3://BUCKET: run.dir defaults to "
                       "BUCKET/runs/NAME, one run every host writes (a run.dir=... override "
                       "wins); the hosts of a TPU slice share no file system")
    s.add_argument("--out", help="also write the rendered files into this folder")
    s.add_argument("--dry-run", action="store_true",
                   help="print what --submit would submit or run (the default)")
    s.add_argument("--submit", action="store_true", help="submit it (local: run it and wait)")
    s.set_defaults(fn=run)


def spec_from_args(args: argparse.Namespace) -> LaunchSpec:
    raw = {key: getattr(args, key) for key in SPEC_OPTIONS if getattr(args, key) is not None}
    raw.update(target=args.target,
               command=["phijax", "train", args.config, *args.overrides])
    return load(LaunchSpec, raw=raw)


def run(args: argparse.Namespace) -> int:
    from phijax.launch.render import render
    from phijax.launch.spec import check_training
    from phijax.launch.submit import submit, submit_commands, write

    if args.dry_run and args.submit:
        raise ConfigError("give --dry-run or --submit, not both")
    spec = spec_from_args(args)
    warnings = check_training(spec)
    files = render(spec)
    for warning in warnings:
        log.warning(warning)
    if args.submit:
        return submit(spec, args.out)
    if args.out:
        write(files, args.out)
    for f in files:
        sys.stdout.write(f.text)
    folder = Path(args.out or ".")
    commands = [shlex.join(argv) for f in files for argv in submit_commands(spec, folder / f.name)]
    print("phijax launch: --submit runs " + ("; ".join(commands) if commands else
          "these processes here and waits for them"), file=sys.stderr)
    return 0
