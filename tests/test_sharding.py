"""The sharded train step on 8 virtual CPU devices matches one device."""
import jax
import numpy as np
import pytest

from phijax.config import load_config
from phijax.data.loader import synthetic_batches
from phijax.sharding import make_mesh, spec_for
from phijax.train.step import build_trainer
from jax.sharding import PartitionSpec as P

SMALL = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
         "data.seq_len=32", "data.synthetic=true", "train.batch_size=8", "train.steps=5",
         "optimizer.warmup_steps=2"]


def unequal_weights(batch, step):
    """Random 0/1 loss weights, dense on even rows and sparse on odd ones: with 2 microbatches
    (rows 2 apart) the two hold very different token counts, so averaging per-microbatch means
    instead of summing and dividing once gives a different loss and gradient."""
    rng = np.random.default_rng(step)
    keep = np.where(np.arange(8)[:, None] % 2 == 0, 0.9, 0.15)
    return dict(batch, loss_weights=(rng.random((8, 32)) < keep).astype(np.float32))


def losses(*overrides, steps=5, weights=None):
    cfg = load_config(None, SMALL + list(overrides))
    mesh = make_mesh(cfg.mesh, jax.devices()[:int(np.prod(cfg.mesh.shape))])
    trainer = build_trainer(cfg, mesh)
    out = []
    with jax.set_mesh(mesh):
        state = trainer.init()
        for step, batch in enumerate(synthetic_batches(256, 8, 32, 0, 0, steps)):
            batch = weights(batch, step) if weights else batch
            batch = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in batch.items()}
            state, metrics = trainer.train_step(state, batch)
            out.append(float(metrics["loss"]))
    return np.array(out), state


@pytest.fixture(scope="module")
def single():
    return losses()


def test_eight_devices_available():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh", [("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), ("mesh.fsdp=8",)])
def test_meshes_match_single_device(single, mesh):
    reference, ref_state = single
    sharded, state = losses(*mesh)
    np.testing.assert_allclose(sharded, reference, rtol=1e-5)
    assert reference[-1] < reference[0]
    embed = state["params"]["embed"]
    assert len(embed.sharding.device_set) == 8  # really spread over the mesh
    np.testing.assert_allclose(np.asarray(embed), np.asarray(ref_state["params"]["embed"]),
                               atol=1e-6)


def test_microbatches_match_full_batch_with_unequal_token_counts():
    reference, ref_state = losses(weights=unequal_weights)
    accumulated, state = losses("train.microbatches=2", "mesh.fsdp=4", weights=unequal_weights)
    np.testing.assert_allclose(accumulated, reference, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # The check can see a wrong accumulation: the two microbatches' token counts differ a lot.
    counts = [unequal_weights({}, 0)["loss_weights"][j::2].sum() for j in (0, 1)]
    assert counts[0] > 3 * counts[1]


def test_rule_table_replicates_what_it_cannot_divide():
    mesh = make_mesh(load_config(None, ["mesh.tensor=4", "mesh.data=2"]).mesh)
    assert spec_for(("embed", "kv_heads", None, "head_dim"), (64, 10, 6, 128), mesh) == P(None, None, None, None)
    assert spec_for(("embed", "kv_heads", None, "head_dim"), (64, 8, 6, 128), mesh) == P(None, "tensor", None, None)
    assert spec_for(("vocab", "embed"), (1024, 64), mesh) == P("tensor", None)
