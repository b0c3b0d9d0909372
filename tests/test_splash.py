"""`model.attention: splash`: the Pallas TPU splash-attention kernel with phijax's causal,
same-document mask and grouped-query heads.

On CPU the kernel runs in the Pallas interpreter (`model.splash_interpret`), where it must give
the XLA attention's loss and gradients; without the interpreter a non-TPU backend runs the XLA
attention and says so. The `tpu_plan` test compiles it for a TPU slice through libtpu."""
import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, needs_libtpu, run_cli
from phijax.config import MeshConfig, ModelConfig
from phijax.model import init_model
from phijax.sharding import make_mesh
from phijax.train.step import lm_objective

# Grouped-query heads (4 query heads on 2 KV heads); 3 documents packed into each 96-token row
# (the kernel works on multiples of 128: the rows are padded).
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  loss_chunk=None)
LENGTHS = ((40, 30, 26), (10, 70, 16))


def _batch(seq: int = 96) -> dict:
    rng = np.random.default_rng(0)
    segment_ids = np.stack([np.repeat(np.arange(3), n) for n in LENGTHS]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in row]) for row in LENGTHS])
    tokens = rng.integers(0, CFG.vocab_size, (2, seq + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": positions.astype(np.int32), "segment_ids": segment_ids,
            "loss_weights": np.ones((2, seq), np.float32)}


def _loss_and_grads_fn(cfg: ModelConfig):
    graphdef, params = nnx.split(init_model(cfg, 0))
    loss = lambda p, b: lm_objective(0.0)(graphdef, p, b)[0]
    return jax.value_and_grad(loss), nnx.to_pure_dict(params)


def _loss_and_grads(cfg: ModelConfig, mesh=None):
    fn, params = _loss_and_grads_fn(cfg)
    fn = jax.jit(fn)
    if mesh is None:
        return fn(params, _batch())
    with jax.set_mesh(mesh):
        return fn(params, _batch())


def _assert_close(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        w = dict(jax.tree_util.tree_leaves_with_path(want_grads))[path]
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_splash_gives_the_xla_loss_and_gradients_on_packed_documents():
    splash = dataclasses.replace(CFG, attention="splash", splash_interpret=True)
    fn, params = _loss_and_grads_fn(splash)
    assert "pallas_call" in str(jax.make_jaxpr(fn)(params, _batch()))  # the kernel runs
    _assert_close(_loss_and_grads(splash), _loss_and_grads(CFG))


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_splash_on_a_mesh_splits_rows_and_heads(kv_heads):
    # rows over data; over tensor the 2 KV heads, or where 1 KV head does not divide, the 4
    # query heads of its group: each device runs the kernel on its share
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    xla = dataclasses.replace(CFG, num_key_value_heads=kv_heads)
    splash = dataclasses.replace(xla, attention="splash", splash_interpret=True)
    _assert_close(_loss_and_grads(splash, mesh), _loss_and_grads(xla))


def test_splash_off_tpu_runs_the_xla_attention_and_says_so(caplog):
    splash = dataclasses.replace(CFG, attention="splash")
    with caplog.at_level(logging.WARNING, logger="phijax"):
        got = _loss_and_grads(splash)
    assert "model.attention splash needs a TPU" in caplog.text
    _assert_close(got, _loss_and_grads(CFG))


@pytest.mark.tpu_plan
@needs_libtpu
def test_splash_compiles_for_a_tpu_slice(tmp_path):
    out = tmp_path / "plan.json"
    run_cli("plan", ROOT / "configs" / "tiny.yaml", "--topology", "v5p-8", "--out", out,
            "data.synthetic=true", "mesh.fsdp=4", "model.attention=splash")
    plan = json.loads(out.read_text())
    # the forward kernel and its two backward kernels (dq, dkv), once per layer (2)
    assert plan["compute"]["custom_calls"]["tpu_custom_call"] == 6
    assert plan["memory"]["peak_bytes"] > 0
