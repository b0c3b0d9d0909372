"""The decoder: shapes, causal and document masking, per-document positions, variants agree."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phijax.config import ModelConfig
from phijax.model import decoder_from_params, decoding_params, empty_caches, init_model, uses_cudnn

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
    flat = dict(nnx.to_flat_state(state))
    if tied:
        assert ("lm_head",) not in flat
        np.testing.assert_allclose(model.output_weights(), flat[("embed",)][...].T)
    else:
        assert flat[("lm_head",)].shape == (cfg.hidden_size, cfg.vocab_size)
        assert not np.allclose(model.output_weights(), flat[("embed",)][...].T)


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


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_decode_with_a_cache_equals_the_training_forward(kv_heads):
    """The KV-cache decode path (a prefill of a left-padded prompt, then one token at a time)
    gives the training forward's logits at every position."""
    cfg = dataclasses.replace(CFG, num_key_value_heads=kv_heads)
    model = init_model(cfg, 0)
    ids = tokens((2, 12), 5)
    full = model(ids)  # (2, 12, vocab)
    pad = 3  # the prompt is the first 5 tokens, left-padded into 8 slots
    prompt = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), ids[:, :5]], axis=1)
    positions = jnp.maximum(jnp.arange(8)[None] - pad, 0).repeat(2, 0)
    caches = empty_caches(cfg, 2, 8 + 7)  # the prompt's 8 slots, then 7 decoded tokens
    key_start = jnp.full(2, pad, jnp.int32)
    logits, caches = model.decode(prompt, positions, caches, 0, key_start)
    np.testing.assert_allclose(logits, full[:, 4], atol=1e-5)
    for t in range(5, 12):
        logits, caches = model.decode(ids[:, t:t + 1], jnp.full((2, 1), t), caches, pad + t,
                                      key_start)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5)


def test_the_unstacked_decoder_decodes_like_the_stacked_model():
    model = init_model(CFG, 4)
    params = decoding_params(CFG, nnx.to_pure_dict(nnx.state(model)))
    assert sorted(params["layers"]) == list(range(CFG.num_hidden_layers))
    decoder = decoder_from_params(CFG, params)
    args = (tokens((2, 6)), jnp.arange(6)[None].repeat(2, 0))
    key_start = jnp.zeros(2, jnp.int32)
    want, _ = model.decode(*args, empty_caches(CFG, 2, 6), 0, key_start)
    got, _ = decoder.decode(*args, empty_caches(CFG, 2, 6), 0, key_start)
    np.testing.assert_array_equal(got, want)


def test_decoding_params_cast_matrices_once_and_keep_every_norm_float32():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    params = decoding_params(cfg, nnx.to_pure_dict(nnx.state(init_model(cfg, 0))))
    layer = params["layers"][0]
    assert layer["attn"]["qkv"].dtype == layer["mlp"]["down"].dtype == jnp.bfloat16
    assert params["embed"].dtype == params["lm_head"].dtype == jnp.bfloat16
    assert layer["attn_norm"]["scale"].dtype == layer["mlp_norm"]["scale"].dtype == jnp.float32
    assert params["final_norm"]["scale"].dtype == jnp.float32
    assert layer["attn_norm"]["scale"].shape == (cfg.hidden_size,)
