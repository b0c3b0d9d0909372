"""A config's programs compiled for a topology's devices without running them.

The programs are the ones the commands run (`phijax.plan.programs`: the train, SFT and DPO
steps, a decode step), on a mesh of the topology's devices, lowered with abstract (shape,
dtype, sharding) arguments. A TPU slice's devices come from libtpu as compile-only devices
(`jax.experimental.topologies`), so a CPU host compiles for any slice; `cpu-N` uses N host
devices.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time

from phijax.config import Config, validate
from phijax.errors import ConfigError
from phijax.plan.chips import Topology

log = logging.getLogger("phijax.plan")

LIBTPU_HINT = 'pip install -e ".[tpu-plan]"'


class DoesNotFit(ConfigError):
    """The program needs more memory per device than the topology's chips have."""


def prepare_environment(topo: Topology) -> None:
    """Before JAX starts: no TPU metadata lookups (and the accelerator type and workers libtpu
    would otherwise look for and warn about), the CPU platform for the host's own devices, and
    N host devices for `cpu-N` (and for the shardings of an analytic GPU estimate)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if topo.kind == "tpu":
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # Compiling touches no TPU: several plans may run at once (libtpu's lockfile would
        # otherwise refuse every process but the first).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if topo.kind in ("cpu", "gpu"):
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={topo.devices}".strip()


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def devices_for(topo: Topology) -> list:
    import jax

    if topo.kind == "tpu":
        if not has_libtpu():
            raise ConfigError(f"phijax plan --topology {topo.name} needs libtpu: {LIBTPU_HINT}")
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topo.libtpu_name).devices)
    devices = jax.devices("cpu")
    if len(devices) < topo.devices:
        raise ConfigError(f"--topology {topo.name}: this process has {len(devices)} CPU devices "
                          f"(XLA_FLAGS was set before phijax plan could set it)")
    return devices[:topo.devices]


def compiler_hbm(devices) -> float | None:
    """The HBM one device may use, as the TPU compiler itself reports it: a program over it is
    compiled (never run) and its RESOURCE_EXHAUSTED message names what is available."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    from phijax.plan.chips import parse_bytes

    too_big = jax.ShapeDtypeStruct((2 ** 40,), jnp.int8, sharding=SingleDeviceSharding(devices[0]))
    try:
        jax.jit(lambda a: a + 1).lower(too_big).compile()
    except Exception as e:  # XlaRuntimeError
        m = re.search(r"available HBM \(([\d.]+[KMGT]?)\)", str(e))
        return parse_bytes(m.group(1)) if m else None
    return None


def mesh_for(cfg: Config, topo: Topology, devices):
    """(the training mesh over the topology's devices, a note or None): `make_mesh`'s layout,
    and its note when the shape does not take the slice's torus whole. Its shape must use
    every device."""
    from jax.sharding import AxisType, Mesh
    from phijax.sharding import MESH_AXES, lay_out

    try:
        validate(cfg, len(devices))
    except ConfigError as e:
        if math.prod(cfg.mesh.shape) == len(devices):
            raise
        raise ConfigError(f"{e} of --topology {topo.name}: set mesh.data, mesh.fsdp and "
                          f"mesh.tensor to multiply to {len(devices)}") from None
    grid, note = lay_out(cfg.mesh.shape, devices)
    if note:
        note = f"{note} on {topo.name} ({topo.libtpu_name or 'devices'})"
        log.info("%s", note)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3), note


def compile_step(traced, mesh, label: str, what: str, program: str = "the train step"):
    """Lower and compile a traced program (`phijax.plan.programs`); an out-of-memory compile
    becomes `DoesNotFit` naming both sizes."""
    import jax

    start = time.perf_counter()
    log.info("compiling %s for %s (%d devices)...", program, label, mesh.devices.size)
    try:
        with jax.set_mesh(mesh):
            compiled = traced.lower().compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED is the only one we explain
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(out_of_memory(str(e), what, label)) from None
    log.info("compiled in %.1f s", time.perf_counter() - start)
    return compiled


def out_of_memory(message: str, what: str, label: str) -> str:
    """One line from libtpu's RESOURCE_EXHAUSTED message: needed > available, per device."""
    text = " ".join(message.split())
    m = re.search(r"required for ([\w ]+?) \(([\d.]+\s*[KMGT]?i?B?)\) exceeds available HBM "
                  r"\(([\d.]+\s*[KMGT]?i?B?)\)", text)
    if m:
        return (f"{what} does not fit {label}: {m.group(2)} > {m.group(3)} of HBM per device "
                f"({m.group(1)}; try more fsdp/tensor sharding, train.microbatches, "
                f"model.remat=full or a larger slice)")
    m = re.search(r"Used ([\d.]+\s*[KMGT]?i?B?) of ([\d.]+\s*[KMGT]?i?B?) hbm", text)
    if m:
        return f"{what} does not fit {label}: {m.group(1)} > {m.group(2)} of HBM per device"
    detail = text.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()[:300]
    return f"{what} does not fit {label}: {detail}"


def _subjaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general in a jaxpr (global, not per device): a scan's body times its
    length, a cond's costliest branch, a while body once, a Pallas kernel's body times its grid
    (every block, those its mask skips too); rematerialised forwards are in the backward
    pass's jaxpr and so counted."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        if name == "pallas_call":
            total += matmul_flops(eqn.params["jaxpr"]) * math.prod(eqn.params["grid_mapping"].grid)
            continue
        if name == "cond":
            total += max(matmul_flops(j) for j in _subjaxprs(eqn.params["branches"]))
            continue
        params = {k: v for k, v in eqn.params.items() if k != "cond_jaxpr"}
        inner = sum(matmul_flops(j) for v in params.values() for j in _subjaxprs(v))
        total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total
