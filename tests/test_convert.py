"""Hugging Face interop: phijax logits equal transformers' Phi3ForCausalLM on the same weights,
and conversions in both directions are exact."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from phijax import convert  # noqa: E402
from phijax.config import MeshConfig  # noqa: E402
from phijax.convert import from_hf, to_hf  # noqa: E402
from phijax.model import init_model  # noqa: E402
from phijax.sharding import make_mesh  # noqa: E402
from phijax.weights import load_params, save_params  # noqa: E402

SEQ = 128  # two query blocks in phijax's attention


def hf_model(heads=4, kv=2, tied=False, head_dim=None, seed=0):
    """A tiny random Phi3ForCausalLM (float32, eager attention), norms and all weights random."""
    extra = {"head_dim": head_dim} if head_dim else {}
    config = transformers.Phi3Config(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
        rope_theta=25000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, pad_token_id=None,
        bos_token_id=None, eos_token_id=None, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else
                    torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def save_hf(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 96, (2, SEQ), dtype=np.int32)


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


def phijax_params(ckpt):
    return load_params(ckpt, make_mesh(MeshConfig(), jax.devices()[:1]))


def phijax_logits(ckpt, toks):
    cfg, params = phijax_params(ckpt)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: init_model(cfg.model, 0)))
    return np.asarray(nnx.merge(graphdef, params)(jax.numpy.asarray(toks)))


CASES = [(heads, kv, None, tied) for heads, kv in ((4, 4), (4, 2), (8, 2))
         for tied in (False, True)] + [(4, 2, 24, False)]  # GQA ratios 1, 2, 4; head_dim != E/H


@pytest.mark.parametrize("heads,kv,head_dim,tied", CASES)
def test_logits_match_transformers(tmp_path, heads, kv, head_dim, tied):
    model = hf_model(heads, kv, tied, head_dim)
    toks = tokens()
    assert not np.array_equal(toks[0], toks[1])
    ckpt = from_hf(save_hf(model, tmp_path / "hf"), tmp_path / "ckpt")
    cfg, _ = phijax_params(ckpt)
    assert (cfg.model.rope_theta, cfg.model.rms_norm_eps, cfg.model.tie_word_embeddings) == \
        (25000.0, 1e-6, tied)
    ours, theirs = phijax_logits(ckpt, toks), hf_logits(model, toks)
    assert ours.shape == theirs.shape == (2, SEQ, 96)
    assert np.abs(theirs).max() > 1.0  # not a trivially small comparison
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, tied):
    model = hf_model(8, 2, tied)
    src = save_hf(model, tmp_path / "hf")
    ckpt = from_hf(src, tmp_path / "ckpt")
    out = to_hf(ckpt, tmp_path / "back")
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    # transformers reads our config.json and weights back into the same model
    back = transformers.Phi3ForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert back.config.tie_word_embeddings == tied
    toks = tokens(1)
    np.testing.assert_array_equal(hf_logits(back, toks), hf_logits(model, toks))


def test_bfloat16_round_trip_is_bitwise(tmp_path):
    model = hf_model(4, 2).to(torch.bfloat16)
    src = save_hf(model, tmp_path / "hf")
    ckpt = from_hf(src, tmp_path / "ckpt")
    out = to_hf(ckpt, tmp_path / "back", dtype="bfloat16")
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert b[name].dtype == torch.bfloat16 and torch.equal(a[name], b[name]), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_round_trip_of_our_params(tmp_path):
    """from_hf . to_hf is the identity on our params, through a sharded HF directory."""
    cfg, _ = phijax_params(from_hf(save_hf(hf_model(4, 2), tmp_path / "hf"), tmp_path / "c0"))
    params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, seed=3)))
    ckpt = save_params(tmp_path / "ckpt", cfg, params)
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "model.safetensors").write_bytes(b"stale")  # removed by to_hf
    out = to_hf(ckpt, tmp_path / "back", max_shard_gb=40e-6)  # 40 kB shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert not list(out.glob("*.tmp"))
    _, again = phijax_params(from_hf(out, tmp_path / "again"))
    flat_a, flat_b = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(again)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    # transformers loads the sharded directory too
    transformers.Phi3ForCausalLM.from_pretrained(out)


BAD = [
    ({"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 40}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "rope_parameters.rope_type"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}},
     "rope_parameters.partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
]


@pytest.mark.parametrize("change,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_fails_in_one_line_before_reading_tensors(tmp_path, change, key):
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "phi3", "vocab_size": 96, "hidden_size": 64,
              "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4}
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError) as e:
        from_hf(hf, tmp_path / "ckpt")
    msg = str(e.value)
    assert "\n" not in msg and key in msg and len(msg) < 200, msg
    assert not (tmp_path / "ckpt").exists()


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    src = save_hf(hf_model(4, 2), tmp_path / "hf")
    tensors = {k: v.numpy() for k, v in load_file(src / "model.safetensors").items()}

    def rewrite(ts):
        save_file(ts, src / "model.safetensors", metadata={"format": "pt"})

    rewrite({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.rotary_emb"):
        from_hf(src, tmp_path / "ckpt")
    rewrite({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"})
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.down_proj.weight"):
        from_hf(src, tmp_path / "ckpt")
    rewrite({**tensors, "model.norm.weight": np.ones(63, np.float32)})
    with pytest.raises(ValueError, match=r"model.norm.weight is F32 \[63\], expected \[64\]"):
        from_hf(src, tmp_path / "ckpt")
    rewrite({**tensors, "model.norm.weight": np.ones(64, np.int32)})
    with pytest.raises(ValueError, match=r"model.norm.weight is I32 \[64\], expected \[64\]"):
        from_hf(src, tmp_path / "ckpt")
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(ValueError) as e:
        from_hf(src, tmp_path / "ckpt")
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors: not a readable safetensors file" in msg, msg
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_shard_write_leaves_the_old_file(tmp_path, monkeypatch):
    ckpt = from_hf(save_hf(hf_model(4, 2), tmp_path / "hf"), tmp_path / "ckpt")
    out = to_hf(ckpt, tmp_path / "back")
    before = (out / "model.safetensors").read_bytes()

    def half_then_fail(tensors, path, metadata=None):
        save_file(dict(list(tensors.items())[:2]), path, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        to_hf(ckpt, out, dtype="bfloat16")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
