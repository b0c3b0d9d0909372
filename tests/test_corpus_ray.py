"""`phijax-tools corpus run ... executor=ray`: the fixture corpus of test_corpus_run through a
local Ray instance (2 CPUs, one for the module) gives the local executor's output byte for
byte, either executor resumes the other's run, redoing only tasks without a marker, a task's
strict-mode error is one line, and a bucket output is refused (Ray needs a shared file system)."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from test_corpus_run import ROOT, make_inputs
from tools.cli import main as tools_main

CONFIG = str(ROOT / "configs/corpus/web.yaml")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("corpus-ray")
    inputs = make_inputs(root)
    common = [f"inputs=[{inputs}]", "workers=2", "samples_per_reason=1",
              "langid.languages=[en, fr]", "heuristics.gopher_quality.min_stop_words=0",
              "dedup.partitions=2"]
    seconds = {}
    for executor in ("local", "ray"):
        t0 = time.monotonic()
        assert tools_main(["corpus", "run", CONFIG, *common, f"output={root / executor}",
                           f"executor={executor}", "--no-progress"]) == 0
        seconds[executor] = time.monotonic() - t0
    print(f"corpus run: local {seconds['local']:.1f} s, ray {seconds['ray']:.1f} s")
    return root, common


def outputs(out: Path) -> dict:
    """Every file the run leaves outside its work directory, by relative path: its bytes
    (timing.json's, the seconds each step took, which no two runs share, left out)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".work" not in p.relative_to(out).parts
            and p.name != "timing.json"}


def test_ray_writes_the_local_outputs_byte_for_byte(runs):
    root, _ = runs
    local, ray_ = outputs(root / "local"), outputs(root / "ray")
    assert {"summary.json", "en/part-000000.jsonl.zst"} <= set(local)
    assert any(name.startswith("fr/") for name in local)
    assert any(name.startswith("removed/dedup/") for name in local)
    assert sorted(ray_) == sorted(local)
    assert [name for name in local if ray_[name] != local[name]] == []
    summary = json.loads(local["summary.json"])
    assert summary["outputs"] == {"en": 4, "fr": 1} and summary["dedup"]["sizes"] == {"3": 1}
    with np.load(root / "local" / ".work" / "clusters.npz") as a, \
            np.load(root / "ray" / ".work" / "clusters.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_ray_resumes_a_local_run_redoing_only_unfinished_tasks(runs, caplog):
    root, common = runs
    out = root / "local"
    before = outputs(out)
    work = out / ".work"
    counts = sorted((work / "counts").glob("0*[0-9].json"))
    edges = sorted((work / "edges").glob("edges-*.npy"))
    markers = counts[1:] + edges[1:] + sorted((work / "routed").glob("0*[0-9].json"))
    stamps = {p: p.stat().st_mtime_ns for p in markers}
    counts[0].unlink()  # as if killed before the first shard and the first bucket finished
    edges[0].unlink()
    with caplog.at_level("INFO", logger="phijax"):
        assert tools_main(["corpus", "run", CONFIG, *common, f"output={out}", "executor=ray",
                           "--no-progress"]) == 0
    assert f"resuming, {len(counts) - 1} of {len(counts)} shards already filtered" in caplog.text
    assert counts[0].is_file() and edges[0].is_file()
    assert [p for p in markers if p.stat().st_mtime_ns != stamps[p]] == []
    assert outputs(out) == before


def test_a_bad_record_in_a_strict_ray_task_is_one_line(runs, capsys):
    root, common = runs
    bad = root / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    strict = [o for o in common if not o.startswith("inputs=")] + \
        [f"inputs=[{bad}]", f"output={root / 'strict'}", "strict=true", "executor=ray"]
    assert tools_main(["corpus", "run", CONFIG, *strict, "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"phijax-tools: error: {bad}:2: "), line


def test_a_bucket_output_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n')
    assert tools_main(["corpus", "run", CONFIG, f"inputs=[{tmp_path / 'a.jsonl'}]",
                       "output=gs://bucket/corpus", "executor=ray", "--check"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("phijax-tools: error: output: gs://bucket/corpus: a bucket"), line
