"""The sharded train step on 8 virtual CPU devices matches one device."""
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from phijax.config import load_config
from phijax.data.loader import synthetic_batches
from phijax.model import abstract_model
from phijax.sharding import make_mesh, replicated_params, spec_for
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


MESH_222 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


# The last: the loss in chunks of 12 positions (32 = 12 + 12 + 8), the vocabulary split over tensor.
@pytest.mark.parametrize("mesh", [MESH_222, ("mesh.fsdp=8",), (*MESH_222, "model.loss_chunk=12")])
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


def test_rule_table_shards_over_the_mesh_axes_that_divide():
    mesh = make_mesh(load_config(None, ["mesh.data=2", "mesh.fsdp=4"]).mesh)
    assert spec_for(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    assert spec_for(("batch", None), (6, 3), mesh) == P("data", None)  # fsdp=4 does not divide 6


def test_kv_heads_that_tensor_does_not_divide_are_named_once_and_still_train(single, caplog):
    """SMALL's 2 KV heads on tensor=4: the attention weights stay whole over the tensor axis;
    build_trainer says so in one warning, with what it costs per device."""
    mesh = make_mesh(load_config(None, ["mesh.fsdp=2", "mesh.tensor=4"]).mesh)
    state = nnx.state(abstract_model(load_config(None, SMALL).model))
    found = replicated_params(state, mesh)
    # qkv (layers 2, embed 64, kv 2, 4, 16: 64 KiB) and o (layers 2, kv 2, 2, 16, embed 64:
    # 32 KiB), float32: each device holds half of each (embed over fsdp=2) where an eighth would
    # do, 3/8 of each more.
    assert [r[:4] for r in found] == [("layers.attn.o", 1, "tensor", 12288),
                                      ("layers.attn.qkv", 2, "tensor", 24576)]
    assert [(r.name, r.size) for r in found] == [("kv_heads", 2)] * 2
    with caplog.at_level(logging.WARNING, logger="phijax"):
        sharded, _ = losses("mesh.fsdp=2", "mesh.tensor=4")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "sharding: 2 parameters are replicated over a mesh axis that does not divide them, "
        "+36.0 KiB per device (parameters; each optimizer moment as much again): "
        "layers.attn.o dim 1 (kv_heads=2) over tensor=4 +12.0 KiB, "
        "layers.attn.qkv dim 2 (kv_heads=2) over tensor=4 +24.0 KiB"]
    np.testing.assert_allclose(sharded, single[0], rtol=1e-5)


def _step_temp_bytes(overrides: list[str], devices: int) -> int:
    """Temporary bytes per device of the compiled train step (32 rows of 128 tokens)."""
    cfg = load_config(None, SMALL + ["data.seq_len=128", "train.batch_size=32",
                                     "model.remat=none", *overrides])
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices])
    trainer = build_trainer(cfg, mesh)
    batch = {k: jax.ShapeDtypeStruct((32, 128), np.float32 if k == "loss_weights" else np.int32,
                                     sharding=s) for k, s in trainer.batch_shardings.items()}
    with jax.set_mesh(mesh):
        compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_activations_are_split_by_rows_over_the_batch_axes():
    """Under FSDP each device holds its own rows' activations: the step's temporaries on 8
    devices are near an eighth of one device's (they were all of them: the embedding lookup's
    output took the table's hidden-dim split)."""
    one = _step_temp_bytes([], 1)
    eight = _step_temp_bytes(["mesh.fsdp=8"], 8)
    assert eight < 0.3 * one, (eight, one)
