"""The Phi-3 / Phi-4 decoder (HF `Phi3ForCausalLM` shapes) in Flax NNX.

Pre-norm blocks of grouped-query attention with RoPE and a SwiGLU MLP, RMSNorm, no biases.
Layers are stacked on a leading axis and run with `jax.lax.scan` under `jax.checkpoint`.
Every parameter carries logical axis names (`out_sharding` metadata) that `phijax.sharding`
maps onto the mesh. Parameters are float32; compute runs in `config.dtype`.

Projection layouts (HF fuses `qkv_proj` as [q | k | v] and `gate_up_proj` as [gate | up]):
  qkv      (embed, kv_heads, q_per_kv + 2, head_dim)  -- per KV group: its query heads, then k, v
  o        (kv_heads, q_per_kv, head_dim, embed)
  gate, up (embed, mlp); down (mlp, embed)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phijax.config import ModelConfig

nnx.use_eager_sharding(False)  # shardings are applied at the jit boundary, not at creation

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


def attention_mask(segment_ids):
    """Causal mask restricted to tokens of the same document: (b, 1, 1, s, s) bool."""
    s = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
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

    def __call__(self, x, rope_cs, mask):
        """x: (tokens, embed), tokens = b * s flattened; mask: (b, 1, 1, s, s)."""
        cfg = self.cfg
        dt = x.dtype
        b, s = mask.shape[0], mask.shape[-1]
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        qkv = jnp.einsum("te,ekhd->tkhd", x, self.qkv[...].astype(dt))
        qkv = qkv.reshape(b, s, *qkv.shape[1:])
        q, k, v = qkv[:, :, :, :g], qkv[:, :, :, g], qkv[:, :, :, g + 1]
        q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        if uses_cudnn(cfg):
            kv, d = k.shape[2], k.shape[3]
            out = jax.nn.dot_product_attention(
                q.reshape(b, s, kv * g, d), k, v, mask=mask[:, 0], implementation="cudnn")
            out = out.reshape(b, s, kv, g, d)
        else:
            q = q * jnp.asarray(cfg.dim_per_head ** -0.5, dt)
            out = causal_attention(q, k, v, mask, query_blocks(s))
        out = out.reshape(b * s, *out.shape[2:])
        return jnp.einsum("tkhd,khde->te", out, self.o[...].astype(dt))


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

    def hidden_states(self, tokens, positions=None, segment_ids=None):
        """Final-normed hidden states (b, s, hidden) in the compute dtype."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        if segment_ids is None:
            segment_ids = jnp.zeros((b, s), jnp.int32)
        mask = attention_mask(segment_ids)
        rope_cs = rope_tables(positions, cfg.dim_per_head, cfg.rope_theta, dt)
        # Blocks work on (b * s, hidden): XLA:CPU runs 2-D matmuls, and their weight gradients,
        # much faster than einsums batched over (b, s).
        x = jnp.take(self.embed[...], tokens.reshape(-1), axis=0).astype(dt)

        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, rope_cs, mask), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for i in range(cfg.num_hidden_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        return self.final_norm(x).reshape(b, s, -1)

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
