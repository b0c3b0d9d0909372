"""Run directories and token stores in a bucket: gs:// and s3:// URLs through phijax.paths, Orbax
and TensorStore, against S3 (moto server) and GCS (fake-gcs-server) emulators on loopback, with
the clients users run (s3fs / gcsfs, TensorStore's s3 and gcs drivers)."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, run_cli
from phijax import paths

TINY = ROOT / "configs" / "tiny.yaml"
# configs/tiny.yaml on random tokens: 12 steps, a checkpoint every 4, a log line every 2.
SHORT = ["data.synthetic=true", "train.steps=12", "train.log_every=2", "checkpoint.every=4",
         "train.eval_every=1000"]


def losses(text: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines())}


def test_paths_read_write_list_and_create_once(object_store):
    run = f"{object_store}/run"
    assert not paths.exists(run) and paths.listdir(run) == []
    paths.write_text(f"{run}/config.yaml", "a: 1\n")
    paths.write_bytes(f"{run}/sub/x.bin", b"\x00\x01")
    assert paths.read_text(f"{run}/config.yaml") == "a: 1\n"
    assert paths.listdir(run) == ["config.yaml", "sub"]
    assert paths.create_if_absent(f"{run}/lock", "first") is True
    assert paths.create_if_absent(f"{run}/lock", "second") is False  # refused by the store
    assert paths.read_text(f"{run}/lock") == "first"
    paths.remove(run, recursive=True)
    assert not paths.exists(run)


def test_create_if_absent_has_one_winner_locally(tmp_path):
    results = []

    def claim(i):
        results.append((paths.create_if_absent(tmp_path / "locks" / "cell", f"worker {i}"), i))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for won, i in results if won]
    assert len(winners) == 1
    assert (tmp_path / "locks" / "cell").read_text() == f"worker {winners[0]}"
    assert [p.name for p in (tmp_path / "locks").iterdir()] == ["cell"]  # no temporary left


def test_tensorstore_kvstore_of_a_url_reads_ranges(object_store):
    import tensorstore as ts
    spec = {"driver": "zarr3", "kvstore": paths.kvstore(f"{object_store}/arrays/a"),
            "metadata": {"shape": [10_000], "data_type": "uint32"}}
    ts.open(spec, create=True).result()[:].write(np.arange(10_000, dtype=np.uint32)).result()
    array = ts.open({"driver": "zarr3", "kvstore": paths.kvstore(f"{object_store}/arrays/a")})
    np.testing.assert_array_equal(array.result()[4321:4330].read().result(),
                                  np.arange(4321, 4330))


def test_evaluation_outputs_in_a_bucket_compare_paired(object_store):
    from phijax.eval.report import compare, write_results

    def results(scores):
        n, mean = len(scores), sum(scores) / len(scores)
        records = [{"id": i, "score": s} for i, s in enumerate(scores)]
        return {"arith": ({"accuracy": {"value": mean, "stderr": 0.1, "n": n}}, records)}

    write_results(f"{object_store}/eval/a", results([1, 0, 0, 1]), {"step": 1})
    write_results(f"{object_store}/eval/b", results([1, 1, 0, 1]), {"step": 2})
    assert paths.listdir(f"{object_store}/eval/a") == ["items", "results.json"]
    _, rows = compare([f"{object_store}/eval/a", f"{object_store}/eval/b"])
    diff, stderr = rows[0]["diffs"][0]
    assert diff == pytest.approx(0.25)
    assert stderr == pytest.approx(np.std([0, 1, 0, 0]) / 2)  # paired: the items were read back


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("local") / "run"
    run_cli("train", TINY, *SHORT, f"run.dir={run}")
    return losses((run / "metrics.jsonl").read_text())


@pytest.mark.slow
def test_run_dir_in_a_bucket_killed_and_resumed_matches_an_uninterrupted_run(
        object_store, uninterrupted):
    run = f"{object_store}/runs/tiny"
    proc = run_cli("train", TINY, *SHORT, f"run.dir={run}", background=True)
    deadline = time.monotonic() + 300
    while not paths.exists(f"{run}/checkpoints/4/commit_success.txt") and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at step 4"  # committed: Orbax's mark
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out  # killed mid-run, not finished
    assert not Path(ROOT / f"{object_store.split(':')[0]}:").exists()  # no local "s3:" folder

    resumed = run_cli("train", TINY, *SHORT, f"run.dir={run}")
    start = int(resumed.stderr.split("resumed from step ")[1].split()[0])
    assert 4 <= start < 12
    got = losses(paths.read_text(f"{run}/metrics.jsonl"))  # + the first step after resuming
    assert {step: got[step] for step in uninterrupted} == uninterrupted
    assert set(got) - set(uninterrupted) <= {start + 1}
    assert {"8", "12"} <= set(paths.listdir(f"{run}/checkpoints"))
    assert paths.exists(f"{run}/config.yaml")
    assert [n for n in paths.listdir(f"{run}/tensorboard") if n.startswith("events.out")]


def test_unreachable_bucket_is_one_line_before_any_compile(object_store):
    missing = f"{object_store.split('://')[0]}://phijax-no-such-bucket/run"
    start = time.monotonic()
    out = run_cli("train", TINY, "data.synthetic=true", f"run.dir={missing}", check=False)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"phijax: error: run.dir {missing}: cannot write there (no such bucket)"
    assert "step" not in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - start < 60


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from phijax.data.corpus import documents
    from phijax.data.tokenizer import Tokenizer, train_tokenizer
    path = train_tokenizer(documents(["builtin:python-docs"]),
                           tmp_path_factory.mktemp("tok") / "tok", vocab_size=512, multiple=128)
    return Tokenizer(path)


def test_token_store_built_into_a_bucket_reads_as_the_local_one(object_store, tokenizer,
                                                                 tmp_path):
    from phijax.data.store import TokenStore, build_store

    store = f"{object_store}/stores/python-docs"
    remote = TokenStore(build_store(["builtin:python-docs"], tokenizer, store, workers=1))
    here = TokenStore(build_store(["builtin:python-docs"], tokenizer, tmp_path / "s", workers=1))
    assert paths.listdir(store) == ["manifest.json", "offsets", "tokens"]
    assert len(remote) == len(here) > 10_000
    np.testing.assert_array_equal(remote.offsets, here.offsets)
    np.testing.assert_array_equal(remote.read(5_000, 5_129), here.read(5_000, 5_129))
    before = bytes_read(object_store)
    np.testing.assert_array_equal(remote.read(200_000, 200_129), here.read(200_000, 200_129))
    assert bytes_read(object_store) - before < 4 * len(remote) / 10  # ranged: not the object
    assert TokenStore(build_store(["builtin:python-docs"], tokenizer, store)).manifest == \
        remote.manifest  # up to date: not rebuilt


def bytes_read(url: str) -> int:
    """Bytes TensorStore has read so far from the store of `url`'s scheme."""
    import tensorstore as ts
    name = f"/tensorstore/kvstore/{'gcs' if url.startswith('gs') else 's3'}/bytes_read"
    found = ts.experimental_collect_matching_metrics(name)
    return sum(v["value"] for m in found if m["name"] == name for v in m["values"])


@pytest.mark.slow
@pytest.mark.parametrize("object_store", ["s3"], indirect=True)
def test_training_from_token_stores_and_a_tokenizer_in_a_bucket(object_store, tokenizer,
                                                                tmp_path):
    """A mixture of a store built into the bucket and a corpus whose store the run caches in the
    bucket (data.cache_dir), the tokenizer read from the bucket, the run directory there too."""
    from phijax.data.store import build_store
    from phijax.weights import load_checkpoint

    bucket_tokenizer = f"{object_store}/tokenizer/tokenizer.model"
    paths.upload(tokenizer.path, bucket_tokenizer)
    store = f"{object_store}/stores/python-docs"
    build_store(["builtin:python-docs"], tokenizer, store, workers=1)
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(f"sources:\n  - {{name: docs, share: 0.5, store: {store}}}\n"
                       f"  - {{name: stdlib, share: 0.5, corpus: [builtin:python-stdlib]}}\n")
    run = f"{object_store}/runs/from-stores"
    run_cli("train", TINY, f"data.mixture={mixture}", f"data.tokenizer={bucket_tokenizer}",
            f"data.cache_dir={object_store}/cache", "model.vocab_size=512", "train.steps=4",
            "train.log_every=2", "train.eval_every=1000", f"run.dir={run}")
    assert sorted(losses(paths.read_text(f"{run}/metrics.jsonl"))) == [1, 2, 4]
    cached = paths.listdir(f"{object_store}/cache/stores")
    assert len(cached) == 1
    assert paths.exists(f"{object_store}/cache/stores/{cached[0]}/manifest.json")
    cfg, params, run_tokenizer, _ = load_checkpoint(run)  # its params and tokenizer, read back
    assert run_tokenizer.hash == tokenizer.hash
    assert params["embed"].shape == (512, cfg.model.hidden_size)


@pytest.mark.slow
@pytest.mark.parametrize("object_store", ["s3"], indirect=True)
def test_a_sweep_in_a_bucket_shared_by_two_workers_runs_each_cell_once(object_store, tmp_path,
                                                                       monkeypatch):
    """Cells, status, locks (created only if absent) and run directories all in the bucket."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "pair", "base": str(TINY), "root": f"{object_store}/sweeps",
        "overrides": {"data.synthetic": True, "train.steps": 2, "data.seq_len": 32,
                      "checkpoint.async_save": False, "train.peak_flops_per_device": 1.0e12},
        "grid": {"optimizer.learning_rate": [1.0e-3, 3.0e-3]}}))
    workers = [run_cli("sweep", "work", sweep, "--poll", "1", background=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    root = f"{object_store}/sweeps/pair"
    cells = [f"{root}/{name}" for name in paths.listdir(root)]
    assert len(cells) == 2
    for cell in cells:
        assert json.loads(paths.read_text(f"{cell}/status.json"))["state"] == "success"
        assert paths.listdir(f"{cell}/locks") == ["0001.json"]  # claimed once: ran once
        assert json.loads(paths.read_text(f"{cell}/locks/0001.json"))["released"]
        assert json.loads(paths.read_text(f"{cell}/cell.json"))["config"]["run"]["dir"] == cell
        steps = [r["step"] for r in map(json.loads, paths.read_text(f"{cell}/metrics.jsonl")
                                        .splitlines()) if "loss" in r]
        assert steps == [1, 2]
        assert paths.exists(f"{cell}/checkpoints/2") and paths.read_text(f"{cell}/train.log")
    assert not Path(ROOT / "s3:").exists() and not (tmp_path / "s3:").exists()

    again = run_cli("sweep", "run", sweep)
    assert "ran 0 cells" in again.stderr
    assert all(paths.listdir(f"{cell}/locks") == ["0001.json"] for cell in cells)
    status = run_cli("sweep", "status", sweep, "--metrics", "loss").stdout
    assert status.count("success") == 2 and " - " not in status, status  # losses read back
    assert paths.exists(f"{root}/sweep.png")


def corpus_folder(root: Path) -> Path:
    """One file of each format the readers take: JSONL (cut in byte ranges), .jsonl.zst,
    parquet (two row groups), WARC.gz, and a folder of HTML and markdown files."""
    from corpus_fixtures import jsonl_bytes, page, write_parquet, write_warc, write_zst
    rows = [{"text": f"document {i} " + "words " * (i % 7), "n": i} for i in range(40)]
    (root / "pages").mkdir(parents=True)
    (root / "a.jsonl").write_bytes(jsonl_bytes(rows[:20]))
    write_zst(root / "b.jsonl.zst", [jsonl_bytes(rows[20:25]), jsonl_bytes(rows[25:30])])
    write_parquet(root / "c.parquet", rows[30:], row_group_size=5)
    write_warc(root / "d.warc.gz", [(f"https://example.com/{i}",
                                     page(f"Page {i}", "text " * 30).encode(), "text/html")
                                    for i in range(3)])
    (root / "pages" / "x.html").write_text(page("X", "the x page"))
    (root / "pages" / "y.md").write_text("# Y\n\nthe y notes\n")
    return root


def test_corpus_files_in_a_bucket_read_as_the_local_ones_and_tokenize_there(object_store,
                                                                            tokenizer, tmp_path):
    """Every reader reads gs:// and s3:// in place: the same shards and records, named by URL;
    `phijax data tokenize` from a bucket prefix into the bucket gives the local store's tokens."""
    from phijax.data.readers import Skipped, plan_files, read_shard
    from phijax.data.store import TokenStore

    local = corpus_folder(tmp_path / "corpus")
    url = f"{object_store}/corpus"
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        paths.upload(file, f"{url}/{file.relative_to(local).as_posix()}")

    def records(root):
        skipped = Skipped(strict=True)
        shards = plan_files(root, None, 200, skipped)
        found = [(r.id.replace(str(root), "ROOT"), r.text, r.raw, r.content_type, r.metadata)
                 for s in shards for r in read_shard(s, "text", skipped)]
        return [s.kind for s in shards], found

    kinds, here = records(str(local))
    assert records(url) == (kinds, here)
    assert kinds.count("jsonl") > 2 and kinds.count("parquet") == 2 and "warc" in kinds
    assert len(here) == 45 and ("ROOT/pages/x.html", None) == here[-2][:2]

    out = run_cli("data", "tokenize", url, "--tokenizer", tokenizer.path, "--out",
                  f"{object_store}/stores/corpus", "--workers", "1")
    assert "45 documents" in out.stdout
    run_cli("data", "tokenize", local, "--tokenizer", tokenizer.path, "--out", tmp_path / "s",
            "--workers", "1")
    remote, there = TokenStore(f"{object_store}/stores/corpus"), TokenStore(tmp_path / "s")
    assert remote.manifest["tokens"] == there.manifest["tokens"]
    np.testing.assert_array_equal(remote.read(0, len(there)), there.read(0, len(there)))


@pytest.mark.slow
@pytest.mark.parametrize("object_store", ["s3"], indirect=True)
def test_dpo_from_a_checkpoint_and_pairs_in_a_bucket_stores_its_reference_there(object_store):
    """run.init_from, dpo.pairs and run.dir all URLs: the reference log-probs are computed once
    and kept beside the pairs in the bucket, and a longer rerun reads them back."""
    base, run = f"{object_store}/runs/base", f"{object_store}/runs/dpo"
    run_cli("train", TINY, "data.synthetic=true", "train.steps=2", "checkpoint.every=2",
            "train.eval_every=1000", f"run.dir={base}")
    rng = np.random.default_rng(0)
    pairs = "".join(json.dumps({"id": i, "prompt_ids": rng.integers(3, 200, 6).tolist(),
                                "chosen_ids": rng.integers(3, 200, 3).tolist(),
                                "rejected_ids": rng.integers(3, 200, 3).tolist()}) + "\n"
                    for i in range(16))
    paths.write_text(f"{object_store}/pairs/pairs.jsonl", pairs)
    common = (f"run.init_from={base}", f"dpo.pairs={object_store}/pairs/pairs.jsonl",
              f"run.dir={run}", "train.batch_size=4", "train.log_every=1", "train.eval_every=100",
              "data.eval_fraction=0", "checkpoint.every=2")
    first = run_cli("dpo", TINY, "train.steps=2", *common)
    assert "reference log-probs: computing for 16 pairs" in first.stderr
    assert paths.exists(f"{object_store}/pairs/pairs.jsonl.ref.npz")
    again = run_cli("dpo", TINY, "train.steps=4", *common)
    assert "(stored; not recomputed)" in again.stderr and "computing" not in again.stderr
    assert sorted(losses(paths.read_text(f"{run}/metrics.jsonl"))) == [1, 2, 3, 4]


def test_a_pipeline_reads_its_seeds_from_a_bucket(object_store, tmp_path):
    """`input:` a URL: the seeds are read from the bucket (copied once at load), the run is the
    one a local input gives, and a rerun resumes it."""
    import asyncio

    from teacher_server import secret_env, start_server
    from tools.pipeline import load_pipeline, read_records, run_pipeline
    seeds = "".join(json.dumps({"id": f"s{i}", "question": f"what is {i}+{i}?"}) + "\n"
                    for i in range(12))
    paths.write_text(f"{object_store}/seeds.jsonl", seeds)
    (tmp_path / "seeds.jsonl").write_text(seeds)
    server = start_server(fault_rate=0.0, seed=1)

    def run(input, out):
        raw = {"teacher": {"base_url": server.url, "model": "echo-model",
                           "api_key_env": "PHIJAX_TEST_BUCKET_KEY"},
               "input": input, "output": str(out), "shards": 2,
               "stages": [{"name": "answer", "type": "prompt", "template": "Q: {question}",
                           "output_field": "answer"}]}
        return asyncio.run(run_pipeline(load_pipeline(raw=raw), progress=False))

    try:
        with secret_env("PHIJAX_TEST_BUCKET_KEY"):
            first = run(f"{object_store}/seeds.jsonl", tmp_path / "remote")
            run(str(tmp_path / "seeds.jsonl"), tmp_path / "local")
            again = run(f"{object_store}/seeds.jsonl", tmp_path / "remote")
    finally:
        server.stop()
    answers = {r["id"]: r["answer"] for r in read_records(tmp_path / "remote")}
    assert first["seeds_ok"] == 12 and again["this_run"]["skipped"] == 12
    assert answers == {r["id"]: r["answer"] for r in read_records(tmp_path / "local")}
    bad = f"{object_store}/no-such-seeds.jsonl"
    with pytest.raises(Exception, match=f"input: file {bad} does not exist"):
        load_pipeline(raw={"teacher": {"base_url": "http://127.0.0.1:9", "model": "m"},
                           "input": bad, "output": str(tmp_path / "x"), "stages": []})


def test_a_plan_is_written_to_a_bucket(object_store, tmp_path):
    """`phijax plan --out` a URL: the same plan.json a local --out gets."""
    local = tmp_path / "plan.json"
    for out in (f"{object_store}/plans/plan.json", local):
        run_cli("plan", TINY, "--topology", "h100x8", "--out", out, "data.synthetic=true",
                "mesh.fsdp=8")
    remote = json.loads(paths.read_text(f"{object_store}/plans/plan.json"))
    assert remote == json.loads(local.read_text()) and remote["memory"]["params_bytes"] > 0
