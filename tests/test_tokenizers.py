"""Tokenizers: sentencepiece and Hugging Face tokenizer.json behind one interface, chat templates
rendered like transformers renders them, the assistant-only loss mask, a sentencepiece model
exported as a tokenizer.json that encodes to the same ids, and a run directory's copy."""
import json
import random
import shutil

import numpy as np
import pytest

from conftest import run_cli
from hf_tokenizers import CHAT, TEXTS, phi4_like, sentencepiece_model
from phijax.data.chat import PHI4_TEMPLATE, compile_template, render_chat
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, Tokenizer, find_tokenizer,
                                   load_tokenizer, save_tokenizer)
from phijax.errors import ConfigError, DataError

transformers = pytest.importorskip("transformers")


def auto_tokenizer(folder):
    """transformers' AutoTokenizer on `folder`, beside a Phi3 config.json as a model has."""
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text(json.dumps({"model_type": "phi3", "vocab_size": 1024}))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return load_tokenizer(sentencepiece_model(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def phi4_dir(tmp_path_factory):
    return phi4_like(tmp_path_factory.mktemp("phi4"))


@pytest.fixture(scope="module")
def hf(phi4_dir):
    return load_tokenizer(phi4_dir)


@pytest.fixture(scope="module")
def exported(sp, tmp_path_factory):
    """The sentencepiece tokenizer's Hugging Face files, in a directory of their own."""
    folder = tmp_path_factory.mktemp("exported")
    for name, data in sp.hf_files().items():
        (folder / name).write_bytes(data)
    return folder


def random_texts(n=3000, seed=0):
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz     \n\t0123456789.,;:()[]{}=+-_'\"ABCXYZéü中🙂<|>"
    words = " ".join(TEXTS).split()
    return [("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) if k % 2 else
             " ".join(rng.choice(words) for _ in range(rng.randint(1, 15)))) for k in range(n)]


def test_load_tokenizer_picks_the_implementation_from_the_path(sp, phi4_dir, tmp_path):
    assert isinstance(sp, SentencePieceTokenizer) and sp.path.suffix == ".model"
    assert type(load_tokenizer(phi4_dir)) is HFTokenizer
    assert type(Tokenizer(phi4_dir / "tokenizer.json")) is HFTokenizer  # Tokenizer(path) too
    both = tmp_path / "both"
    shutil.copytree(phi4_dir, both)
    shutil.copy(sp.path, both / "tokenizer.model")
    assert type(load_tokenizer(both)) is HFTokenizer  # tokenizer.json wins
    (both / "tokenizer.json").unlink()
    assert type(load_tokenizer(both)) is SentencePieceTokenizer
    for path, error, words in [(tmp_path / "nothing", ConfigError, "does not exist"),
                               (tmp_path, ConfigError, "no tokenizer.json or tokenizer.model")]:
        with pytest.raises(error, match=words):
            load_tokenizer(path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "BPE"')
    with pytest.raises(DataError, match=f"tokenizer {bad}: not a tokenizers tokenizer.json"):
        load_tokenizer(bad)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    shutil.copy(phi4_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    assert "tokenizer_config.json: not JSON" in str(e.value) and "\n" not in str(e.value)


def test_hf_tokenizer_encodes_decodes_and_names_its_ids_like_transformers(hf, phi4_dir):
    auto = auto_tokenizer(phi4_dir)
    for text in TEXTS + random_texts(500):
        ids = hf.encode([text])[0]
        assert ids == auto(text)["input_ids"], text
        assert hf.decode(ids) == text == auto.decode(ids)
        assert b"".join(hf.token_bytes(i) for i in ids) == text.encode()
    assert hf.vocab_size == len(auto) == 400 + 8
    vocab = auto.get_vocab()
    assert (hf.eos_id, hf.pad_id, hf.im_end_id) == \
        (vocab["<|endoftext|>"], vocab["<|dummy_0|>"], vocab["<|im_end|>"])
    assert hf.stop_ids == (vocab["<|im_end|>"], vocab["<|endoftext|>"]) == \
        (auto.eos_token_id, auto.bos_token_id)
    assert [a.tolist() for a in hf.encode_arrays(TEXTS)] == hf.encode(TEXTS, num_threads=0)
    assert hf.token_bytes(hf.vocab_size + 5) == b""


# newlines (trim_blocks drops the one after a block tag), bos_token, loop controls, a
# {% generation %} block, and a turn closed by a newline after <|im_end|>
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
    "{% endif %}\n<|im_start|>{{ m['role'] }}\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")


@pytest.mark.parametrize("template", [None, LLAMA_STYLE], ids=["phi-4", "llama-style"])
def test_chat_templates_render_like_transformers_and_mask_assistant_turns(tmp_path, template):
    folder = phi4_like(tmp_path / "tok", **({"template": template} if template else {}))
    tok, auto = load_tokenizer(folder), auto_tokenizer(folder)
    ids, mask = tok.encode_chat(CHAT)
    assert tok.render(CHAT) == auto.apply_chat_template(CHAT, tokenize=False)
    assert ids == list(auto.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    prompt = tok.encode_prompt(CHAT[:2])
    assert prompt == list(auto.apply_chat_template(
        CHAT[:2], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert ids[:len(prompt)] == prompt and not mask[:len(prompt)].any()
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    closing = "<|im_end|>" if template is None else "<|im_end|>\n"
    assert trained == f"4, déjà.{closing}6 🙂{closing}"


def test_template_sources_and_bad_templates_as_one_line_errors(tmp_path):
    broken = load_tokenizer(phi4_like(tmp_path / "a", template="{% for m in messages %}"))
    with pytest.raises(DataError, match="tokenizer_config.json: chat_template does not compile"):
        broken.encode_prompt(CHAT[:2])
    raising = load_tokenizer(phi4_like(tmp_path / "b", template="{{ raise_exception('no') }}"))
    with pytest.raises(DataError, match="chat_template: no"):
        raising.encode_chat(CHAT)
    reordered = load_tokenizer(phi4_like(  # earlier turns render differently later on
        tmp_path / "c", template="{{ messages | length }}{% for m in messages %}{{ m.content }}"
        "{% endfor %}"))
    with pytest.raises(DataError, match="does not render a chat's earlier turns as a prefix"):
        reordered.encode_chat(CHAT)
    (tmp_path / "d").mkdir()
    shutil.copy(tmp_path / "a" / "tokenizer.json", tmp_path / "d" / "tokenizer.json")
    (tmp_path / "d" / "tokenizer_config.json").write_text("{}")
    plain = load_tokenizer(tmp_path / "d")  # no template, phi-4's specials: phi-4's format
    assert plain.render(CHAT) == render_chat(CHAT)[0]
    (tmp_path / "d" / "chat_template.jinja").write_text(  # where transformers 5 saves it
        "{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert load_tokenizer(tmp_path / "d").render(CHAT[:2]) == "[Be brief.][2+2?]"


def test_sentencepiece_export_encodes_to_the_same_ids(sp, exported):
    back, auto = load_tokenizer(exported), auto_tokenizer(exported)
    assert type(back) is HFTokenizer and back.vocab_size == sp.vocab_size == len(auto)
    for text in TEXTS + random_texts():
        ids = sp.encode([text])[0]
        assert back.encode([text])[0] == ids == auto(text)["input_ids"], text
        assert back.decode(ids) == sp.decode(ids)
    for i in range(sp.vocab_size):  # byte fallback: no <unk>; the dummies pad the vocabulary
        if not (sp.sp.is_unused(i) or sp.sp.is_unknown(i)):
            assert back.token_bytes(i) == sp.token_bytes(i), i
    assert (back.eos_id, back.pad_id, back.stop_ids) == (sp.eos_id, sp.pad_id, sp.stop_ids)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == \
        (sp.eos_id, sp.im_end_id, sp.pad_id)
    assert back.encode_chat(CHAT)[0] == sp.encode_chat(CHAT)[0]
    np.testing.assert_array_equal(back.encode_chat(CHAT)[1], sp.encode_chat(CHAT)[1])
    assert auto.apply_chat_template(CHAT, tokenize=False) == render_chat(CHAT)[0]


def test_phi4_template_with_jinja_is_render_chat():
    render = compile_template(PHI4_TEMPLATE, {}, "test")
    assert render(CHAT, False) == render_chat(CHAT)[0]
    assert render(CHAT[:2], True) == render_chat(CHAT[:2])[0] + "<|im_start|>assistant<|im_sep|>"


def test_save_and_find_tokenizer_in_a_run_directory(sp, hf, phi4_dir, tmp_path):
    run = tmp_path / "run"
    assert find_tokenizer(tmp_path) is None
    assert save_tokenizer(sp.path, run) == run / "tokenizer.model" == find_tokenizer(run)
    assert load_tokenizer(run).hash == sp.hash
    (phi4_dir / "chat_template.jinja").write_text("{{ 'x' }}")  # copied along where present
    try:
        assert save_tokenizer(hf, run) == run / "tokenizer.json" == find_tokenizer(run)
    finally:
        (phi4_dir / "chat_template.jinja").unlink()
    assert sorted(p.name for p in run.iterdir()) == \
        ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    copy = load_tokenizer(find_tokenizer(run))
    assert copy.hash != hf.hash  # chat_template.jinja is part of it
    save_tokenizer(phi4_dir / "tokenizer.json", run)
    assert not (run / "chat_template.jinja").exists()
    assert load_tokenizer(run).hash == hf.hash  # a content hash: the copy's is the source's
    assert save_tokenizer(run, run) == run / "tokenizer.json"  # onto itself: unchanged
    assert load_tokenizer(run).hash == hf.hash


def test_a_store_built_with_a_hf_tokenizer(hf, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"text": t} for t in TEXTS if t] * 20 + [{"messages": CHAT}] * 20
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = build_store([str(corpus)], hf, tmp_path / "store", workers=2, shard_bytes=2000)
    store = TokenStore(path)
    assert store.manifest["tokenizer_hash"] == hf.hash and store.manifest["chat_documents"] == 20
    first = store.read(int(store.offsets[0]), int(store.offsets[1])).tolist()
    assert first == hf.encode([docs[0]["text"]])[0] + [hf.eos_id]


@pytest.mark.slow
def test_data_tokenize_takes_a_hf_tokenizer_directory(phi4_dir, tmp_path):
    out = run_cli("data", "tokenize", "builtin:python-docs", "--tokenizer", phi4_dir,
                  "--out", tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["tokenizer_hash"] == load_tokenizer(phi4_dir).hash, out.stderr


def test_only_sentencepiece_models_trained_like_phijax_export(tmp_path):
    import io

    import sentencepiece as spm

    from hf_tokenizers import train_texts
    from phijax.data.tokenizer import SPECIALS

    model = io.BytesIO()  # the default normalization: a dummy prefix, NFKC, no extra spaces
    lines = [line for doc in train_texts() for line in doc.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   model_type="bpe", vocab_size=400, byte_fallback=True,
                                   user_defined_symbols=list(SPECIALS), minloglevel=2)
    (tmp_path / "other.model").write_bytes(model.getvalue())
    with pytest.raises(DataError, match="only a BPE model trained like `phijax tokenizer"):
        load_tokenizer(tmp_path / "other.model").hf_files()


def test_a_bare_tokenizer_json_exports_with_its_eos_and_pad(phi4_dir, tmp_path):
    """A tokenizer.json with no tokenizer_config.json beside it: the export names the tokens
    phijax uses (<|endoftext|> ends a document), so AutoTokenizer knows eos and pad."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(phi4_dir / "tokenizer.json", bare / "tokenizer.json")
    tok = load_tokenizer(bare)
    out = tmp_path / "out"
    out.mkdir()
    for name, data in tok.hf_files().items():
        (out / name).write_bytes(data)
    auto = auto_tokenizer(out)
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == tok.eos_id
    assert auto.pad_token_id == tok.pad_id
    assert auto.encode(TEXTS[0]) == tok.encode([TEXTS[0]])[0]
