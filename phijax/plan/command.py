"""`phijax plan CONFIG --topology T [--step train|sft|dpo|decode]`: the command around
`make_plan` and `search`."""
from __future__ import annotations

import json
import logging

from phijax import paths
from phijax.config import load_config
from phijax.errors import ConfigError
from phijax.plan import compile as steps
from phijax.plan.chips import parse_bytes, parse_topology

log = logging.getLogger("phijax.plan")


def _plan(args, cfg, topo, hbm):
    from phijax.plan.build import make_plan
    from phijax.plan.report import format_plan
    from phijax.plan.search import parse_axes, search

    if args.search:
        if args.step == "decode":
            raise ConfigError("--search plans training steps (train, sft, dpo); plan a decode "
                              "step one mesh at a time")
        axes = parse_axes(args.search)
        print(f"searching {', '.join(axes)} for {args.config} ({args.step} step) on {topo.name} "
              f"({100 * args.headroom:.0f}% headroom)")
        plan = search(cfg, topo, args.config, axes, headroom=args.headroom, hbm=hbm,
                      tokens=args.tokens, devices=steps.devices_for(topo), step=args.step)
        t = plan["train"]
        print(f"best: mesh {'x'.join(str(v) for v in plan['mesh'].values())} remat {t['remat']} "
              f"microbatches {t['microbatches']}\n")
    else:
        plan = make_plan(cfg, topo, args.config, step=args.step, hbm=hbm, tokens=args.tokens,
                         batch=args.batch, cache_len=args.cache_len)
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
    for flag, value in (("--batch", args.batch), ("--cache-len", args.cache_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: expected a positive number")
        if value is not None and args.step != "decode":
            raise ConfigError(f"{flag} sizes the decode step (--step decode); training steps "
                              f"take train.batch_size and data.seq_len")
    cfg = load_config(args.config, args.overrides)
    hbm = parse_bytes(args.hbm) if args.hbm else None
    plan = _plan(args, cfg, topo, hbm)
    if args.out:
        paths.write_text(args.out, json.dumps(plan, indent=2) + "\n")
        print(f"plan: {args.out}")
    return 0
