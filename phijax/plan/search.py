"""`phijax plan --search`: the fastest roofline that fits, over microbatches, remat policies and
mesh shapes.

For each mesh shape and remat policy, microbatches are tried from the fewest up and the first
that fits (with the asked headroom) is kept: more microbatches only lower memory and add
weight traffic. Every candidate passed over is printed with its reason.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Callable, Optional

from phijax.config import Config, ModelConfig, validate
from phijax.errors import ConfigError
from phijax.plan.build import make_plan
from phijax.plan.chips import Topology
from phijax.plan.compile import DoesNotFit
from phijax.plan.report import _gib

log = logging.getLogger("phijax.plan")
AXES = ("mesh", "remat", "microbatches")


def parse_axes(text: str) -> tuple[str, ...]:
    axes = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise ConfigError(f"--search {text}: expected a comma-separated subset of {','.join(AXES)}")
    return axes


def mesh_shapes(devices: int) -> list[tuple[int, int, int]]:
    """Every data x fsdp x tensor with product `devices`, most fsdp first."""
    shapes = [(d, f, devices // (d * f)) for d in range(1, devices + 1) if devices % d == 0
              for f in range(1, devices // d + 1) if (devices // d) % f == 0]
    return sorted(shapes, key=lambda s: (-s[1], s[2], s[0]))


def _remats() -> tuple[str, ...]:
    field = next(f for f in dataclasses.fields(ModelConfig) if f.name == "remat")
    return tuple(field.metadata["choices"])


def microbatch_counts(batch_size: int, data_parallel: int) -> list[int]:
    """Microbatch counts that keep every microbatch divisible over the data-parallel devices:
    the divisors of batch_size / data_parallel (just 1 where that does not divide)."""
    rows, rest = divmod(batch_size, data_parallel)
    return [m for m in range(1, rows + 1) if rows % m == 0] if rows and not rest else [1]


def candidates(cfg: Config, topo: Topology, axes: tuple[str, ...]):
    """(mesh shape, remat, microbatch counts in increasing order)."""
    meshes = mesh_shapes(topo.devices) if "mesh" in axes else [cfg.mesh.shape]
    remats = _remats() if "remat" in axes else (cfg.model.remat,)
    for mesh, remat in itertools.product(meshes, remats):
        micro = microbatch_counts(cfg.train.batch_size, mesh[0] * mesh[1]) \
            if "microbatches" in axes else [cfg.train.microbatches]
        yield mesh, remat, micro


def variant(cfg: Config, mesh, remat: str, microbatches: int) -> Config:
    return dataclasses.replace(
        cfg, mesh=dataclasses.replace(cfg.mesh, data=mesh[0], fsdp=mesh[1], tensor=mesh[2]),
        model=dataclasses.replace(cfg.model, remat=remat),
        train=dataclasses.replace(cfg.train, microbatches=microbatches))


def _label(mesh, remat: str, micro: int) -> str:
    return f"mesh {'x'.join(map(str, mesh))} remat {remat} microbatches {micro}"


def _try(cfg: Config, topo: Topology, what: str, headroom: float, hbm, tokens, devices,
         step: str):
    """(plan or None, why not)."""
    try:
        validate(cfg, topo.devices)
    except ConfigError as e:
        return None, f"shape: {e}"
    try:
        plan = make_plan(cfg, topo, what, step=step, hbm=hbm, tokens=tokens, devices=devices)
    except DoesNotFit as e:
        return None, "out of memory: " + str(e).split(": ", 1)[-1]
    m = plan["memory"]
    if m.get("headroom") is not None and m["headroom"] < headroom:
        return None, (f"over the headroom: peak {_gib(m['peak_bytes'])} leaves "
                      f"{100 * m['headroom']:.1f}% of {_gib(m['hbm_bytes'])}, under "
                      f"{100 * headroom:.0f}%")
    return plan, ""


def search(cfg: Config, topo: Topology, what: str, axes: tuple[str, ...], *, headroom: float,
           hbm: Optional[float], tokens: Optional[float], devices, step: str = "train",
           say: Callable[[str], None] = print) -> dict:
    """The fitting candidate with the shortest roofline step (of `step`: train, sft or dpo);
    its plan gets `search` rows."""
    rows, best = [], None
    for mesh, remat, micros in candidates(cfg, topo, axes):
        for micro in micros:
            plan, why = _try(variant(cfg, mesh, remat, micro), topo, what, headroom, hbm,
                             tokens, devices, step)
            row = {"mesh": list(mesh), "remat": remat, "microbatches": micro}
            if plan is None:
                rows.append({**row, "rejected": why})
                say(f"  rejected  {_label(mesh, remat, micro)}: {why}")
                if why.startswith("shape:"):
                    break  # more microbatches divide no better
                continue
            r = plan["roofline"]
            rows.append({**row, "step_s": r.get("step_s"), "mfu": r.get("mfu"),
                         "peak_bytes": plan["memory"]["peak_bytes"]})
            say(f"  fits      {_label(mesh, remat, micro)}: peak "
                f"{_gib(plan['memory']['peak_bytes'])}, step >= {r['step_s'] * 1e3:.1f} ms, "
                f"MFU ceiling {100 * r['mfu']:.1f}%")
            if best is None or r["step_s"] < best["roofline"]["step_s"]:
                best = plan
            break
    if best is None:
        raise DoesNotFit(f"{what}: no candidate fits {topo.name} with "
                         f"{100 * headroom:.0f}% headroom ({len(rows)} tried)")
    best["search"] = rows
    return best
