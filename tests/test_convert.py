"""Hugging Face interop: phijax logits equal transformers' Phi3ForCausalLM on the same weights,
conversions in both directions are exact, and the tokenizer travels with the weights (a
converted checkpoint samples text; an exported one loads in AutoTokenizer with the same ids)."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import run_cli  # noqa: E402
from hf_tokenizers import CHAT, TEXTS, phi4_like, sentencepiece_model  # noqa: E402
from phijax import convert  # noqa: E402
from phijax.config import MeshConfig  # noqa: E402
from phijax.convert import from_hf, to_hf  # noqa: E402
from phijax.model import init_model  # noqa: E402
from phijax.sharding import make_mesh  # noqa: E402
from phijax.weights import load_params, save_params  # noqa: E402

SEQ = 128  # two query blocks in phijax's attention
# most conversions here are of weights alone: that they carry no tokenizer is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer:UserWarning")


def hf_model(heads=4, kv=2, tied=False, head_dim=None, seed=0, vocab=96):
    """A tiny random Phi3ForCausalLM (float32, eager attention), norms and all weights random."""
    extra = {"head_dim": head_dim} if head_dim else {}
    config = transformers.Phi3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
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
    assert sorted(p.name for p in out.iterdir()) == \
        ["config.json", "generation_config.json", "model.safetensors"]


# ---------------------------------------------------------------- tokenizers

TINY = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def sentencepiece_run(tmp_path):
    """A run directory as training leaves it: random weights and a sentencepiece tokenizer."""
    from phijax.config import Config, ModelConfig
    from phijax.data.tokenizer import load_tokenizer, save_tokenizer

    tok = load_tokenizer(sentencepiece_model(tmp_path / "sp"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, **TINY)
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, seed=5)))
    run = save_params(tmp_path / "run", Config(model=cfg), params)
    save_tokenizer(tok, run)
    return run, tok


def test_sentencepiece_run_round_trips_through_hf_with_its_tokenizer(tmp_path):
    from phijax.data.tokenizer import HFTokenizer, load_tokenizer

    run, sp = sentencepiece_run(tmp_path)
    out = to_hf(run, tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    ids = (sp.eos_id, sp.im_end_id, sp.pad_id)  # bos, eos, pad as phi-4 names them
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == ids
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == ids
    assert (generation["bos_token_id"], generation["pad_token_id"]) == (ids[0], ids[2])
    assert generation["eos_token_id"] == list(sp.stop_ids) == [sp.im_end_id, sp.eos_id]
    for text in TEXTS:
        assert auto(text)["input_ids"] == sp.encode([text])[0], text
    assert auto.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] == sp.encode_prompt(CHAT[:2])
    back = from_hf(out, tmp_path / "back")
    tok = load_tokenizer(back)
    assert type(tok) is HFTokenizer and (back / "tokenizer_config.json").is_file()
    for text in TEXTS:
        assert tok.encode([text])[0] == sp.encode([text])[0], text
    assert tok.encode_chat(CHAT)[0] == sp.encode_chat(CHAT)[0]
    toks = np.array([sp.encode([" ".join(TEXTS)])[0][:SEQ]] * 2, np.int32)
    ours = phijax_logits(run, toks)
    np.testing.assert_array_equal(phijax_logits(back, toks), ours)
    model = transformers.Phi3ForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(model, toks), ours, rtol=0, atol=1e-4)


def test_hf_greedy_generation_equals_phijax_greedy_sampling(tmp_path):
    from phijax.sampling import Request, load_sampler

    run, tok = sentencepiece_run(tmp_path)
    out = to_hf(run, tmp_path / "hf")
    model = transformers.Phi3ForCausalLM.from_pretrained(out, attn_implementation="eager")
    sampler, tokenizer = load_sampler(run)
    for prompt in (tok.encode(["def f(x):\n    return"])[0], tok.encode_prompt(CHAT[:2])):
        ours = sampler.generate([Request(prompt, max_new_tokens=40, temperature=0.0,
                                         stop_ids=tokenizer.stop_ids)])[0][0]
        with torch.no_grad():  # generation_config.json: greedy stops at the same ids
            theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40)
        assert ours.tokens == theirs[0, len(prompt):].tolist()  # token for token


def test_from_hf_of_a_phi4_like_directory_samples_text_and_renders_chats(tmp_path):
    from phijax.data.tokenizer import HFTokenizer
    from phijax.sampling import Request, load_sampler

    src = phi4_like(tmp_path / "hf")
    model = hf_model()  # vocab 96: smaller than the tokenizer's 408
    with pytest.raises(ValueError, match="408 tokens, more than config.json's vocab_size 96"):
        from_hf(save_hf(model, src), tmp_path / "small")
    model = hf_model(vocab=512)  # padded past the tokenizer, as phi-4's 100,352
    save_hf(model, src)
    ckpt = from_hf(src, tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ckpt / name).read_bytes() == (src / name).read_bytes(), name
    sampler, tok = load_sampler(ckpt)
    assert type(tok) is HFTokenizer and sampler.vocab_limit == tok.vocab_size == 408
    auto = transformers.AutoTokenizer.from_pretrained(src)
    prompt = tok.encode_prompt(CHAT[:2])
    assert prompt == auto.apply_chat_template(CHAT[:2], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(prompt) == "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>" \
        "user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>"
    (sample,) = sampler.generate([Request(prompt, max_new_tokens=12, temperature=0.0,
                                          stop_ids=tok.stop_ids)])[0]
    assert isinstance(tok.decode(sample.tokens), str) and max(sample.tokens) < 408
    out = run_cli("sample", ckpt, "--prompt", "def f(x):", "--max-new-tokens", "8",
                  "--temperature", "0")
    assert "--- sample 1/1: 8 tokens" in out.stdout or "finish stop" in out.stdout, out.stdout
    back = to_hf(ckpt, tmp_path / "back")  # the tokenizer's own files go back as they came
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    assert transformers.AutoTokenizer.from_pretrained(back)("déjà 12")["input_ids"] == \
        tok.encode(["déjà 12"])[0]


def test_sft_from_a_converted_checkpoint_tokenizes_chats_with_its_tokenizer(tmp_path):
    from phijax.config import Config
    from phijax.data.prepare import prepare
    from phijax.data.tokenizer import HFTokenizer
    from phijax.train.tasks import check_init_from
    from phijax.weights import load_config

    src = phi4_like(tmp_path / "hf")
    ckpt = from_hf(save_hf(hf_model(vocab=512), src), tmp_path / "ckpt")
    cfg = Config(model=load_config(ckpt).model)
    cfg.run.init_from = str(ckpt)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text(json.dumps({"messages": CHAT}) + "\n")
    cfg.data.corpus, cfg.data.cache_dir = [str(corpus)], str(tmp_path / "cache")
    check_init_from(cfg)
    assert cfg.data.tokenizer == str(ckpt / "tokenizer.json")
    tok, _, (store,) = prepare(cfg.data)
    assert type(tok) is HFTokenizer and store.manifest["tokenizer_hash"] == tok.hash
    ids, mask = tok.encode_chat(CHAT)
    assert store.read(0, len(store)).tolist() == ids + [tok.eos_id]
    assert store.read_mask(0, len(store)).tolist() == mask.tolist() + [0]


def test_prompt_ids_sample_a_checkpoint_converted_without_a_tokenizer(tmp_path):
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        ckpt = from_hf(save_hf(hf_model(), tmp_path / "hf"), tmp_path / "ckpt")
    out = run_cli("sample", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                  "--temperature", "0")
    ids = out.stdout.strip().splitlines()[-1].split(",")
    assert len(ids) == 5 and all(0 <= int(i) < 96 for i in ids), out.stdout
    out = run_cli("sample", ckpt, "--prompt", "hello", check=False)
    assert out.returncode == 2 and "no tokenizer.model or tokenizer.json" in out.stderr


@pytest.mark.parametrize("object_store", ["s3"], indirect=True)
def test_hf_round_trip_through_a_bucket_is_bitwise(object_store, tmp_path):
    """An HF directory in a bucket -> a run directory in the bucket -> an HF directory in the
    bucket: the same tensors and config as the local round trip."""
    from phijax import paths
    src = save_hf(hf_model(8, 2, False), tmp_path / "hf")
    paths.upload_tree(src, f"{object_store}/hf")
    ckpt = from_hf(f"{object_store}/hf", f"{object_store}/ckpt")
    assert str(ckpt) == f"{object_store}/ckpt"
    paths.write_text(f"{object_store}/back/model-00001-of-00009.safetensors", "stale")
    assert to_hf(ckpt, f"{object_store}/back") == f"{object_store}/back"
    back = paths.download_tree(f"{object_store}/back")
    assert sorted(p.name for p in back.iterdir()) == ["config.json", "generation_config.json",
                                                      "model.safetensors"]  # stale shard gone
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((back / "config.json").read_text()) == \
        json.loads(to_hf(from_hf(src, tmp_path / "ckpt"), tmp_path / "local").joinpath(
            "config.json").read_text())
