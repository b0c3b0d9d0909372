"""The LM loss computed a chunk of positions at a time equals the loss over whole sequences, in
value and gradient, and the compiled train step then needs far less scratch memory."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phijax.config import DPOConfig, ModelConfig, load_config
from phijax.model import init_model
from phijax.posttrain.dpo import dpo_objective
from phijax.sharding import make_mesh
from phijax.train.step import BATCH_KEYS, build_trainer, lm_objective, sequence_logprobs

CFG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
B, S = 4, 12


def lm_batch(seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, CFG.vocab_size, (B, S + 1))
    weights = (rng.random((B, S)) < 0.7).astype(np.float32)
    weights[1, 5:] = 0.0  # a row padded at its end
    return {"tokens": jnp.asarray(toks[:, :-1], jnp.int32),
            "targets": jnp.asarray(toks[:, 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(S), (B, S)),
            "segment_ids": jnp.asarray(np.repeat([[0] * 7 + [1] * 5], B, 0), jnp.int32),
            "loss_weights": jnp.asarray(weights)}


def split(loss_chunk):
    graphdef, state = nnx.split(init_model(dataclasses.replace(CFG, loss_chunk=loss_chunk), 0))
    return graphdef, nnx.to_pure_dict(state)


def value_and_grad(objective, loss_chunk, batch):
    graphdef, params = split(loss_chunk)
    fn = jax.jit(jax.value_and_grad(lambda p: objective(graphdef, p, batch), has_aux=True))
    return fn(params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [5, 4, 1])  # 5 leaves a partial last chunk; 4 divides 12
def test_chunked_lm_loss_and_gradients_equal_whole_sequences(chunk):
    batch, objective = lm_batch(), lm_objective(1e-2)  # z-loss on, masked tokens
    (total, (sums, weight)), grads = value_and_grad(objective, None, batch)
    (c_total, (c_sums, c_weight)), c_grads = value_and_grad(objective, chunk, batch)
    np.testing.assert_allclose(c_total, total, rtol=1e-6)
    np.testing.assert_allclose(c_sums["loss"], sums["loss"], rtol=1e-6)
    assert float(c_weight) == float(weight) == float(batch["loss_weights"].sum())
    assert_trees_close(c_grads, grads)


@pytest.mark.parametrize("chunk", [5, 4])
def test_chunked_sequence_logprobs_and_dpo_equal_whole_sequences(chunk):
    batch = lm_batch(1)
    whole, chunked = split(None), split(chunk)
    np.testing.assert_allclose(sequence_logprobs(*chunked, batch),
                               sequence_logprobs(*whole, batch), rtol=1e-6)
    pairs = {k: v.reshape(B // 2, 2, S) for k, v in batch.items()}
    pairs["ref_logps"] = jnp.asarray([[-30.0, -31.0], [-29.5, -28.0]])
    pairs["weights"] = jnp.ones(B // 2)
    objective = dpo_objective(DPOConfig(beta=0.5, rpo_alpha=0.3))
    (loss, (sums, _)), grads = value_and_grad(objective, None, pairs)
    (c_loss, (c_sums, _)), c_grads = value_and_grad(objective, chunk, pairs)
    np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
    assert_trees_close(c_sums, sums)
    assert_trees_close(c_grads, grads)


def train_step_temp_bytes(*overrides) -> int:
    cfg = load_config(None, ["model.vocab_size=32000", "model.hidden_size=64",
                             "model.intermediate_size=128", "model.num_hidden_layers=2",
                             "data.seq_len=512", "train.batch_size=8", *overrides])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    trainer = build_trainer(cfg, mesh)
    batch = {k: jax.ShapeDtypeStruct((8, 512), jnp.float32 if k == "loss_weights" else jnp.int32,
                                     sharding=trainer.batch_shardings[k]) for k in BATCH_KEYS}
    compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunks_shrink_the_train_steps_scratch_memory():
    whole = train_step_temp_bytes("model.loss_chunk=null")
    chunked = train_step_temp_bytes("model.loss_chunk=64")
    logits_bytes = 8 * 512 * 32000 * 4  # one (batch, seq, vocab) float32 array
    assert whole > logits_bytes  # the whole sequence's logits exist...
    assert chunked < 0.5 * whole  # ...and chunked, they do not
