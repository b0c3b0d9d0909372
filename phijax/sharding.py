"""Mesh construction and the one table from logical axis names to mesh axes."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from phijax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

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


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(cfg.shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def spec_for(names, shape, mesh: Mesh) -> P:
    """PartitionSpec for an array with logical axis `names`; an axis whose size the mesh axes
    do not divide stays replicated (e.g. phi-4's 10 KV heads on tensor=4)."""
    out, used = [], set()
    for name, size in zip(names, shape):
        axes = RULES.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if axes and size % int(np.prod([mesh.shape[a] for a in axes])) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def param_specs(abstract_state, mesh: Mesh) -> dict:
    """PartitionSpecs, as a pure dict, for an NNX state whose Variables carry logical names."""
    out: dict = {}
    for path, var in nnx.to_flat_state(abstract_state):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = spec_for(names, var.shape, mesh)
    return out


def named(tree_of_specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_of_specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the data-parallel axes; arrays of shape (batch, ...) of rank `ndim`."""
    return NamedSharding(mesh, P(RULES["batch"], *(None,) * (ndim - 1)))
