"""`phijax plan CONFIG --topology T`: the command around `make_plan` and `search`."""
from __future__ import annotations

import json
import logging

from phijax.config import load_config
from phijax.errors import ConfigError
from phijax.files import atomic_write
from phijax.plan import compile as steps
from phijax.plan.chips import parse_bytes, parse_topology

log = logging.getLogger("phijax.plan")


def _plan(args, cfg, topo, hbm):
    from phijax.plan.build import make_plan
    from phijax.plan.report import format_plan
    from phijax.plan.search import parse_axes, search

    if args.search:
        axes = parse_axes(args.search)
        print(f"searching {', '.join(axes)} for {args.config} on {topo.name} "
              f"({100 * args.headroom:.0f}% headroom)")
        plan = search(cfg, topo, args.config, axes, headroom=args.headroom, hbm=hbm,
                      tokens=args.tokens, devices=steps.devices_for(topo))
        t = plan["train"]
        print(f"best: mesh {'x'.join(str(v) for v in plan['mesh'].values())} remat {t['remat']} "
              f"microbatches {t['microbatches']}\n")
    else:
        plan = make_plan(cfg, topo, args.config, hbm=hbm, tokens=args.tokens)
    print(format_plan(plan))
    headroom = plan["memory"].get("headroom")
    if headroom is not None and headroom < args.headroom:
        print(f"tight: {100 * headroom:.1f}% headroom, under the {100 * args.headroom:.0f}% "
              f"asked (--headroom)")
    return plan


def run(args) -> int:
    topo = parse_topology(args.topology)
    steps.prepare_environment(topo)  # before anything imports JAX
    if topo.kind == "tpu" and not steps.has_libtpu():
        raise ConfigError(f"phijax plan --topology {topo.name} needs libtpu: {steps.LIBTPU_HINT}")
    if not 0 <= args.headroom < 1:
        raise ConfigError(f"--headroom {args.headroom}: expected a fraction in [0, 1)")
    cfg = load_config(args.config, args.overrides)
    hbm = parse_bytes(args.hbm) if args.hbm else None
    plan = _plan(args, cfg, topo, hbm)
    if args.out:
        atomic_write(args.out, json.dumps(plan, indent=2) + "\n")
        print(f"plan: {args.out}")
    return 0
