"""tools.pipeline against the real loopback teacher server (tests/teacher_server.py) with faults."""
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_server import CLIENT_TIMEOUT_S, HANG_S, secret_env, start_server  # noqa: E402

from tools.pipeline import (PipelineError, RunDir, load_pipeline, read_records,  # noqa: E402
                            run_pipeline, shard_path)

ROOT = Path(__file__).resolve().parents[1]
TOOLS_CLI = Path(sys.executable).parent / "phijax-tools"
N_SEEDS = 1000
KEY_ENV = "PHIJAX_TEST_PIPELINE_KEY"
# Fast retries; "timeout" faults cost the client timeout (teacher_server.CLIENT_TIMEOUT_S).
FAST = dict(model="echo-model", api_key_env=KEY_ENV, concurrency=64, max_retries=25,
            timeout_s=CLIENT_TIMEOUT_S, backoff_base_s=0.005, backoff_max_s=0.05)


@pytest.fixture(scope="module")
def secret():
    with secret_env(KEY_ENV) as key:
        yield key


@pytest.fixture(scope="module")
def server():
    srv = start_server(fault_rate=0.3, seed=1234, hang_s=HANG_S, retry_after_s=0.01)
    yield srv
    srv.stop()


def requests_served(srv) -> int:
    return srv.stats.snapshot()["requests"]


def write_seeds(path: Path, n: int = N_SEEDS) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i}", "question": f"what is {i}+{i}?"}) + "\n")
    return path


def pipeline_dict(srv, tmp: Path, name: str = "run", **top) -> dict:
    raw = {"teacher": dict(FAST, base_url=srv.url), "input": str(tmp / "seeds.jsonl"),
           "output": str(tmp / name), "shards": 4,
           "stages": [{"name": "answer", "type": "prompt", "template": "Q: {question}",
                       "output_field": "answer"}]}
    raw.update(top)
    return raw


def run(raw: dict, **kw) -> dict:
    return asyncio.run(run_pipeline(load_pipeline(raw=raw), progress=False, **kw))


def strip_time(rec: dict) -> dict:
    rec = json.loads(json.dumps(rec))
    for st in rec["provenance"]["stages"]:
        st.pop("time", None)
    return rec


def by_id(records: list[dict]) -> dict:
    out = {r["id"]: strip_time(r) for r in records}
    assert len(out) == len(records), "duplicate record ids"
    return out


def assert_no_secret(run_dir: Path, key: str) -> None:
    needle = key.encode()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert needle not in p.read_bytes(), f"API key found in {p}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server, secret):
    """One uninterrupted in-process run of 1,000 seeds against the faulty server."""
    tmp = tmp_path_factory.mktemp("pipe-ref")
    write_seeds(tmp / "seeds.jsonl")
    raw = pipeline_dict(server, tmp)
    before = requests_served(server)
    t0 = time.monotonic()
    summary = run(raw)
    return dict(tmp=tmp, raw=raw, summary=summary, seconds=time.monotonic() - t0,
                requests=requests_served(server) - before,
                records=read_records(tmp / "run"))


def test_thousand_seeds_with_faults(reference, server, secret):
    recs = reference["records"]
    assert len(recs) == N_SEEDS
    assert len({r["id"] for r in recs}) == N_SEEDS
    for r in recs:
        i = int(r["provenance"]["seed_id"][1:])
        assert r["id"] == f"s{i}/answer/0"
        assert r["answer"] == f"echo: Q: what is {i}+{i}?"
        assert r["question"] == f"what is {i}+{i}?"
        (st,) = r["provenance"]["stages"]
        assert st["stage"] == "answer" and st["model"] == "echo-model"
        assert len(st["template_sha256"]) == 64 and st["time"]
    run_dir = reference["tmp"] / "run"
    for k, path in enumerate(shard_path(run_dir, s, 4) for s in range(4)):
        assert path.exists()
    assert not (run_dir / "failures.jsonl").exists() or not (run_dir / "failures.jsonl").read_text()
    s = reference["summary"]
    assert s["seeds_ok"] == N_SEEDS and s["seeds_failed"] == 0 and s["records"] == N_SEEDS
    assert s["usage"]["retries"] > 0, "the server should have injected faults"
    usage = json.loads((run_dir / "usage.json").read_text())
    # Every request the server saw was counted; under load a few more attempts time out on the
    # client before the server counts them, so the client's figure can only be larger.
    assert usage["total"]["requests"] >= reference["requests"] > 0
    assert usage["total"]["completion_tokens"] > 0 and usage["records"] == N_SEEDS
    # the key was really sent (Authorization header) yet never reached a file
    assert f"Bearer {secret}" in server.stats.snapshot()["auth_headers"]
    assert_no_secret(run_dir, secret)


def test_rerun_makes_no_requests(reference, server):
    raw = reference["raw"]
    before = requests_served(server)
    s = run(raw)
    assert requests_served(server) == before
    assert s["this_run"]["skipped"] == N_SEEDS and s["usage"]["requests"] == 0
    assert by_id(read_records(reference["tmp"] / "run")) == by_id(reference["records"])


def test_recovery_from_torn_writes(reference, server, secret, tmp_path):
    """A crash between a batch's records and its done markers, and mid-line: the restart drops
    the partial lines and the unmarked seeds' records, redoes them (from the cache: no
    requests) and ends with the same records, no duplicates."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference["tmp"] / "run", run_dir)
    raw = dict(reference["raw"], output=str(run_dir))
    done = run_dir / "state" / "done.jsonl"
    lines = done.read_bytes().splitlines(keepends=True)
    done.write_bytes(b"".join(lines[:-100]) + lines[-100][:17])  # 100 markers lost, one torn
    shard = shard_path(run_dir, 2, 4)
    shard.write_bytes(shard.read_bytes() + b'{"id": "s1/answer/0", "answ')
    before = requests_served(server)
    s = run(raw)
    assert requests_served(server) == before, "redone seeds must come from the cache"
    assert s["this_run"]["ok"] == 100
    assert by_id(read_records(run_dir)) == by_id(reference["records"])
    assert len(done.read_text().splitlines()) == N_SEEDS


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_and_restart(reference, server, secret, tmp_path):
    """`phijax-tools run` killed with SIGKILL at random points three times (and twice more
    at injected worst-case instants), then run to the end: exactly the records of the
    uninterrupted run, no duplicates, none lost."""
    write_seeds(tmp_path / "seeds.jsonl")
    raw = pipeline_dict(server, tmp_path, batch_size=8, flush_interval_s=0.05)
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [str(TOOLS_CLI), "run", str(cfg), "--no-progress"]
    done = tmp_path / "run" / "state" / "done.jsonl"
    rng = random.Random()
    targets = sorted(rng.sample(range(30, 800), 3))
    kills = []
    for target in targets:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while proc.poll() is None and _count_lines(done) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))   # land anywhere: mid-request, mid-write, mid-fsync
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((target, _count_lines(done), proc.returncode))
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read().decode()
        proc.stderr.close()
    # and at the worst instants: mid-line, and between a batch's records and its done markers
    for crash in (f"torn:{rng.randint(1, 5)}", f"records:{rng.randint(1, 5)}"):
        out = subprocess.run(cmd, cwd=ROOT, env=dict(env, TOOLS_PIPELINE_CRASH=crash),
                             capture_output=True, text=True, timeout=60)
        kills.append((crash, _count_lines(done), out.returncode))
        assert out.returncode == -signal.SIGKILL, out.stderr
    print("kills (target, done lines at kill, rc):", kills)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert any(rc == -signal.SIGKILL for _, _, rc in kills), kills
    got = read_records(tmp_path / "run")
    assert len(got) == N_SEEDS, kills
    assert by_id(got) == by_id(reference["records"]), kills
    assert len(done.read_text().splitlines()) == N_SEEDS
    assert_no_secret(tmp_path / "run", secret)
    # and a rerun of the finished pipeline makes no request at all
    before = requests_served(server)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert requests_served(server) == before
    assert json.loads(out.stdout.strip().splitlines()[-1])["this_run"]["skipped"] == N_SEEDS


def test_multi_sample_prompt_and_filter(server, secret, tmp_path):
    with open(tmp_path / "seeds.jsonl", "w") as f:
        for i in range(20):                       # no ids: derived from the content hash
            f.write(json.dumps({"question": f"q{i}", "keep": i % 2 == 0}) + "\n")
        f.write(json.dumps({"question": "q0", "keep": True}) + "\n")   # repeats seed 0
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("Solve {question} and return {{\"answer\": ...}}")
    raw = pipeline_dict(server, tmp_path, shards=3, stages=[
        {"name": "only-kept", "type": "filter", "field": "keep", "equals": True},
        {"name": "gen", "type": "prompt", "template_file": str(tpl), "n": 3,
         "temperature": 0.7, "output_field": "solution", "system": "be brief"},
        {"name": "has-q3", "type": "filter", "field": "solution", "regex": r"q\d*[02468] "}])
    s = run(raw)
    recs = read_records(tmp_path / "run")
    assert s["seeds_ok"] == 20 and s["this_run"]["duplicate_ids"] == 1
    assert len(recs) == 10 * 3 and len({r["id"] for r in recs}) == 30
    for r in recs:
        seed = r["provenance"]["seed_id"]
        assert seed.startswith("sha256:") and r["id"].startswith(seed + "/gen/")
        assert r["solution"] == f'echo: Solve {r["question"]} and return {{"answer": ...}}'
        assert [st["stage"] for st in r["provenance"]["stages"]] == ["gen"]
    assert {r["id"].rsplit("/", 1)[1] for r in recs} == {"0", "1", "2"}


def test_failures_are_recorded_and_retried(secret, tmp_path):
    # 400 is not retried: the first two requests fail for good.
    srv = start_server(script=["400", "400"])
    try:
        write_seeds(tmp_path / "seeds.jsonl", 6)
        raw = pipeline_dict(srv, tmp_path, concurrency=1)
        s = run(raw)
        assert s["seeds_ok"] == 4 and s["seeds_failed"] == 2 and s["records"] == 4
        fails = [json.loads(l) for l in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
        assert sorted(f["seed_id"] for f in fails) == ["s0", "s1"]
        assert all(f["stage"] == "answer" and "400" in f["reason"] for f in fails)
        n = requests_served(srv)
        assert run(raw)["this_run"]["skipped"] == 6 and requests_served(srv) == n  # done = skipped
        s = run(raw, retry_failed=True)
        assert s["seeds_ok"] == 6 and s["seeds_failed"] == 0 and s["records"] == 6
        assert not (tmp_path / "run" / "failures.jsonl").read_text()
        assert len({r["id"] for r in read_records(tmp_path / "run")}) == 6
    finally:
        srv.stop()


def test_example_pipeline_loads(server, tmp_path):
    write_seeds(tmp_path / "seeds.jsonl", 3)
    pipe = load_pipeline(ROOT / "configs/pipelines/echo.yaml",
                         [f"input={tmp_path / 'seeds.jsonl'}", f"output={tmp_path / 'out'}",
                          f"teacher.base_url={server.url}", f"teacher.timeout_s={CLIENT_TIMEOUT_S}",
                          "teacher.max_retries=25", "teacher.backoff_base_s=0.005"])
    s = asyncio.run(run_pipeline(pipe, progress=False))
    assert s["seeds_ok"] == 3 and s["records"] == 12


BAD = [
    ({"stages": [{"name": "x", "type": "nope"}]}, "stages[0].type"),
    ({"input": "/nonexistent/seeds.jsonl"}, "input"),
    ({"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "concurency": 4}},
     "teacher.concurency"),
    ({"teacher": {"base_url": "http://127.0.0.1:1/v1"}}, "teacher.model"),
    ({"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "max_retries": "lots"}},
     "teacher.max_retries"),
    ({"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "concurrency": 0}},
     "teacher.concurrency"),
    ({"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "timeout_s": 0}},
     "teacher.timeout_s"),
    ({"shards": 0}, "shards"),
    ({"batch_size": 0}, "batch_size"),
    ({"cache": 3}, "cache"),
    ({"stages": []}, "stages"),
    ({"stages": ["prompt"]}, "stages[0]"),
    ({"stages": [{"name": "a", "type": "prompt"}]}, "stages[0].template"),
    ({"stages": [{"name": "a", "type": "prompt", "template": "x", "n": 0}]}, "stages[0].n"),
    ({"stages": [{"name": "a", "type": "prompt", "template": "x", "temperature": -1}]},
     "stages[0].temperature"),
    ({"stages": [{"name": "a", "type": "prompt", "template": "x", "tempreature": 1}]},
     "stages[0].tempreature"),
    ({"stages": [{"name": "a", "type": "prompt", "template": "x", "output_field": "id"}]},
     "stages[0].output_field"),
    ({"stages": [{"name": "a b", "type": "prompt", "template": "x"}]}, "stages[0].name"),
    ({"stages": [{"name": "f", "type": "filter", "field": "a", "regex": "("}]},
     "stages[0].regex"),
    ({"stages": [{"name": "f", "type": "filter", "field": "a", "in": {"x": 1}}]},
     "stages[0].in"),
    ({"stages": [{"name": "f", "type": "filter", "field": "a"}]}, "stages[0]"),
    ({"stages": [{"name": "a", "type": "filter", "field": "x", "equals": 1},
                 {"name": "a", "type": "filter", "field": "x", "equals": 1}]}, "stages[1].name"),
    ({"outptu": "x"}, "outptu"),
]


def names_key(msg: str, key: str) -> bool:
    """`key` stands in the message as a whole key (not as part of a longer one)."""
    return re.search(rf"(^|\s){re.escape(key)}(:|\s|$)", msg) is not None


@pytest.mark.parametrize("patch,key", BAD, ids=[k for _, k in BAD])
def test_bad_pipeline_one_line_error(tmp_path, patch, key):
    write_seeds(tmp_path / "seeds.jsonl", 1)
    raw = {"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"), "shards": 2,
           "stages": [{"name": "a", "type": "prompt", "template": "{question}"}]}
    raw.update(patch)
    with pytest.raises(PipelineError) as e:
        load_pipeline(raw=raw)
    msg = str(e.value)
    assert "\n" not in msg and names_key(msg, key), msg
    assert not (tmp_path / "run").exists()


def test_bad_override_names_the_key(tmp_path):
    write_seeds(tmp_path / "seeds.jsonl", 1)
    raw = {"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": [{"name": "a", "type": "prompt", "template": "{question}"}]}
    assert load_pipeline(raw=raw, overrides=["stages.0.n=3"]).stages[0].cfg.n == 3
    for override, key in (("stages.0.n=0", "stages[0].n"), ("stages.1.n=2", "stages.1.n"),
                          ("teacher.concurrency=x", "teacher.concurrency")):
        with pytest.raises(PipelineError) as e:
            load_pipeline(raw=raw, overrides=[override])
        assert "\n" not in str(e.value) and key in str(e.value), (override, str(e.value))


def test_fingerprint_decides_resume(tmp_path):
    """A run directory resumes only the pipeline that wrote it: the stages' parameters and the
    content of the files they read count; where a file lies and how fast the run goes do not."""
    write_seeds(tmp_path / "seeds.jsonl", 1)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("Q: {question}")
    copy = tmp_path / "copy.txt"
    copy.write_text(tpl.read_text())
    raw = {"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": [{"name": "a", "type": "prompt", "template_file": str(tpl)}]}
    fp = load_pipeline(raw=raw).fingerprint()
    assert load_pipeline(raw=raw, overrides=[f"stages.0.template_file={copy}", "concurrency=3",
                                             "teacher.max_retries=1"]).fingerprint() == fp
    assert load_pipeline(raw=raw, overrides=["stages.0.n=2"]).fingerprint() != fp
    assert load_pipeline(raw=raw, overrides=["shards=2"]).fingerprint() != fp
    open_run(load_pipeline(raw=raw))
    tpl.write_text("Question: {question}")
    with pytest.raises(PipelineError, match="stages changed"):
        open_run(load_pipeline(raw=raw))
    tpl.write_text("Q: {question}")
    with pytest.raises(PipelineError, match="shards changed"):
        open_run(load_pipeline(raw=raw, overrides=["shards=3"]))
    open_run(load_pipeline(raw=raw))


def open_run(pipe) -> None:
    run = RunDir(pipe)
    try:
        run.open()
    finally:
        run.close()


def test_cli_bad_yaml_and_ray(tmp_path, capsys, monkeypatch):
    from tools.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
                                   "input": str(tmp_path / "missing.jsonl"),
                                   "output": str(tmp_path / "run"), "stages": []}))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"phijax-tools: error: input: file {tmp_path / 'missing.jsonl'} does not exist"
    assert main(["run", str(bad), "stages.0.n=2"]) == 2      # an index the list does not have
    err = capsys.readouterr().err.strip()
    assert err.startswith("phijax-tools: error: override stages.0.n:") and "\n" not in err
    monkeypatch.setitem(sys.modules, "ray", None)   # as if not installed: `import ray` fails
    assert main(["run", str(bad), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip() == \
        "phijax-tools: error: --executor ray: ray is not installed; pip install ray"


def test_cli_check_and_run_command(server, secret, tmp_path):
    """The console script: `--check` validates without a network call; a run prints its
    summary as JSON."""
    write_seeds(tmp_path / "seeds.jsonl", 5)
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(pipeline_dict(server, tmp_path)))
    before = requests_served(server)
    out = subprocess.run([str(TOOLS_CLI), "run", str(cfg), "shards=2", "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok: {cfg}: 1 stages, 2 shards, output {tmp_path / 'run'}"
    assert requests_served(server) == before and not (tmp_path / "run").exists()
    out = subprocess.run([str(TOOLS_CLI), "run", str(cfg), "--no-progress"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["records"] == 5 and len(read_records(tmp_path / "run")) == 5


def test_writes_after_a_log_is_rewritten_reach_the_new_file(tmp_path):
    """Opening folds a Ray shard's logs into done.jsonl / failures.jsonl (appending), then
    rewrites both (--retry-failed drops the failed marker, and with it the failure): seeds
    finished afterwards must land in the rewritten files, not in the ones replaced."""
    write_seeds(tmp_path / "seeds.jsonl", 3)
    raw = {"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": [{"type": "prompt", "template": "Q: {question}"}]}
    pipe = load_pipeline(raw=raw)
    open_run(pipe)  # creates the run directory and its fingerprint
    state = tmp_path / "run" / "state"
    (state / "done-00000.jsonl").write_text('{"seed_id": "a", "status": "failed"}\n')
    (state / "failures-00000.jsonl").write_text(
        '{"seed_id": "a", "stage": "prompt", "reason": "boom", "time": "t"}\n')
    run_dir = RunDir(pipe)
    try:
        run_dir.open(retry_failed=True)
        failure = {"seed_id": "b", "stage": "prompt", "reason": "again", "time": "t"}
        run_dir.commit([("b", [], failure)], scrub=lambda line: line)
    finally:
        run_dir.close()
    done = [json.loads(l) for l in (state / "done.jsonl").read_text().splitlines()]
    failures = [json.loads(l) for l in (tmp_path / "run" / "failures.jsonl").read_text()
                .splitlines()]
    assert done == [{"seed_id": "b", "status": "failed"}]
    assert [f["seed_id"] for f in failures] == ["b"]
