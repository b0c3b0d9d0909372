"""Tokenizer, token store and the Grain window pipeline."""
import json

import numpy as np
import pytest

from conftest import run_cli
from phijax.data.corpus import Skipped, documents
from phijax.data.loader import Windows, batches, split_windows
from phijax.data.mixture import BlockMixer
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import SPECIALS, Tokenizer, padded_vocab_size, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(documents(["builtin:python-docs"]),
                           tmp_path_factory.mktemp("tok") / "sp", vocab_size=600)
    return Tokenizer(path)


def make_store(tokenizer, path, docs, **kwargs) -> TokenStore:
    """A store from in-memory documents (strings, or message lists for chats)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus = path.with_suffix(".jsonl")
    corpus.write_text("".join(json.dumps({"text": d} if isinstance(d, str) else {"messages": d})
                              + "\n" for d in docs))
    return TokenStore(build_store([str(corpus)], tokenizer, path, workers=1, **kwargs))


def test_tokenizer_has_specials_byte_fallback_and_a_padded_vocabulary(tokenizer):
    assert tokenizer.vocab_size == 640  # 600 trained pieces, padded to a multiple of 128
    assert tokenizer.sp.id_to_piece(639) == "<|dummy_39|>" and tokenizer.sp.is_unused(639)
    for special in SPECIALS:
        assert tokenizer.encode([special])[0] == [tokenizer.sp.piece_to_id(special)]
    text = "déjà vu 🙂 <|im_start|>user<|im_sep|>hi<|im_end|>"
    ids = tokenizer.encode([text])[0]
    assert tokenizer.decode(ids) == text and max(ids) < 600
    assert padded_vocab_size(100_261) == 100_352 and padded_vocab_size(600) == 640


def test_chat_template_masks_assistant_tokens_only(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4, déjà."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"}]
    ids, mask = tokenizer.encode_chat(chat)
    text = ("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>2+2?"
            "<|im_end|><|im_start|>assistant<|im_sep|>4, déjà.<|im_end|><|im_start|>user"
            "<|im_sep|>And 3+3?<|im_end|><|im_start|>assistant<|im_sep|>6<|im_end|>")
    assert ids == tokenizer.encode([text])[0]  # the same ids as encoding the text at inference
    trained = [tokenizer.decode([i for i, m in zip(ids, mask) if m])]
    assert trained == ["4, déjà.<|im_end|>6<|im_end|>"]


def test_store_and_windows(tokenizer, tmp_path):
    docs = ["alpha beta gamma " * 5, "one two three", "x = 1\nprint(x)\n" * 3]
    store = make_store(tokenizer, tmp_path / "store", docs)
    assert store.manifest["documents"] == 3 and store.manifest["chat_documents"] == 0
    assert len(store) == store.offsets[-1] == store.manifest["tokens"]
    tokens = store.read(0, len(store))
    assert all(tokens[o - 1] == tokenizer.eos_id for o in store.offsets[1:])
    assert tokenizer.decode(tokens[:store.offsets[1] - 1].tolist()) == docs[0]
    seq = 16
    source = Windows(store, seq, 0, (len(store) - 1) // seq)
    for i in range(len(source)):
        w = source[i]
        np.testing.assert_array_equal(w["targets"][:-1], w["tokens"][1:])
        starts = np.flatnonzero(np.diff(w["segment_ids"])) + 1
        for start in starts:  # a new document starts at position 0 and the previous EOS is not trained
            assert w["positions"][start] == 0 and w["loss_weights"][start - 1] == 0
            assert w["tokens"][start - 1] == tokenizer.eos_id
        assert w["segment_ids"][0] == 0 and (np.diff(w["segment_ids"]) >= 0).all()


def test_batches_are_a_function_of_seed_and_step(tokenizer, tmp_path):
    store = TokenStore(build_store(["builtin:python-docs"], tokenizer, tmp_path / "s", workers=1))
    ranges = split_windows(store, 32, 0.1)
    source = Windows(store, 32, *ranges["train"])
    full = list(batches([source], BlockMixer([1.0], 1), 4, seed=1, start_step=0, stop_step=6))
    tail = list(batches([source], BlockMixer([1.0], 1), 4, seed=1, start_step=3, stop_step=6))
    for a, b in zip(full[3:], tail):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = next(batches([source], BlockMixer([1.0], 2), 4, seed=2, start_step=0, stop_step=1))
    assert not np.array_equal(other["tokens"], full[0]["tokens"])
    # Two processes each build half of the same global batch.
    mixer = BlockMixer([1.0], 1)
    halves = [next(batches([source], mixer, 4, 1, 0, 1, process_index=p, process_count=2))
              for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), full[0]["tokens"])
    assert ranges["eval"][0] == ranges["train"][1]


def test_every_window_once_per_epoch_in_a_new_order(tokenizer, tmp_path):
    store = make_store(tokenizer, tmp_path / "s", [" ".join(f"w{i}" for i in range(400))])
    source = Windows(store, 8, 0, 16)
    windows = sorted(tuple(source[i]["tokens"]) for i in range(16))
    assert len(set(windows)) == 16  # all distinct, so order and coverage are visible
    stream = batches([source], BlockMixer([1.0], 0), 8, 0, 0, 6, prefetch=0)
    rows = [tuple(r) for b in stream for r in b["tokens"]]
    epochs = [rows[e * 16:(e + 1) * 16] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == windows  # each window exactly once
    assert epochs[0] != epochs[1] != epochs[2]  # in a fresh order each epoch


def test_bad_records_are_skipped_and_named(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{"text": ""}\nnot json\n{"body": "x"}\n'
                     b'{"text": 3}\n\xff\xfe\n{"text": "good two"}\n')
    skipped = Skipped()
    assert list(documents([str(path)], "text", skipped)) == ["good one", "good two"]
    assert skipped.counts == {"empty text": 1, "invalid JSON": 1, "missing field 'text'": 1,
                              "field 'text' is not a string": 1, "invalid UTF-8": 1}
    assert skipped.examples[0] == f"{path}:2: empty text"


@pytest.mark.slow
def test_cli_tokenizer_and_tokenize(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} says hello world"}) + "\n"
                              for i in range(200)) + '{"text": 5}\n')
    run_cli("tokenizer", "train", corpus, "builtin:python-docs", "--out", tmp_path / "sp",
            "--vocab-size", 400)
    out = run_cli("data", "tokenize", corpus, "--tokenizer", tmp_path / "sp.model",
                  "--out", tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["documents"] == 200
    assert manifest["skipped"] == {"field 'text' is not a string": 1}
    assert f"{corpus}:201" in out.stderr
    bad = run_cli("tokenizer", "train", tmp_path / "missing.jsonl", "--out", tmp_path / "x",
                  check=False)
    assert bad.returncode == 2 and "missing.jsonl does not exist" in bad.stderr


@pytest.mark.parametrize("shares", [[0.75, 0.25], [0.97, 0.02, 0.01]])
def test_loader_mixes_sources_by_exact_token_share(tokenizer, tmp_path, shares):
    texts = ["alpha beta gamma delta " * 40, "x = 1\nprint(x)\n" * 40, "7 8 9 " * 60][:len(shares)]
    stores = [make_store(tokenizer, tmp_path / f"s{k}", [t] * 20) for k, t in enumerate(texts)]
    owner = {}  # token -> the one source it occurs in
    for k, st in enumerate(stores):
        for t in set(st.read(0, len(st)).tolist()) - {tokenizer.eos_id}:
            owner[t] = k if owner.get(t, k) == k else -1
    sources = [Windows(st, 8, 0, (len(st) - 1) // 8) for st in stores]
    n_batches = 2000
    counts = np.zeros(len(shares))
    for b in batches(sources, BlockMixer(shares, 0), 8, 0, 0, n_batches, prefetch=4):
        for row in b["tokens"]:
            who = {owner[t] for t in row.tolist() if owner.get(t, -1) >= 0}
            assert len(who) == 1  # each window comes from exactly one source
            counts[who.pop()] += row.size
    np.testing.assert_allclose(counts / counts.sum(), shares, atol=0.005)  # token shares


def test_prompt_ids_are_a_prefix_of_the_rendered_chat(tokenizer):
    user = [{"role": "user", "content": "What is 12 + 30?"}]
    prompt = tokenizer.encode_prompt(user)
    ids, mask = tokenizer.encode_chat(user + [{"role": "assistant", "content": "12 + 30 = 42."}])
    assert ids[:len(prompt)] == prompt and not mask[:len(prompt)].any()
    assert mask[len(prompt):].all() and ids[-1] == tokenizer.im_end_id
