"""`phijax data tokenize --shared`: several worker processes build one store, each claiming shards;
a killed worker's claims are taken over; the store is the one a single worker builds."""
import json
import re
import signal
import time

import numpy as np
import pytest

from conftest import run_cli
from phijax import paths
from phijax.data.corpus import documents, plan_shards
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import Tokenizer, train_tokenizer



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(documents(["builtin:python-docs"]),
                           tmp_path_factory.mktemp("tok") / "sp", vocab_size=600)
    return Tokenizer(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for f in range(8):
        rows = [{"text": f"file {f} record {i}: " + "tokens of text " * (i % 40)}
                for i in range(2000)]
        rows[7] = {"no_text": 1}  # skipped, and counted in the manifest
        (root / f"{f:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(plan_shards([str(root)])) > 16
    return root


@pytest.fixture(scope="module")
def one_worker(corpus, tokenizer, tmp_path_factory) -> TokenStore:
    return TokenStore(build_store([str(corpus)], tokenizer,
                                  tmp_path_factory.mktemp("one") / "store", workers=1))


def tokenize(corpus, tokenizer, out, *flags, **popen):
    return run_cli("data", "tokenize", corpus, "--tokenizer", tokenizer.path, "--out", out,
                   "--shared", "--workers", 1, *flags, **popen)


def assert_same(store: TokenStore, expected: TokenStore) -> None:
    np.testing.assert_array_equal(store.read(0, len(store)), expected.read(0, len(expected)))
    np.testing.assert_array_equal(store.offsets, expected.offsets)
    assert store.manifest == expected.manifest  # documents, tokens, skipped, plan


def shares(outputs: list[str]) -> list[int]:
    """The shards each worker tokenized (0 for one that started after the store was built)."""
    found = [re.search(r"this worker tokenized (\d+) of", o) for o in outputs]
    assert all(m or "is up to date" in o for m, o in zip(found, outputs)), outputs
    return [int(m.group(1)) if m else 0 for m in found]


def test_two_workers_build_the_one_worker_store_each_shard_once(corpus, tokenizer, one_worker,
                                                                tmp_path):
    out = tmp_path / "store"
    procs = [tokenize(corpus, tokenizer, out, "--poll", 0.2, background=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert_same(TokenStore(out), one_worker)
    assert sum(shares(outputs)) == len(plan_shards([str(corpus)]))  # each shard once
    assert sum("shards and assembled the store" in o for o in outputs) == 1
    assert not (tmp_path / "store.partial").exists()
    again = tokenize(corpus, tokenizer, out)
    assert "is up to date" in again.stderr


def in_flight(work) -> set[str]:
    """Shards claimed in `work` (OUT.partial) whose part is not done."""
    claimed = {p.name[:6] for p in work.glob("*/claims/[0-9]*.json")}
    return claimed - {p.name[:6] for p in work.glob("*/parts/*.json")}


def test_a_killed_workers_shard_is_taken_over_and_the_store_is_the_same(corpus, tokenizer,
                                                                        one_worker, tmp_path):
    out, work = tmp_path / "store", tmp_path / "store.partial"
    first = tokenize(corpus, tokenizer, out, "--stale-after", 2, background=True)
    deadline = time.time() + 60
    while time.time() < deadline and first.poll() is None:
        if len(list(work.glob("*/parts/*.json"))) >= 2 and in_flight(work):
            first.send_signal(signal.SIGSTOP)  # look again while it cannot move
            if in_flight(work):
                break
            first.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL  # killed mid-way, not finished
    orphan = in_flight(work)
    assert len(orphan) == 1 and not out.exists()

    other = tokenize(corpus, tokenizer, out, "--text-field", "body", check=False)
    assert other.returncode == 2  # its heartbeat is recent: another plan must not start over
    assert "are tokenizing other inputs into this store" in other.stderr.splitlines()[-1]

    second = tokenize(corpus, tokenizer, out, "--stale-after", 2, "--poll", 0.2)
    shard = int(orphan.pop())
    assert re.search(rf"shard {shard}: taken over from \S+:{first.pid}", second.stderr)
    n = len(plan_shards([str(corpus)]))
    assert 2 <= n - shares([second.stderr])[0] < n
    assert_same(TokenStore(out), one_worker)
    assert not work.exists()


@pytest.mark.parametrize("object_store", ["s3"], indirect=True)
def test_two_workers_build_one_store_in_a_bucket(object_store, corpus, tokenizer, one_worker):
    out = f"{object_store}/stores/corpus"
    procs = [tokenize(corpus, tokenizer, out, "--poll", 0.2, background=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum(shares(outputs)) == len(plan_shards([str(corpus)]))
    assert_same(TokenStore(out), one_worker)
    assert paths.listdir(f"{object_store}/stores") == ["corpus"]  # corpus.partial removed
    assert paths.listdir(out) == ["manifest.json", "offsets", "tokens"]
