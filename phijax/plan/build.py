"""One plan: a config's step (train, sft, dpo, decode) on a topology, as memory, compute,
collectives and cost."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

from phijax.config import Config
from phijax.plan import compile as steps
from phijax.plan import hlo, programs, report
from phijax.plan.chips import Topology
from phijax.train.metrics import device_peak


@functools.lru_cache(maxsize=4)
def _compiler_hbm(libtpu_name: str, devices: tuple) -> Optional[float]:
    return steps.compiler_hbm(list(devices))


def _budget(topo: Topology, hbm: Optional[float], devices) -> Optional[float]:
    """Bytes a device may use: --hbm, else what the TPU compiler says a device has (else the
    chip table's figure), else (CPU) host memory / devices."""
    if hbm:
        return hbm
    if topo.kind == "tpu":
        return _compiler_hbm(topo.libtpu_name, tuple(devices)) or topo.chip.hbm_bytes
    if topo.chip.hbm_bytes:
        return topo.chip.hbm_bytes
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / topo.devices
    except (ValueError, OSError):
        return None


def _header(cfg: Config, topo: Topology, what: str, step: str, program) -> dict:
    return {"config": what, "step": step, "topology": topo.name, "kind": topo.kind,
            "chip": topo.chip.name, "devices": topo.devices, "chips": topo.chips,
            "libtpu_topology": topo.libtpu_name,
            "mesh": {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor},
            "decode" if step == "decode" else "train": program.shape,
            "analytic": topo.kind == "gpu", "notes": []}


def _xla_costs(compiled) -> dict:
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs or {}
    return {"xla_flops": float(costs.get("flops", 0.0)),
            "xla_bytes_accessed": float(costs.get("bytes accessed", 0.0))}


def _compiled_fields(plan: dict, compiled, mesh, topo: Topology, budget) -> float:
    """Memory, XLA costs and collectives of a compiled step into `plan`; returns the bytes each
    device sends in collectives per step."""
    plan["memory"].update(report.memory_fields(compiled))
    analysis = hlo.analyze(compiled.as_text(), dict(mesh.shape), topo.devices)
    compute = plan["compute"]
    compute.update(_xla_costs(compiled), loop_factor=analysis["loop_factor"])
    compute["hbm_bytes_per_device"] = compute["xla_bytes_accessed"] * analysis["loop_factor"]
    compute["custom_calls"] = analysis["custom_calls"]
    plan["collectives"] = analysis["collectives"]
    if analysis["loops_of_unknown_length"]:
        plan["notes"].append(f"{analysis['loops_of_unknown_length']} loop(s) of unknown length "
                             "counted once in HBM traffic and collectives")
    if budget:
        m = plan["memory"]
        m["hbm_bytes"] = budget
        m["headroom"] = 1 - m["peak_bytes"] / budget
    return sum(r["wire_bytes"] for r in analysis["collectives"])


# The host's peak, measured once per process (a search plans many candidates).
_device_peak = functools.lru_cache(maxsize=4)(device_peak)


def _with_cpu_peak(cfg: Config, topo: Topology) -> Topology:
    """A CPU device's FLOP/s for the roofline, as training's MFU takes it (train.
    peak_flops_per_device, else measured); its memory and interconnect terms are left out."""
    if topo.kind != "cpu":
        return topo
    peak = _device_peak(cfg.train.peak_flops_per_device)
    return dataclasses.replace(topo, chip=dataclasses.replace(topo.chip, peak_flops=peak))


def _before(program, mesh, topo: Topology, what: str, budget) -> dict:
    """Memory per device of a program run once before the steps (DPO's reference pass)."""
    compiled = steps.compile_step(program.traced, mesh, topo.name, what, program.label)
    out = {**report.state_bytes(program.state), **report.memory_fields(compiled)}
    if budget:
        out["headroom"] = 1 - out["peak_bytes"] / budget
    return out


def make_plan(cfg: Config, topo: Topology, what: str, *, step: str = "train",
              hbm: Optional[float] = None, tokens: Optional[float] = None, devices=None,
              batch: Optional[int] = None, cache_len: Optional[int] = None) -> dict:
    """The plan of `cfg`'s `step` (`phijax.plan.programs`; decode sized by `batch` rows and a
    cache of `cache_len` slots) on `topo` (prepare_environment must have run before JAX
    started). Raises `DoesNotFit` when a program needs more memory per device than the budget."""
    devices = devices if devices is not None else steps.devices_for(topo)
    topo = _with_cpu_peak(cfg, topo)
    mesh, mesh_note = steps.mesh_for(cfg, topo, devices)
    program = programs.build(step, cfg, mesh, batch, cache_len)
    plan = _header(cfg, topo, what, step, program)
    plan["notes"] += [mesh_note] if mesh_note else []
    plan["model"] = report.model_fields(cfg, topo, program.tokens_per_step,
                                        program.flops_per_token)
    plan["memory"] = report.state_bytes(program.state)
    plan["compute"] = {"matmul_flops_per_device": steps.matmul_flops(program.traced.jaxpr.jaxpr)
                       / topo.devices}
    if program.attention_flops:
        plan["compute"]["attention_flops_per_device"] = program.attention_flops / topo.devices
    wire = None
    budget = _budget(topo, hbm, devices)
    if topo.kind == "gpu":
        plan["memory"]["hbm_bytes"] = budget
        plan["notes"].append("roofline from matmul FLOPs alone: no compile, so no HBM traffic "
                             "or collectives")
    else:
        compiled = steps.compile_step(program.traced, mesh, topo.name, what, program.label)
        wire = _compiled_fields(plan, compiled, mesh, topo, budget)
        plan["before"] = {p.label.removeprefix("the "): _before(p, mesh, topo, what, budget)
                          for p in program.before}
    if program.reads_per_step is not None:
        plan["compute"]["hbm_bytes_per_device"] = program.reads_per_step
    plan["roofline"] = report.roofline(topo, plan["model"], plan["compute"], wire)
    plan["cost"] = report.cost(topo, plan["roofline"], tokens)
    if plan["roofline"].get("mfu", 0) > 1:
        plan["notes"].append("an MFU ceiling over 100%: model FLOPs count all of causal "
                             "attention (PaLM's 6N + 12LHQT per token, as the training log's MFU "
                             "does), the step computes only its unmasked blocks")
    _check_fits(plan, what)
    return plan


def _check_fits(plan: dict, what: str) -> None:
    """A step the compiler accepted but whose peak is over the budget (CPU, or --hbm below
    the chip's HBM) does not fit either."""
    for name, m in [("", plan["memory"])] + [(f" ({k})", v)
                                             for k, v in plan.get("before", {}).items()]:
        if m.get("headroom") is not None and m["headroom"] < 0:
            raise steps.DoesNotFit(
                f"{what}{name} does not fit {plan['topology']}: {report._gib(m['peak_bytes'])} "
                f"> {report._gib(plan['memory']['hbm_bytes'])} per device (peak of arguments, "
                f"outputs and temporaries {report._gib(m['temporaries_bytes'])})")
