"""tools.pipeline's Ray executor (`phijax-tools run PIPE.yaml --executor ray`) against the
loopback teacher server with faults: the same records as the local executor, shared run
directory layout (either executor resumes the other's run), no requests on a rerun, no key in
any file. One local Ray instance (2 CPUs) for the whole module."""
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_server import HANG_S, start_server  # noqa: E402
from test_pipeline import FAST, assert_no_secret, by_id, secret  # noqa: E402,F401 (a fixture)
from test_pipeline import requests_served as served  # noqa: E402

from tools.pipeline import (load_pipeline, read_records, run_pipeline,  # noqa: E402
                            run_pipeline_ray, shard_of, shard_path)

pytestmark = pytest.mark.slow

N_SEEDS = 200
SHARDS = 4
TEACHER = dict(FAST, concurrency=32)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    assert not ray.is_initialized()
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.monotonic() - t0:.1f} s")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def server():
    srv = start_server(fault_rate=0.3, seed=4321, hang_s=HANG_S, retry_after_s=0.01)
    yield srv
    srv.stop()


def done_lines(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "state" / "done.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, server, secret, ray_cluster):
    """The same pipeline (prompt, n=2; 200 seeds, 4 shards) once per executor, each with its
    own cache, against the server with 30% faults."""
    tmp = tmp_path_factory.mktemp("pipe-ray")
    with open(tmp / "seeds.jsonl", "w") as f:
        for i in range(N_SEEDS):
            f.write(json.dumps({"id": f"s{i}", "question": f"what is {i}*{i}?"}) + "\n")
        f.write(json.dumps({"id": "s7", "question": "a repeated id"}) + "\n")

    def raw(name):
        return {"teacher": dict(TEACHER, base_url=server.url), "input": str(tmp / "seeds.jsonl"),
                "output": str(tmp / name), "shards": SHARDS,
                "stages": [{"name": "answer", "type": "prompt", "template": "Q: {question}",
                            "n": 2, "temperature": 0.5, "output_field": "answer"}]}
    out = {"tmp": tmp, "raw": raw}
    for name in ("local", "ray"):
        before, t0 = served(server), time.monotonic()
        pipe = load_pipeline(raw=raw(name))
        if name == "local":
            s = asyncio.run(run_pipeline(pipe, progress=False))
        else:
            s = run_pipeline_ray(pipe, progress=False)
        out[name] = dict(summary=s, requests=served(server) - before,
                         seconds=time.monotonic() - t0, records=read_records(tmp / name))
        print(f"{name}: {out[name]['seconds']:.1f} s, {out[name]['requests']} requests")
    return out


def test_ray_gives_the_local_records(runs, secret):
    loc, ray_ = runs["local"], runs["ray"]
    assert len(ray_["records"]) == 2 * N_SEEDS
    assert by_id(ray_["records"]) == by_id(loc["records"])
    for r in ray_["records"]:
        (st,) = r["provenance"]["stages"]
        assert st["time"] and st["model"] == "echo-model"
    run_dir = runs["tmp"] / "ray"
    for k in range(SHARDS):   # every record sits in the shard of its seed
        for line in shard_path(run_dir, k, SHARDS).read_text().splitlines():
            assert shard_of(json.loads(line)["provenance"]["seed_id"], SHARDS) == k
    s, sl = ray_["summary"], loc["summary"]
    for key in ("seeds", "seeds_ok", "seeds_failed", "records"):
        assert s[key] == sl[key], key
    assert s["this_run"] == dict(sl["this_run"], seconds=s["this_run"]["seconds"])
    assert s["this_run"]["duplicate_ids"] == 1 and s["this_run"]["ok"] == N_SEEDS
    assert ray_["requests"] > 0 and s["usage"]["retries"] > 0, "faults were injected"
    # the local executor's layout: per-shard task logs folded into state/done.jsonl
    assert sorted(p.name for p in (run_dir / "state").iterdir()
                  if p.name.startswith(("done", "failures"))) == ["done.jsonl"]
    assert len(done_lines(run_dir)) == N_SEEDS
    usage = json.loads((run_dir / "usage.json").read_text())
    assert usage["total"]["requests"] == s["usage"]["requests"]
    # The client counts attempts; one that times out before the server reads it (on a
    # loaded machine) is counted by the client only.
    assert 0 < ray_["requests"] <= s["usage"]["requests"]
    assert usage["records"] == 2 * N_SEEDS and usage["seeds_done"] == N_SEEDS
    assert_no_secret(run_dir, secret)


def test_ray_rerun_makes_no_requests(runs, server, secret):
    before = served(server)
    s = run_pipeline_ray(load_pipeline(raw=runs["raw"]("ray")), progress=False)
    assert served(server) == before
    assert s["this_run"]["skipped"] == N_SEEDS and s["usage"]["requests"] == 0
    assert s["records"] == 2 * N_SEEDS
    assert by_id(read_records(runs["tmp"] / "ray")) == by_id(runs["local"]["records"])
    assert_no_secret(runs["tmp"] / "ray", secret)


def _as_crashed_ray_run(src: Path, dst: Path, drop: int) -> None:
    """`src` (a finished run) as a Ray run killed mid-way would leave it: the last `drop`
    markers of done.jsonl only in per-shard logs, the last of those torn (its seed's records
    are then unmarked), and a torn record line in one shard."""
    shutil.copytree(src, dst)
    done = dst / "state" / "done.jsonl"
    lines = done.read_bytes().splitlines(keepends=True)
    done.write_bytes(b"".join(lines[:-drop]))
    for i, line in enumerate(lines[-drop:]):
        k = shard_of(json.loads(line)["seed_id"], SHARDS)
        with open(dst / "state" / f"done-{k:05d}.jsonl", "ab") as f:
            f.write(line[:10] if i == drop - 1 else line)
    with open(shard_path(dst, 1, SHARDS), "ab") as f:
        f.write(b'{"id": "s1/answer/0", "ans')


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_resume_a_crashed_ray_run(runs, server, secret, tmp_path, executor):
    """Either executor resumes a killed Ray run: no requests (the cache answers), the same
    records, no duplicates, one layout."""
    run_dir = tmp_path / "run"
    _as_crashed_ray_run(runs["tmp"] / "ray", run_dir, drop=40)
    pipe = load_pipeline(raw=dict(runs["raw"]("ray"), output=str(run_dir)))
    before = served(server)
    if executor == "local":
        s = asyncio.run(run_pipeline(pipe, progress=False))
    else:
        s = run_pipeline_ray(pipe, progress=False)
    assert served(server) == before, "redone seeds must come from the cache"
    assert s["this_run"]["ok"] == 1 and s["this_run"]["skipped"] == N_SEEDS - 1
    assert by_id(read_records(run_dir)) == by_id(runs["local"]["records"])
    assert len(done_lines(run_dir)) == N_SEEDS
    assert not list((run_dir / "state").glob("done-*.jsonl"))


def test_ray_resumes_a_local_run_and_cli(runs, server, secret, tmp_path, capsys):
    """`phijax-tools run --executor ray` (in-process, on the module's Ray instance) finishes
    a local run cut short: only the missing seeds are processed, from the cache."""
    from tools.cli import main
    run_dir = tmp_path / "run"
    shutil.copytree(runs["tmp"] / "local", run_dir)
    done = run_dir / "state" / "done.jsonl"
    lines = done.read_bytes().splitlines(keepends=True)
    done.write_bytes(b"".join(lines[:-30]))
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(dict(runs["raw"]("local"), output=str(run_dir))))
    before = served(server)
    assert main(["run", str(cfg), "--executor", "ray"]) == 0
    out, err = capsys.readouterr()
    s = json.loads(out.strip().splitlines()[-1])
    assert served(server) == before
    assert s["this_run"]["ok"] == 30 and s["records"] == 2 * N_SEEDS
    assert "seed" in err   # the tqdm bar
    assert by_id(read_records(run_dir)) == by_id(runs["local"]["records"])
    assert_no_secret(run_dir, secret)


def test_shard_task_recovers_its_own_files(runs, server, secret, tmp_path):
    """A shard task that Ray retries after its worker died (here: run in-process) first
    repairs its own files: torn lines cut, records and failures of unmarked seeds dropped;
    then it redoes those seeds from the cache and writes only its own shard."""
    from tools.pipeline import RunDir
    from tools.pipeline.ray import _run_shard, _Secret
    run_dir = tmp_path / "run"
    shutil.copytree(runs["tmp"] / "ray", run_dir)
    k = 2
    done = run_dir / "state" / "done.jsonl"
    mine = [l for l in done.read_bytes().splitlines(keepends=True)
            if shard_of(json.loads(l)["seed_id"], SHARDS) == k]
    others = [l for l in done.read_bytes().splitlines(keepends=True) if l not in mine]
    done.write_bytes(b"".join(others))             # shard k's markers: only in its own log,
    part = run_dir / "state" / f"done-{k:05d}.jsonl"
    part.write_bytes(b"".join(mine[:-5]) + mine[-5][:7])   # 5 of them lost, one torn
    unmarked = json.loads(mine[-1])["seed_id"]
    (run_dir / "state" / f"failures-{k:05d}.jsonl").write_text(json.dumps(
        {"seed_id": unmarked, "stage": "answer", "reason": "x", "time": "t"}) + "\n")
    with open(shard_path(run_dir, k, SHARDS), "ab") as f:
        f.write(b'{"id": "torn')
    sizes = {j: shard_path(run_dir, j, SHARDS).stat().st_size for j in range(SHARDS) if j != k}
    pipe = load_pipeline(raw=dict(runs["raw"]("ray"), output=str(run_dir)))
    before = served(server)
    res = asyncio.run(_run_shard(pipe, k, None, _Secret(secret)))
    assert served(server) == before
    assert res["part"]["ok"] == len(mine) and res["part"]["records"] == 2 * len(mine)
    assert {j: shard_path(run_dir, j, SHARDS).stat().st_size for j in sizes} == sizes
    assert not (run_dir / "state" / f"failures-{k:05d}.jsonl").read_text()
    run = RunDir(pipe)
    run.open()
    run.close()
    assert not list((run_dir / "state").glob("done-*.jsonl"))
    assert len(done_lines(run_dir)) == N_SEEDS
    assert by_id(read_records(run_dir)) == by_id(runs["local"]["records"])


def test_ray_failures_and_retry_failed(runs, secret, tmp_path):
    """Failed seeds (400s are not retried) land in failures.jsonl, as locally; --retry-failed
    redoes them on Ray."""
    srv = start_server(script=["400", "400"])
    try:
        with open(tmp_path / "seeds.jsonl", "w") as f:
            for i in range(12):
                f.write(json.dumps({"id": f"f{i}", "question": f"q{i}"}) + "\n")
        raw = dict(runs["raw"]("x"), input=str(tmp_path / "seeds.jsonl"),
                   output=str(tmp_path / "run"), teacher=dict(TEACHER, base_url=srv.url))
        s = run_pipeline_ray(load_pipeline(raw=raw), progress=False)
        assert s["seeds_ok"] == 10 and s["seeds_failed"] == 2 and s["records"] == 20
        fails = [json.loads(l) for l in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
        assert len(fails) == 2 and all("400" in f["reason"] for f in fails)
        assert not list((tmp_path / "run" / "state").glob("failures-*.jsonl"))
        s = run_pipeline_ray(load_pipeline(raw=raw), progress=False, retry_failed=True)
        assert s["seeds_ok"] == 12 and s["seeds_failed"] == 0 and s["records"] == 24
        assert s["this_run"]["ok"] == 2 and s["this_run"]["skipped"] == 10
        assert not (tmp_path / "run" / "failures.jsonl").read_text()
    finally:
        srv.stop()


def test_ray_stops_on_a_refusal_and_on_too_many_failures(runs, secret, tmp_path):
    """A refused model stops a Ray run with the local executor's one-line error, no seed marked
    failed; answers cut off on every seed fail the run with the counts by cause."""
    from tools.pipeline import PipelineFailed
    from tools.teacher import TeacherRefused
    refusing = start_server(model="right-model")
    cutting = start_server(fault_rate=1.0, faults=("length",))
    try:
        with open(tmp_path / "seeds.jsonl", "w") as f:
            for i in range(6):
                f.write(json.dumps({"id": f"r{i}", "question": f"q{i}"}) + "\n")
        raw = dict(runs["raw"]("x"), input=str(tmp_path / "seeds.jsonl"),
                   output=str(tmp_path / "run"),
                   teacher=dict(TEACHER, base_url=refusing.url, model="wrong-model"))
        with pytest.raises(TeacherRefused) as e:
            run_pipeline_ray(load_pipeline(raw=raw), progress=False)
        assert str(e.value).startswith(f"teacher {refusing.url} refused model 'wrong-model': "
                                       f"HTTP 404 model_not_found"), str(e.value)
        failures = tmp_path / "run" / "failures.jsonl"
        assert not failures.exists() or not failures.read_text()
        raw = dict(raw, output=str(tmp_path / "run2"),
                   teacher=dict(TEACHER, base_url=cutting.url, max_retries=1))
        with pytest.raises(PipelineFailed) as e:
            run_pipeline_ray(load_pipeline(raw=raw), progress=False)
        assert str(e.value) == (f"6 of 6 seeds failed (TeacherError: finish_reason length 6); "
                                f"{tmp_path / 'run2' / 'failures.jsonl'} has each")
    finally:
        refusing.stop()
        cutting.stop()
