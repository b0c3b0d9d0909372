"""The decoder: shapes, causal and document masking, per-document positions, variants agree."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phijax.config import ModelConfig
from phijax.model import init_model, uses_cudnn

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True), (1, False)])
def test_forward_shapes_and_logical_names(kv_heads, tied):
    cfg = dataclasses.replace(CFG, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    model = init_model(cfg, 0)
    logits = model(tokens((3, 16)))
    assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.ndim, path
    assert ("lm_head",) not in dict(nnx.to_flat_state(state)) if tied else True


def test_causal_mask_future_tokens_do_not_matter():
    model = init_model(CFG, 0)
    a, b = tokens((1, 16), 1), tokens((1, 16), 2)
    mixed = a.at[:, 10:].set(b[:, 10:])
    np.testing.assert_allclose(model(a)[:, :10], model(mixed)[:, :10], atol=1e-6)
    assert not np.allclose(model(a)[:, 10:], model(mixed)[:, 10:])


def test_document_mask_and_positions_make_packed_equal_separate():
    model = init_model(CFG, 0)
    first, second = tokens((1, 7), 3), tokens((1, 9), 4)
    packed = jnp.concatenate([first, second], axis=1)
    segments = jnp.asarray([[0] * 7 + [1] * 9])
    positions = jnp.asarray([list(range(7)) + list(range(9))])
    out = model(packed, positions, segments)
    np.testing.assert_allclose(out[:, :7], model(first), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], model(second), atol=1e-5)
    # Without the document mask the second document sees the first.
    leaky = model(packed, positions, jnp.zeros_like(segments))
    assert not np.allclose(leaky[:, 7:], model(second), atol=1e-3)


def test_scan_remat_and_unrolled_agree():
    toks = tokens((2, 16))
    reference = init_model(CFG, 0)(toks)
    for change in ({"scan_layers": False}, {"remat": "full"}, {"remat": "dots_no_batch"}):
        out = init_model(dataclasses.replace(CFG, **change), 0)(toks)
        np.testing.assert_allclose(out, reference, atol=1e-5, err_msg=str(change))


def test_bfloat16_compute_keeps_float32_params():
    model = init_model(dataclasses.replace(CFG, dtype="bfloat16"), 0)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model)))
    out = model(tokens((2, 16)))
    reference = init_model(CFG, 0)(tokens((2, 16)))
    np.testing.assert_allclose(out, reference, atol=0.1)


def test_seed_fixes_init():
    a = jax.tree.leaves(nnx.state(init_model(CFG, 7)))
    b = jax.tree.leaves(nnx.state(init_model(CFG, 7)))
    c = jax.tree.leaves(nnx.state(init_model(CFG, 8)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_block_skipping_attention_equals_full_softmax(blocks):
    from phijax.model import attention_mask, causal_attention
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 64, 2, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 64, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.sort(rng.integers(0, 4, (2, 64)), axis=1))
    mask = attention_mask(segments)
    np.testing.assert_allclose(causal_attention(q, k, v, mask, blocks),
                               causal_attention(q, k, v, mask, 1), atol=1e-5)


def test_query_blocks_divide_the_sequence():
    from phijax.model import query_blocks
    assert [query_blocks(s) for s in (16, 64, 128, 512, 4096, 96, 200)] == [1, 1, 2, 8, 8, 1, 2]


def test_cudnn_attention_falls_back_to_xla_off_gpu():
    """`attention: cudnn` runs the XLA attention off GPU and in float32: same logits, bit for bit."""
    toks = tokens((2, 16))
    segments = jnp.asarray([[0] * 5 + [1] * 11, [0] * 16])
    for dtype in ("float32",) if jax.default_backend() == "gpu" else ("float32", "bfloat16"):
        xla = dataclasses.replace(CFG, dtype=dtype)
        cudnn = dataclasses.replace(xla, attention="cudnn")
        assert not uses_cudnn(cudnn)
        np.testing.assert_array_equal(init_model(cudnn, 0)(toks, None, segments),
                                      init_model(xla, 0)(toks, None, segments))
