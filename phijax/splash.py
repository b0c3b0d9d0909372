"""`model.attention: splash`: the Pallas TPU splash-attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`) in place of the XLA attention.

The kernel takes one row's heads at a time: queries (heads, seq, head_dim) and keys and values
(kv_heads, seq, head_dim), each KV head serving `heads / kv_heads` consecutive query heads, which
is phijax's grouped layout (per KV head its query heads). Its mask is causal, and-ed with the
row's segment ids (tokens attend within their own document), and it skips the blocks the mask
hides entirely. It is built once per (heads, padded length) and vmapped over the rows; on a mesh
a `shard_map` hands each device its rows (over the batch axes) and its KV heads (over `tensor`;
where they do not divide, all KV heads and its share of each group's query heads), and the
kernel runs on that share, as MaxText runs it.

Sequences are padded to a multiple of 128 (the kernel's lane width) with a segment of their own,
which no real token attends. The kernel runs on TPUs; `model.splash_interpret` runs it in the
Pallas interpreter on any backend (slow: for tests). Anywhere else `splash` runs the XLA
attention, with a warning: the same config trains on a TPU and is tried on a CPU or GPU.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from phijax.config import ModelConfig
from phijax.sharding import spec_for

log = logging.getLogger("phijax")
LANES = 128  # sequence blocks are multiples of this
PAD_SEGMENT = -(2 ** 31)  # the padding's segment id: no real token has it


def target_platform() -> str:
    """The platform a program traced now compiles for: the mesh's devices (a plan compiles for
    TPU devices from a CPU process), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def uses_splash(cfg: ModelConfig) -> bool:
    """Whether attention runs the splash kernel: `attention: splash` on a TPU, or interpreted."""
    if cfg.attention != "splash":
        return False
    platform = target_platform()
    if cfg.splash_interpret or platform == "tpu":
        return True
    _say_fallback(platform)
    return False


@functools.lru_cache(maxsize=None)
def _say_fallback(platform: str) -> None:
    log.warning("model.attention splash needs a TPU (or model.splash_interpret=true); "
                "the %s backend runs the XLA attention instead", platform)


def block_size(seq: int) -> int:
    """The kernel's query and key block: the largest of 512, 256, 128 dividing `seq`."""
    return next(b for b in (512, 256, 128) if seq % b == 0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def kernel(heads: int, seq: int, interpret: bool):
    """The causal splash kernel for `heads` query heads over `seq` positions (a multiple of
    128), forward and backward blocks alike. Jitted as MaxText does: its block tables are
    worked out once per shape (jit's cache) and come out as arrays of the calling trace."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (BlockSizes, CausalMask,
                                                                  MultiHeadMask, make_splash_mha)

    b = block_size(seq)
    sizes = BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                       block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = MultiHeadMask([CausalMask((seq, seq))] * heads)
    return make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                           interpret=interpret)


def _attend(q, k, v, segment_ids, interpret: bool):
    """q (b, s, kv, g, d), scaled; k, v (b, s, kv, d); segment_ids (b, s) -> (b, s, kv, g, d)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, s, kv, g, d = q.shape
    pad = -s % LANES
    if pad:
        q, k, v = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    n = s + pad
    fn = kernel(kv * g, n, interpret)
    heads_first = lambda a: jnp.moveaxis(a, 1, 2)  # (b, s, h, d) -> (b, h, s, d)
    out = jax.vmap(lambda q, k, v, ids: fn(q, k, v, segment_ids=SegmentIds(ids, ids)))(
        heads_first(q.reshape(b, n, kv * g, d)), heads_first(k), heads_first(v), segment_ids)
    return jnp.moveaxis(out, 1, 2)[:, :s].reshape(b, s, kv, g, d)


def splash_attention(q, k, v, segment_ids, interpret: bool = False):
    """Causal attention within documents, as `phijax.model.causal_attention` computes it.
    q (b, s, kv, g, d), already scaled; k, v (b, s, kv, d); segment_ids (b, s)."""
    attend = functools.partial(_attend, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return attend(q, k, v, segment_ids)
    q_spec = spec_for(("batch", None, "kv_heads", None, None), q.shape, mesh)
    tensor = dict(mesh.shape).get("tensor", 1)
    if q_spec[2] is None and tensor > 1 and q.shape[3] % tensor == 0:
        # KV heads that `tensor` does not divide (phi-4's 10 on 4): every device holds them
        # all and takes its share of each group's query heads instead
        q_spec = P(q_spec[0], None, None, "tensor", None)
    kv_spec = P(*q_spec[:3], None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0])),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
