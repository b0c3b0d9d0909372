"""`phijax sweep plan|run|work|status|render SWEEP.yaml`: the command line of phijax.sweep."""
from __future__ import annotations

from pathlib import Path

from phijax.errors import ConfigError, UserError

LAUNCHERS = ("slurm", "k8s-job", "jobset", "tpu-vm", "xpk", "skypilot", "local")


def _load(path: str):
    from phijax.sweep.spec import expand, load_sweep

    spec = load_sweep(path)
    return spec, expand(spec, path)


def _options(args):
    from phijax.sweep.runner import WorkOptions

    if args.max_attempts < 1 or args.stale_after <= 0:
        raise ConfigError("--max-attempts must be at least 1 and --stale-after positive")
    if args.heartbeat is not None and not 0 < args.heartbeat < args.stale_after:
        raise ConfigError(f"--heartbeat {args.heartbeat:g}: must be positive and below "
                          f"--stale-after {args.stale_after:g}")
    return WorkOptions(stale_after=args.stale_after, heartbeat=args.heartbeat,
                       max_attempts=args.max_attempts, poll=args.poll, wait=args.wait,
                       retry_failed=args.retry_failed,
                       coordinator=getattr(args, "coordinator", None),
                       num_processes=getattr(args, "num_processes", None),
                       process_id=getattr(args, "process_id", None))


def _plan(args) -> int:
    from phijax.sweep.report import format_plan
    from phijax.sweep.runner import check_cells

    spec, cells = _load(args.sweep)
    check_cells(spec, cells)
    print(format_plan(spec, cells, args.stale_after))
    return 0


def _run(args) -> int:
    from phijax.sweep.report import format_status
    from phijax.sweep.runner import run_local

    spec, cells = _load(args.sweep)
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    code = run_local(args.sweep, spec, cells, _options(args), args.workers)
    print(format_status(spec, cells, args.stale_after))
    return code


def _work(args) -> int:
    from phijax.sweep.runner import work

    spec, cells = _load(args.sweep)
    return work(spec, cells, _options(args))


def _status(args) -> int:
    import tempfile

    from phijax import paths
    from phijax.sweep.report import format_status, plot

    spec, cells = _load(args.sweep)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.axis and not any(args.axis in c.values for c in cells):
        raise ConfigError(f"--axis {args.axis}: not a grid, zip or seed key of the sweep")
    print(format_status(spec, cells, args.stale_after, metrics))
    target = paths.as_path(spec.root) / spec.name / "sweep.png" if args.plot is None \
        else args.plot
    if target and paths.is_url(target):  # drawn here, uploaded whole
        with tempfile.TemporaryDirectory() as folder:
            paths.upload(plot(spec, cells, Path(folder) / "sweep.png", args.axis, args.metric),
                         target)
        print(f"plot: {target}")
    elif target:
        print(f"plot: {plot(spec, cells, target, args.axis, args.metric)}")
    return 0


def _work_command(args) -> list[str]:
    """`phijax sweep work SWEEP` with the worker options given to `render`."""
    argv = ["phijax", "sweep", "work", args.sweep]
    for flag, value, default in (("--stale-after", args.stale_after, 600.0),
                                 ("--max-attempts", args.max_attempts, 3),
                                 ("--heartbeat", args.heartbeat, None),
                                 ("--poll", args.poll, 10.0)):
        if value != default:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv + ([] if args.wait else ["--no-wait"]) + \
        (["--retry-failed"] if args.retry_failed else [])


def _render(args) -> int:
    import re
    import sys

    from phijax.config import load

    try:
        from phijax.launch.render import render
        from phijax.launch.spec import LaunchSpec
    except ImportError as e:
        raise UserError(f"phijax sweep render needs phijax.launch ({e}); start `phijax sweep "
                        f"work {args.sweep}` on each worker yourself") from None
    spec, _ = _load(args.sweep)  # every cell checked before anything is rendered
    name = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:40].rstrip("-")
    raw = {"name": name if re.match(r"[a-z]", name) else f"sweep-{name}"[:40],
           "target": args.launcher, "workers": args.workers, "command": _work_command(args)}
    launch = load(LaunchSpec, raw=raw, overrides=args.overrides)
    files = render(launch)
    root = Path(spec.root)
    if args.launcher != "local" and not root.is_absolute() and "://" not in spec.root:
        print(f"phijax sweep render: warning: root {spec.root} is relative: every worker "
              f"resolves it in its own working directory; the workers must share it",
              file=sys.stderr)
    if args.out:
        from phijax.launch.submit import write
        write(files, args.out)
    for f in files:
        sys.stdout.write(f.text)
    return 0


def _worker_options(s, stale_only: bool = False) -> None:
    s.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/tiny-lr-batch.yaml")
    s.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                   help="a running cell whose heartbeat is older than this is taken over "
                   "(default 600)")
    if stale_only:
        return
    s.add_argument("--max-attempts", type=int, default=3,
                   help="failed runs of a cell before giving up on it (default 3)")
    s.add_argument("--heartbeat", type=float, metavar="SECONDS",
                   help="seconds between heartbeats (default stale-after / 4, at most 60)")
    s.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between looks while other workers run the last cells "
                   "(default 10)")
    s.add_argument("--no-wait", dest="wait", action="store_false",
                   help="exit once no cell can be claimed, instead of waiting for the cells "
                   "other workers run (to take them over if their heartbeat stops)")
    s.add_argument("--retry-failed", action="store_true",
                   help="cells that failed out of attempts start over")


def add_sweep_commands(sub) -> None:
    sweep = sub.add_parser("sweep", help="grids of training runs: hashed cells, a claim loop "
                           "for any number of workers, status table and plot")
    sweep = sweep.add_subparsers(dest="sub", required=True)
    s = sweep.add_parser("plan", help="the cells, their hashes and states (runs nothing)")
    _worker_options(s, stale_only=True)
    s.set_defaults(fn=_plan)
    s = sweep.add_parser("run", help="run the sweep's cells here, or in --workers local processes")
    _worker_options(s)
    s.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    s.set_defaults(fn=_run)
    s = sweep.add_parser("work", help="claim and run cells until none is left: start any number "
                         "of these, on any machines sharing the sweep's root")
    _worker_options(s)
    s.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host worker: process 0's "
                   "address for agreeing on cells (default JAX_COORDINATOR_ADDRESS's port + 1)")
    s.add_argument("--num-processes", type=int, help="default JAX_NUM_PROCESSES, else 1")
    s.add_argument("--process-id", type=int, help="default JAX_PROCESS_ID, else 0")
    s.set_defaults(fn=_work)
    s = sweep.add_parser("status", help="each cell's state and final metrics; a PNG of loss "
                         "curves and a metric over a grid axis")
    _worker_options(s, stale_only=True)
    s.add_argument("--metrics", help="comma-separated columns (default: the sweep's metrics "
                   "and every benchmark score logged)")
    s.add_argument("--plot", help="PNG to write (default ROOT/NAME/sweep.png; '' for none)")
    s.add_argument("--axis", help="grid key for the plot's x axis (default the first)")
    s.add_argument("--metric", help="metric plotted over the axis (default eval_loss, else loss)")
    s.set_defaults(fn=_status)
    s = sweep.add_parser("render", help="a launcher's job whose workers each run `phijax "
                         "sweep work SWEEP` (an array job: SLURM array, Job parallelism...)")
    _worker_options(s)
    s.add_argument("--launcher", required=True, choices=LAUNCHERS)
    s.add_argument("--workers", type=int, default=1, help="independent workers (array size)")
    s.add_argument("--out", help="also write the rendered files into this folder")
    s.add_argument("overrides", nargs="*", help="launch settings as `phijax launch` names them, "
                   "e.g. nodes=1 gpus_per_node=8 partition=gpu, topology=v5p-8 image=IMAGE")
    s.set_defaults(fn=_render)
