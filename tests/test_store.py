"""Token stores: parallel sharded tokenization, resume after a kill, code trees, chats, packing."""
import json
import signal
import time

import numpy as np
import pytest

from conftest import run_cli
from phijax.data.corpus import plan_shards
from phijax.data.loader import PackedDocuments, Windows, batches
from phijax.data.mixture import BlockMixer
from phijax.data.store import TokenStore, _plan_key, _tokenize_shard, build_store
from phijax.data.tokenizer import Tokenizer, train_tokenizer
from phijax.data.corpus import documents
from test_data import make_store

CHATS = [
    [{"role": "user", "content": f"What is {i} + {i}?"},
     {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}] for i in range(40)
] + [[{"role": "system", "content": "Answer in words."}, {"role": "user", "content": "1+1?"},
      {"role": "assistant", "content": "Two."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "Four, " * 30}]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(documents(["builtin:python-docs"]),
                           tmp_path_factory.mktemp("tok") / "sp", vocab_size=600)
    return Tokenizer(path)


def _same(a: TokenStore, b: TokenStore) -> None:
    np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
    np.testing.assert_array_equal(a.offsets, b.offsets)


def test_parallel_shards_give_the_serial_store_and_keep_code_paths(tokenizer, tmp_path):
    # A code tree: the stdlib's email package, .py files only, read by glob.
    import email
    from pathlib import Path
    tree = str(Path(email.__file__).parent)
    shards = plan_shards([tree], "**/*.py", shard_bytes=20_000)
    assert len(shards) > 4
    serial = TokenStore(build_store([tree], tokenizer, tmp_path / "one", glob="**/*.py",
                                    workers=1, shard_bytes=20_000))
    parallel = TokenStore(build_store([tree], tokenizer, tmp_path / "two", glob="**/*.py",
                                      workers=2, shard_bytes=20_000))
    _same(serial, parallel)
    paths = [json.loads(l)["path"] for l in (tmp_path / "two" / "metadata.jsonl").open()]
    expected = sorted(str(p.relative_to(tree)) for p in Path(tree).glob("**/*.py")
                      if p.read_text().strip())
    assert paths == expected and len(paths) == parallel.documents
    first = parallel.read(0, int(parallel.offsets[1]) - 1).tolist()
    assert tokenizer.decode(first) == (Path(tree) / paths[0]).read_text()


def test_resume_reuses_finished_shards_and_ignores_torn_writes(tokenizer, tmp_path, caplog):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"record {i} " + "words " * (i % 50)}) + "\n"
                              for i in range(3000)))
    whole = TokenStore(build_store([str(corpus)], tokenizer, tmp_path / "whole", workers=1,
                                   shard_bytes=8_000))
    # What a killed run leaves behind: some finished shards and one torn part file.
    shards = plan_shards([str(corpus)], None, 8_000)
    parts = tmp_path / "resumed.partial" / "parts"
    parts.mkdir(parents=True)
    (parts.parent / "plan.json").write_text(json.dumps(_plan_key(shards, tokenizer, "text")))
    for i in range(0, len(shards), 2):
        _tokenize_shard(shards[i], str(tokenizer.path), "text", str(parts / f"{i:06d}"))
    (parts / "000001.npz.tmp").write_bytes(b"torn")
    with caplog.at_level("INFO", logger="phijax"):
        resumed = TokenStore(build_store([str(corpus)], tokenizer, tmp_path / "resumed",
                                         workers=2, shard_bytes=8_000))
    done = (len(shards) + 1) // 2
    assert f"resuming, {done} of {len(shards)} shards already tokenized" in caplog.text
    _same(whole, resumed)
    assert resumed.documents == 3000 and not parts.parent.exists()
    # Unchanged inputs: nothing to do. A changed input: rebuilt.
    caplog.clear()
    with caplog.at_level("INFO", logger="phijax"):
        build_store([str(corpus)], tokenizer, tmp_path / "resumed", workers=1, shard_bytes=8_000)
    assert "is up to date" in caplog.text
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert TokenStore(build_store([str(corpus)], tokenizer, tmp_path / "resumed", workers=1,
                                  shard_bytes=8_000)).documents == 3001


@pytest.mark.slow
def test_tokenize_cli_killed_then_rerun_matches_an_uninterrupted_run(tokenizer, tmp_path):
    corpus = tmp_path / "big.jsonl"
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 40}) + "\n"
    corpus.write_text(line * 60_000)  # ~106 MB
    n = len(plan_shards([str(corpus)]))
    out = tmp_path / "store"
    proc = run_cli("data", "tokenize", corpus, "--tokenizer", tokenizer.path, "--out", out,
                   "--workers", 1, background=True)
    parts = tmp_path / "store.partial" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.json")))
    assert 2 <= done < n and not out.exists()
    again = run_cli("data", "tokenize", corpus, "--tokenizer", tokenizer.path, "--out", out)
    assert f"resuming, {done} of {n} shards" in again.stderr
    store = TokenStore(out)
    assert store.documents == 60_000
    expected = tokenizer.encode([json.loads(line)["text"]])[0] + [tokenizer.eos_id]
    np.testing.assert_array_equal(store.read(0, len(store)),
                                  np.tile(np.array(expected, np.int32), 60_000))


def test_chat_records_keep_an_assistant_only_mask(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    bad = [{"messages": []}, {"messages": [{"role": "user", "content": "no reply"}]},
           {"messages": [{"role": "robot", "content": "x"}]}]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS[:3]) +
                    "".join(json.dumps(b) + "\n" for b in bad))
    store = TokenStore(build_store([str(path)], tokenizer, tmp_path / "s", workers=1))
    assert store.documents == store.manifest["chat_documents"] == 3
    assert store.manifest["skipped"] == {
        "messages is not a non-empty list": 1, "messages has no assistant reply": 1,
        "a message role is not one of system, user, assistant": 1}
    assert store.manifest["skipped_examples"][0] == f"{path}:4: messages is not a non-empty list"
    ids, mask = tokenizer.encode_chat(CHATS[1])
    begin, end = int(store.offsets[1]), int(store.offsets[2])
    np.testing.assert_array_equal(store.read(begin, end), ids + [tokenizer.eos_id])
    np.testing.assert_array_equal(store.read_mask(begin, end), np.append(mask, 0))
    # Windows over a chat store train on assistant tokens only.
    window = Windows(store, 16, 0, (len(store) - 1) // 16)[0]
    on = window["targets"][window["loss_weights"] > 0].tolist()
    assert tokenizer.decode(on) == "0 + 0 = 0.<|im_end|>"[:len(tokenizer.decode(on))]


def test_packed_documents_never_split_a_chat(tokenizer, tmp_path):
    store = make_store(tokenizer, tmp_path / "sft", CHATS)
    seq, pad = 64, tokenizer.pad_id
    packed = PackedDocuments(store, seq, 0, store.documents, pad_id=pad)
    assert packed.truncated == 1  # the long last chat is cut to one row
    lengths = np.minimum(np.diff(store.offsets), seq + 1)
    whole = [store.read(int(o), int(o) + n) for o, n in zip(store.offsets, lengths)]
    epochs = []
    for epoch in range(2):
        seen = []
        for i in range(epoch * len(packed), (epoch + 1) * len(packed)):
            r = packed.row(7, i)
            tokens = np.append(r["tokens"], r["targets"][-1])
            segments = np.append(r["segment_ids"], r["segment_ids"][-1] if tokens[-1] == pad
                                 or tokens[-2] != tokenizer.eos_id else r["segment_ids"][-1] + 1)
            assert (r["loss_weights"][r["targets"] == pad] == 0).all()
            on = np.flatnonzero(r["loss_weights"])
            assert (segments[on] == segments[on + 1]).all()  # never across documents
            for s in np.unique(segments):
                where = np.flatnonzero(segments == s)
                if tokens[where[0]] == pad:
                    assert (tokens[where] == pad).all()
                    continue
                assert (r["positions"][where[where < seq]] == np.arange((where < seq).sum())).all()
                hits = [d for d, doc in enumerate(whole) if np.array_equal(doc, tokens[where])]
                assert hits, "a packed document is not a whole document of the store"
                seen.append(hits[0])
        assert sorted(seen) == list(range(store.documents))  # each chat once per epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # in a fresh order every epoch
    r = packed.row(7, 0)
    trained = r["targets"][r["loss_weights"] > 0].tolist()
    assert "<|im_start|>" not in tokenizer.decode(trained)  # assistant tokens only
    batch = next(batches([packed], BlockMixer([1.0], 0), 4, 7, 0, 1, prefetch=0))
    assert batch["tokens"].shape == (4, seq)
