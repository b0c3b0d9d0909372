"""cuDNN flash attention on a GPU against the XLA attention. Skipped where JAX sees no GPU.

Run on a GPU machine with `JAX_PLATFORMS=cuda pytest tests/test_gpu.py` (conftest.py pins
JAX to the CPU only when JAX_PLATFORMS is unset).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phijax.config import ModelConfig
from phijax.model import init_model, uses_cudnn

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

# head_dim 64; GQA 4 query heads per KV head; two packed documents in the first row.
CFG = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
B, S = 2, 256


def batch():
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, S)), jnp.int32)
    seg = jnp.asarray([[0] * 100 + [1] * 156, [0] * S], jnp.int32)
    pos = jnp.asarray([list(range(100)) + list(range(156)), list(range(S))], jnp.int32)
    return toks, pos, seg


def loss_and_grad(cfg):
    """Jitted (logits, loss, grads) of next-token cross-entropy, and the compiled HLO text."""
    graphdef, params = nnx.split(init_model(cfg, 0))

    def loss(params, toks, pos, seg):
        logits = nnx.merge(graphdef, params)(toks, pos, seg)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)
        return nll.mean(), logits

    args = (params, *batch())
    step = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile()
    (value, logits), grads = step(*args)
    return np.asarray(logits), float(value), jax.tree.map(np.asarray, grads), step.as_text()


def rel_err(a, b):
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


def test_cudnn_attention_runs_and_matches_xla_in_bfloat16():
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    cudnn = dataclasses.replace(bf16, attention="cudnn")
    assert uses_cudnn(cudnn) and not uses_cudnn(bf16)
    ref_logits, ref_loss, ref_grads, _ = loss_and_grad(
        dataclasses.replace(CFG, dtype="float32"))  # float32 XLA: the reference
    x_logits, x_loss, x_grads, x_hlo = loss_and_grad(bf16)
    c_logits, c_loss, c_grads, c_hlo = loss_and_grad(cudnn)
    assert "cudnn" in c_hlo.lower() and "fmha" in c_hlo.lower()  # the fused kernel is in use
    assert "fmha" not in x_hlo.lower()
    # cuDNN's bfloat16 error against float32 is of the size of XLA's bfloat16 error.
    xe, ce = rel_err(x_logits, ref_logits), rel_err(c_logits, ref_logits)
    print(f"logits rel. error vs float32: xla-bf16 {xe:.2e}, cudnn-bf16 {ce:.2e}")
    assert ce <= 2 * xe + 1e-3
    assert abs(c_loss - ref_loss) <= 2 * abs(x_loss - ref_loss) + 1e-3
    named = jax.tree_util.tree_leaves_with_path(ref_grads)
    for (path, g), xg, cg in zip(named, jax.tree.leaves(x_grads), jax.tree.leaves(c_grads)):
        assert rel_err(cg, g) <= 2 * rel_err(xg, g) + 1e-2, jax.tree_util.keystr(path)


def test_cudnn_keeps_documents_apart():
    """The document mask reaches cuDNN: a packed row equals its documents run alone."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16", attention="cudnn")
    model = init_model(cfg, 0)
    toks, pos, seg = batch()
    packed = np.asarray(model(toks[:1], pos[:1], seg[:1]), np.float32)
    second = np.asarray(model(toks[:1, 100:]), np.float32)
    assert rel_err(packed[:, 100:], second) < 2e-2
    leaky = np.asarray(model(toks[:1], pos[:1], jnp.zeros_like(seg[:1])), np.float32)
    assert rel_err(leaky[:, 100:], second) > 5 * rel_err(packed[:, 100:], second)

