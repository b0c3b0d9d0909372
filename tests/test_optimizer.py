"""Schedule, decay mask, z-loss and per-token loss weights."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phijax.config import ModelConfig, OptimizerConfig
from phijax.model import init_model
from phijax.train.optimizer import decay_mask, learning_rate_schedule
from phijax.train.step import lm_objective, sequence_logprobs


def test_linear_warmup_then_linear_decay_to_floor():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=4, end_learning_rate_ratio=0.1)
    lr = learning_rate_schedule(cfg, total_steps=14)
    values = [float(lr(s)) for s in range(16)]
    np.testing.assert_allclose(values[:4], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(values[4:9], [1.0, 0.91, 0.82, 0.73, 0.64], rtol=1e-6)
    np.testing.assert_allclose(values[14:], [0.1, 0.1], rtol=1e-6)


def test_no_weight_decay_on_norms_and_embeddings_unless_asked():
    params = nnx.to_pure_dict(nnx.state(init_model(ModelConfig(), 0)))
    mask = decay_mask(params, False)
    assert mask["embed"] is False and mask["final_norm"]["scale"] is False
    assert mask["layers"]["attn_norm"]["scale"] is False
    assert mask["layers"]["attn"]["qkv"] is True and mask["lm_head"] is True
    assert all(jax.tree.leaves(decay_mask(params, True)))


def _batch(weights):
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, 512, (2, 8)), jnp.int32)
    return {"tokens": toks, "targets": jnp.roll(toks, -1, 1),
            "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)),
            "segment_ids": jnp.zeros((2, 8), jnp.int32), "loss_weights": jnp.asarray(weights)}


def test_loss_weights_mask_tokens_and_z_loss_adds_log_z_squared():
    model = init_model(ModelConfig(), 0)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    weights = np.ones((2, 8), np.float32)
    weights[1, 4:] = 0.0
    batch = _batch(weights)
    objective, (sums, weight) = lm_objective(0.0)(graphdef, params, batch)
    nll = sums["loss"]
    logits = model(batch["tokens"])
    logp = jax.nn.log_softmax(logits, -1)
    per_token = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, jnp.sum(per_token * weights), rtol=1e-6)
    assert float(weight) == 12.0 and float(objective) == float(nll)
    np.testing.assert_allclose(sequence_logprobs(graphdef, params, batch),
                               -jnp.sum(per_token * weights, axis=-1), rtol=1e-6)
    with_z, _ = lm_objective(1e-2)(graphdef, params, batch)
    logz = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(with_z, nll + 1e-2 * jnp.sum(logz ** 2 * weights), rtol=1e-6)


def test_a_nonfinite_step_changes_nothing_and_is_counted():
    from phijax.config import load_config
    from phijax.sharding import make_mesh
    from phijax.train.step import build_trainer
    from test_sharding import SMALL

    cfg = load_config(None, SMALL)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    trainer = build_trainer(cfg, mesh)
    good = _batch(np.ones((2, 8), np.float32))
    good = dict(good, tokens=good["tokens"] % 256, targets=good["targets"] % 256)  # SMALL's vocab
    bad = dict(good, loss_weights=good["loss_weights"].at[0, 3].set(jnp.nan))
    with jax.set_mesh(mesh):
        state = trainer.init()
        before = jax.tree.map(np.asarray, state)
        state, metrics = trainer.train_step(state, bad)
        assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped_steps"]) == 1
        for part in ("params", "opt_state"):  # the moments and Adam's step count too
            for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(state[part])):
                np.testing.assert_array_equal(a, np.asarray(b))
        assert int(state["skipped_steps"]) == 1 and int(state["step"]) == 1
        state, metrics = trainer.train_step(state, good)
        assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped_steps"]) == 1
        assert int(state["step"]) == 2
        changed = [not np.array_equal(a, np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]))]
        assert all(changed)
