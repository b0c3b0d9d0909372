"""Mesh construction, the one table from logical axis names to mesh axes, and what it leaves
replicated where a mesh axis does not divide a dim."""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from phijax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

log = logging.getLogger("phijax")

# Logical name -> mesh axis (or axes). Names not listed are replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


def lay_out(shape: tuple[int, ...], devices) -> tuple[np.ndarray, str | None]:
    """The devices arranged as a mesh of `shape`, and a note when the arrangement is not the
    best one: a TPU slice's torus takes a shape whose every axis is a product of physical
    axes (phi-4's 2 x 64 x 2 on v5p-512's 8 x 8 x 4 is not); such a shape is laid out with
    split physical axes (its collectives cross more links), else in device-id order."""
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_device_mesh(shape, devices), None
    except (ValueError, NotImplementedError, AssertionError) as e:
        reason = str(e).split(". ")[0]
    name = "x".join(map(str, shape))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return grid, f"mesh {name} splits physical axes of the slice ({reason})"
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(shape)
        return grid, f"mesh {name} is laid out in device-id order ({reason})"


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """The training mesh over `devices` (default: all); a shape the slice's torus does not
    take whole is laid out anyway, with a warning (see `lay_out`)."""
    devices = jax.devices() if devices is None else devices
    grid, note = lay_out(cfg.shape, devices)
    if note:
        log.warning("%s", note)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


class Replicated(NamedTuple):
    """One parameter dim left unsplit over a mesh axis its rule names: the axis does not divide
    it (e.g. phi-4's 10 KV heads on tensor=4), so every device holds that dim whole."""
    path: str  # "layers.attn.qkv"
    dim: int
    axis: str  # the mesh axis
    extra_bytes: int  # per device, over what splitting the dim along `axis` would hold
    name: str  # the dim's logical name
    size: int


def _placement(names, shape, mesh: Mesh) -> tuple[P, list[tuple[int, str]]]:
    """The PartitionSpec for logical axis `names`, each dim over those of its rule's mesh axes
    that divide it, and the (dim, mesh axis) pairs left out because they do not divide."""
    out, used, left_out = [], set(), []
    for dim, (name, size) in enumerate(zip(names, shape)):
        axes = RULES.get(name) if name else None
        kept = []
        for axis in (axes,) if isinstance(axes, str) else tuple(axes or ()):
            if mesh.shape[axis] == 1 or axis in used:
                continue
            if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
            else:
                left_out.append((dim, axis))
        used.update(kept)
        out.append(tuple(kept) if len(kept) > 1 else kept[0] if kept else None)
    return P(*out), left_out


def spec_for(names, shape, mesh: Mesh) -> P:
    """PartitionSpec for an array with logical axis `names`: each dim split over the mesh axes
    of its rule that divide it, replicated over the others (see `replicated_params`)."""
    return _placement(names, shape, mesh)[0]


def _logical_names(var) -> tuple:
    return var.get_metadata().get("out_sharding") or (None,) * len(var.shape)


def param_specs(abstract_state, mesh: Mesh) -> dict:
    """PartitionSpecs, as a pure dict, for an NNX state whose Variables carry logical names."""
    out: dict = {}
    for path, var in nnx.to_flat_state(abstract_state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = spec_for(_logical_names(var), var.shape, mesh)
    return out


def replicated_params(abstract_state, mesh: Mesh) -> list[Replicated]:
    """Every parameter dim that `param_specs` leaves whole over a mesh axis its rule names,
    because the axis does not divide it, with what that costs per device."""
    out = []
    for path, var in nnx.to_flat_state(abstract_state):
        names = _logical_names(var)
        spec, left_out = _placement(names, var.shape, mesh)
        shards = math.prod(mesh.shape[a] for axes in spec if axes
                           for a in ((axes,) if isinstance(axes, str) else axes))
        per_device = math.prod(var.shape) * np.dtype(var.dtype).itemsize // shards
        out += [Replicated(".".join(map(str, path)), dim, axis,
                           per_device - per_device // mesh.shape[axis], names[dim], var.shape[dim])
                for dim, axis in left_out]
    return out


def _bytes_text(n: int) -> str:
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def describe_replicated(found: list[Replicated], mesh: Mesh) -> str:
    """One line naming each replicated parameter dim, its mesh axis and its cost per device."""
    parts = [f"{r.path} dim {r.dim} ({r.name}={r.size}) over {r.axis}={mesh.shape[r.axis]} "
             f"+{_bytes_text(r.extra_bytes)}" for r in found]
    total = _bytes_text(sum(r.extra_bytes for r in found))
    return (f"sharding: {len({r.path for r in found})} parameters are replicated over a mesh "
            f"axis that does not divide them, +{total} per device (parameters; each optimizer "
            f"moment as much again): {', '.join(parts)}")


def named(tree_of_specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_of_specs,
                        is_leaf=lambda x: isinstance(x, P))


def shard_rows(x):
    """x (rows, ...) constrained to rows split over the batch axes of the mesh in context, as
    the batch is: without it, activations inherit the embedding table's split (its hidden dim
    over fsdp) and every device holds every token of the batch. A no-op outside a mesh, or when
    the rows do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in RULES["batch"] if a in mesh.axis_names)
    n = math.prod(mesh.shape[a] for a in axes)
    if n <= 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *[None] * (x.ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the data-parallel axes; arrays of shape (batch, ...) of rank `ndim`."""
    return NamedSharding(mesh, P(RULES["batch"], *(None,) * (ndim - 1)))
