"""The Phi-3 / Phi-4 decoder (HF `Phi3ForCausalLM` shapes) in Flax NNX.

Pre-norm blocks of grouped-query attention with RoPE and a SwiGLU MLP, RMSNorm, no biases.
Layers are stacked on a leading axis and run with `jax.lax.scan` under `jax.checkpoint`.
Every parameter carries logical axis names (`out_sharding` metadata) that `phijax.sharding`
maps onto the mesh. Parameters are float32; compute runs in `config.dtype`.

The same modules run two ways: `__call__` over whole sequences (training, scoring), and `decode`
over a few new tokens at a time against a KV cache (sampling, serving, PTS rollouts). Both share
the projections, RoPE, norms and MLP; only how attention reads its keys differs.

Projection layouts (HF fuses `qkv_proj` as [q | k | v] and `gate_up_proj` as [gate | up]):
  qkv      (embed, kv_heads, q_per_kv + 2, head_dim)  -- per KV group: its query heads, then k, v
  o        (kv_heads, q_per_kv, head_dim, embed)
  gate, up (embed, mlp); down (mlp, embed)
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from phijax.config import ModelConfig
from phijax.sharding import shard_rows
from phijax.splash import splash_attention, uses_splash

# Shardings are applied at the jit boundary, not when a Variable is created, in every thread
# (sampling also runs in server and judge worker threads).
flax.config.update("flax_always_shard_variable", False)

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute everything
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _param(rngs: nnx.Rngs, shape, names, std: float | None) -> nnx.Param:
    value = jnp.ones(shape, jnp.float32) if std is None else \
        std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value, out_sharding=names)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), ("norm",), None)
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, dtype):
    """cos and sin of the RoPE angles, (b, s, head_dim / 2); computed once per forward."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rope(x, cos, sin):
    """Rotate-half RoPE as in HF Phi3. x: (b, s, ..., d); cos, sin: (b, s, d/2)."""
    d = x.shape[-1]
    shape = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[-1:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(segment_ids, shared_prefix: bool = False):
    """Causal mask restricted to tokens of the same document: (b, 1, 1, s, s) bool. With
    `shared_prefix`, segment 0 is a prefix that every later segment also sees: one row holds a
    context once and several continuations of it, each attending to the context and itself."""
    s = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    if shared_prefix:
        same_doc = same_doc | (segment_ids[:, None, :] == 0)
    return (causal & same_doc)[:, None, None]


def causal_attention(q, k, v, mask, blocks: int):
    """Softmax attention, skipping the key blocks that the causal mask hides entirely.

    q: (b, s, kv, g, d) already scaled; k, v: (b, s, kv, d); mask: (b, 1, 1, s, s).
    Query block i (of `blocks`) attends keys [0, (i + 1) * s / blocks) only, which saves
    (blocks - 1) / (2 * blocks) of the work and gives the same result as one full softmax.
    """
    s = q.shape[1]
    size = s // blocks
    outs = []
    for i in range(blocks):
        lo, hi = i * size, (i + 1) * size
        scores = jnp.einsum("bskhd,btkd->bkhst", q[:, lo:hi], k[:, :hi],
                            preferred_element_type=jnp.float32)
        scores = jnp.where(mask[..., lo:hi, :hi], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkhst,btkd->bskhd", probs, v[:, :hi]))
    return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)


def query_blocks(seq_len: int, max_blocks: int = 8, min_size: int = 64) -> int:
    """How many query blocks `causal_attention` uses: up to 8, each at least 64 long."""
    blocks = max(1, min(max_blocks, seq_len // min_size))
    while seq_len % blocks:
        blocks -= 1
    return blocks


def uses_cudnn(cfg: ModelConfig) -> bool:
    """Whether attention runs as cuDNN flash attention: `attention: cudnn`, a GPU, bfloat16.

    cuDNN's fused attention takes half-precision inputs only; everywhere else (CPU, TPU, float32
    compute) the same config runs the XLA attention below.
    """
    return (cfg.attention == "cudnn" and cfg.dtype == "bfloat16"
            and jax.default_backend() == "gpu")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, kv, d = cfg.hidden_size, cfg.num_key_value_heads, cfg.dim_per_head
        g = cfg.num_attention_heads // kv
        std = cfg.initializer_range
        self.qkv = _param(rngs, (e, kv, g + 2, d), ("embed", "kv_heads", None, "head_dim"), std)
        self.o = _param(rngs, (kv, g, d, e), ("kv_heads", None, "head_dim", "embed"), std)
        self.cfg = cfg

    def project(self, x, rope_cs, b: int, s: int):
        """q (b, s, kv, g, d), k and v (b, s, kv, d) of x (b * s, embed), RoPE applied to q, k."""
        g = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        qkv = jnp.einsum("te,ekhd->tkhd", x, self.qkv[...].astype(x.dtype))
        qkv = qkv.reshape(b, s, *qkv.shape[1:])
        q, k, v = qkv[:, :, :, :g], qkv[:, :, :, g], qkv[:, :, :, g + 1]
        return rope(q, *rope_cs), rope(k, *rope_cs), v

    def output(self, out):
        """(tokens, kv, g, d) attention outputs -> (tokens, embed), as a 2-D matmul: written as
        an einsum over (kv, g, d), XLA:CPU lays the weight out anew (a copy) at every call."""
        o = self.o[...].astype(out.dtype)
        return out.reshape(out.shape[0], -1) @ o.reshape(-1, o.shape[-1])

    def __call__(self, x, rope_cs, mask):
        """x: (tokens, embed), tokens = b * s flattened; mask: (b, 1, 1, s, s), or where
        `uses_splash` the segment ids (b, s) (the kernel builds its mask from them)."""
        cfg = self.cfg
        dt = x.dtype
        b, s = mask.shape[0], mask.shape[-1]
        q, k, v = self.project(x, rope_cs, b, s)
        if uses_cudnn(cfg):
            kv, g, d = q.shape[2:]
            out = jax.nn.dot_product_attention(
                q.reshape(b, s, kv * g, d), k, v, mask=mask[:, 0], implementation="cudnn")
            out = out.reshape(b, s, kv, g, d)
        elif uses_splash(cfg):
            q = q * jnp.asarray(cfg.dim_per_head ** -0.5, dt)
            out = splash_attention(q, k, v, mask, interpret=cfg.splash_interpret)
        else:
            q = q * jnp.asarray(cfg.dim_per_head ** -0.5, dt)
            out = causal_attention(q, k, v, mask, query_blocks(s))
        return self.output(out.reshape(b * s, *out.shape[2:]))

    def decode(self, x, rope_cs, cache, slot, mask, last: bool = False):
        """x: (b * s, embed), s new tokens per row written to cache slots [slot, slot + s);
        cache: keys (b, kv, d, slots) and values (b, kv, slots, d); mask: (b, 1, s * g, slots).
        Returns the attention output (b * s, embed), or with `last` only each row's last
        token's (b, embed), and the updated cache.

        Keys are cached with head_dim before the slots and values with the slots first: both
        attention products then reduce over a major axis with the minor axis contiguous, which
        vectorizes on CPU, and the cache is never transposed.
        """
        cache_k, cache_v = cache
        b = cache_k.shape[0]
        s = x.shape[0] // b
        q, k, v = self.project(x, rope_cs, b, s)
        kv, g, d = q.shape[2:]
        cache_k = jax.lax.dynamic_update_slice(
            cache_k, k.transpose(0, 2, 3, 1).astype(cache_k.dtype), (0, 0, 0, slot))
        cache_v = jax.lax.dynamic_update_slice(
            cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), (0, 0, slot, 0))
        if last:
            q, mask, s = q[:, -1:], mask[:, :, -g:], 1
        # Queries laid out (position, head in group) per KV head: (b, kv, s * g, d).
        q = (q * jnp.asarray(d ** -0.5, x.dtype)).transpose(0, 2, 1, 3, 4).reshape(b, kv, s * g, d)
        out = cached_attention(q, cache_k, cache_v, mask)
        out = out.reshape(b, kv, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b * s, kv, g, d)
        return self.output(out), (cache_k, cache_v)


def cached_attention(q, cache_k, cache_v, mask):
    """Softmax attention of q (b, kv, n, d) over cached keys (b, kv, d, slots) and values
    (b, kv, slots, d) where mask (b, 1, n, slots) allows; -> (b, kv, n, d)."""
    dt = q.dtype
    if q.shape[2] <= 8:  # decoding: a handful of queries per row, where a batched matmul of
        # (b * kv) tiny products is slow on CPU; multiply-and-reduce reads the cache once, and
        # written as a sum over head_dim (not a reduce of the broadcast product, which XLA:CPU
        # runs 1.7x slower) it is one elementwise loop over the slots.
        qf = q.astype(jnp.float32)
        scores = functools.reduce(jnp.add, (qf[..., i, None] * cache_k[:, :, None, i]
                                            for i in range(q.shape[-1])))
    else:
        scores = jnp.einsum("bkqd,bkdt->bkqt", q, cache_k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    if q.shape[2] <= 8:
        return jnp.sum(probs[..., None] * cache_v[:, :, None], axis=3)
    return jnp.einsum("bkqt,bktd->bkqd", probs, cache_v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        # Separate gate and up matrices: on XLA:CPU the fused (embed, 2, mlp) form costs ~12%
        # more per MLP, in the slicing of its output and the matching pads in the gradient.
        self.gate = _param(rngs, (e, f), ("embed", "mlp"), std)
        self.up = _param(rngs, (e, f), ("embed", "mlp"), std)
        self.down = _param(rngs, (f, e), ("mlp", "embed"), std)

    def __call__(self, x):
        dt = x.dtype
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return h @ self.down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope_cs, mask):
        x = x + self.attn(self.attn_norm(x), rope_cs, mask)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x, rope_cs, cache, slot, mask, last: bool = False):
        """`__call__` for new tokens against a KV cache (see `Attention.decode`); with `last`,
        only each row's last token goes on past attention: (b, embed)."""
        out, cache = self.attn.decode(self.attn_norm(x), rope_cs, cache, slot, mask, last)
        if last:
            x = x.reshape(cache[0].shape[0], -1, x.shape[-1])[:, -1]
        x = x + out
        return x + self.mlp(self.mlp_norm(x)), cache


class Phi(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                            cfg.initializer_range)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.layers = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  cfg.initializer_range)

    def hidden_states(self, tokens, positions=None, segment_ids=None, shared_prefix=False):
        """Final-normed hidden states (b, s, hidden) in the compute dtype; `shared_prefix`: see
        `attention_mask` (not with the splash kernel, whose mask is built from segment ids)."""
        cfg = self.cfg
        if shared_prefix and uses_splash(cfg):
            raise ValueError("a shared-prefix mask needs XLA or cuDNN attention, not splash")
        dt = jnp.dtype(cfg.dtype)
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        if segment_ids is None:
            segment_ids = jnp.zeros((b, s), jnp.int32)
        mask = segment_ids if uses_splash(cfg) else attention_mask(segment_ids, shared_prefix)
        rope_cs = rope_tables(positions, cfg.dim_per_head, cfg.rope_theta, dt)
        # Blocks work on (b * s, hidden): XLA:CPU runs 2-D matmuls, and their weight gradients,
        # much faster than einsums batched over (b, s).
        x = shard_rows(jnp.take(self.embed[...], tokens.reshape(-1), axis=0).astype(dt))

        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            return shard_rows(nnx.merge(graphdef, layer_state)(shard_rows(h), rope_cs, mask)), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for i in range(cfg.num_hidden_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        return self.final_norm(x).reshape(b, s, -1)

    def blocks(self) -> list[Block]:
        """The layers, one Block each: the model's own list once `unstack_layers` made one,
        else slices of the stacked weights."""
        if isinstance(self.layers, nnx.List):
            return list(self.layers)
        graphdef, stacked = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
                for i in range(self.cfg.num_hidden_layers)]

    def decode(self, tokens, positions, caches, slot, key_start):
        """Run tokens (b, s) at cache slots [slot, slot + s), where row r's keys start at slot
        key_start[r] (its left padding is skipped): float32 logits of each row's last token,
        and the updated caches (one (keys, values) pair per layer, see `empty_caches`)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        s = tokens.shape[1]
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        x = jnp.take(self.embed[...], tokens.reshape(-1), axis=0).astype(dt)
        # materialized once: left to fusion, every layer's RoPE would recompute the cos and sin
        rope_cs = jax.lax.optimization_barrier(
            rope_tables(positions, cfg.dim_per_head, cfg.rope_theta, dt))
        mask = cache_mask(slot, s, caches[0][1].shape[2], key_start, g)
        new, blocks = [], self.blocks()
        for i, (block, cache) in enumerate(zip(blocks, caches)):
            # the last layer: keys and values of every token, the rest for the last one only
            x, cache = block.decode(x, rope_cs, cache, slot, mask, last=i == len(blocks) - 1)
            new.append(cache)
        return self.logits(self.final_norm(x)), new

    def output_weights(self):
        """(hidden, vocab) projection to logits, float32."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, h):
        """float32 logits of hidden states h (..., hidden), as one 2-D matmul over all tokens."""
        w = self.output_weights().astype(h.dtype)
        out = jnp.dot(h.reshape(-1, h.shape[-1]), w, preferred_element_type=jnp.float32)
        return out.reshape(*h.shape[:-1], -1)

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.logits(self.hidden_states(tokens, positions, segment_ids))


def init_model(cfg: ModelConfig, seed: int) -> Phi:
    return Phi(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Phi:
    """The model's shapes, dtypes and logical axis names, with nothing allocated."""
    return nnx.eval_shape(lambda: init_model(cfg, 0))


def empty_caches(cfg: ModelConfig, b: int, slots: int):
    """Per layer, (keys (b, kv, head_dim, slots), values (b, kv, slots, head_dim)), zeros."""
    kv, d, dt = cfg.num_key_value_heads, cfg.dim_per_head, jnp.dtype(cfg.dtype)
    return [(jnp.zeros((b, kv, d, slots), dt), jnp.zeros((b, kv, slots, d), dt))
            for _ in range(cfg.num_hidden_layers)]


def cache_mask(slot, s: int, slots: int, key_start, g: int):
    """(b, 1, s * g, slots): query i (at slot + i, repeated for the g heads of a KV group) sees
    the cache slots from its row's key_start up to itself."""
    query_slot = slot + jnp.arange(s)
    key_slot = jnp.arange(slots)
    mask = (key_slot[None, None, :] <= query_slot[None, :, None]) & \
        (key_slot[None, None, :] >= key_start[:, None, None])
    return jnp.repeat(mask, g, axis=1)[:, None]


def unstack_layers(model: Phi) -> Phi:
    """`model` with its stacked layers replaced by a list of one Block per layer, for decoding:
    a decode step then reads each layer's weights where they lie instead of slicing the stack
    (slicing inside the decode loop costs about a fifth of the step on CPU). The training
    forward (`__call__`) needs the stacked layers."""
    model.layers = nnx.List(model.blocks())
    return model


@functools.lru_cache(maxsize=32)
def _decoder_graphdef(cfg_fields: tuple):
    cfg = ModelConfig(*cfg_fields)
    return nnx.graphdef(nnx.eval_shape(lambda: unstack_layers(init_model(cfg, 0))))


def decoding_params(cfg: ModelConfig, params) -> dict:
    """What a decoding model holds, from the model's parameters (a pure dict): every matrix cast
    to the compute dtype once (norm scales stay float32), and the stacked layers split into one
    dict per layer."""
    dt = jnp.dtype(cfg.dtype)
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dt) if a.ndim >= 2 else a, tree)
    layers = {i: cast(jax.tree.map(lambda a: a[i], params["layers"]))
              for i in range(cfg.num_hidden_layers)}
    return {**cast({k: v for k, v in params.items() if k != "layers"}), "layers": layers}


def decoder_from_params(cfg: ModelConfig, params) -> Phi:
    """The model holding `decoding_params` (layers unstacked); works inside `jax.jit` too."""
    return nnx.merge(_decoder_graphdef(dataclasses.astuple(cfg)), params)
