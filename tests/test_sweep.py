"""`phijax sweep`: cell hashes that ignore key order, defaults and non-semantic keys; workers that
share a grid through locks, take over a dead worker's cell, pass a preemption on, and agree
across the processes of a multi-host worker."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, read_metrics, run_cli
from phijax.sweep.spec import expand, load_sweep

GOLDEN = ROOT / "tests" / "data" / "sweep" / "golden.yaml"
GOLDEN_HASHES = {  # checked in: a change means every existing sweep's cells would rerun
    "lr=1e-3,docs=1,tokens=0,seed=0": "b347e64aa9ae",
    "lr=1e-3,docs=0.5,tokens=0.5,seed=0": "31cc188f0529",
    "lr=3e-3,docs=1,tokens=0,seed=0": "40ce4439e951",
    "lr=3e-3,docs=0.5,tokens=0.5,seed=0": "021a52efa5c8",
}
# The tiny model on random tokens, two steps: a cell costs one `phijax train` start-up.
CHEAP = {"data.synthetic": True, "train.steps": 2, "data.seq_len": 32,
         "train.peak_flops_per_device": 1.0e12, "checkpoint.async_save": False}


@pytest.fixture(autouse=True)
def compile_cache(tmp_path_factory, monkeypatch):
    """The cells' `phijax train` processes share compiled programs (JAX's persistent cache)."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax"))


def hashes(sweep: Path) -> dict:
    return {c.label: c.hash for c in expand(load_sweep(sweep), sweep)}


def write_yaml(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def golden_copy(tmp_path: Path, edit_base=None, edit_sweep=None, edit_mixture=None) -> Path:
    """The golden sweep with its base config and mixture copied to tmp_path and edited."""
    src = GOLDEN.parent
    base, mixture = (yaml.safe_load((src / n).read_text()) for n in ("base.yaml", "mixture.yaml"))
    sweep = yaml.safe_load(GOLDEN.read_text())
    for edit, obj in ((edit_base, base), (edit_sweep, sweep), (edit_mixture, mixture)):
        if edit:
            edit(obj)
    base["data"]["mixture"] = str(write_yaml(tmp_path / "mixture.yaml", mixture))
    sweep["base"] = str(write_yaml(tmp_path / "base.yaml", base))
    return write_yaml(tmp_path / "golden.yaml", sweep)


def reversed_mapping(obj):
    if isinstance(obj, dict):
        return {k: reversed_mapping(obj[k]) for k in reversed(list(obj))}
    return [reversed_mapping(v) for v in obj] if isinstance(obj, list) else obj


def test_golden_hashes_in_the_plan():
    out = run_cli("sweep", "plan", GOLDEN).stdout
    for label, digest in GOLDEN_HASHES.items():
        assert f"runs/sweeps/golden/{label}-{digest}" in out, out
    assert "4 cells" in out and "4 pending" in out
    assert not (ROOT / "runs" / "sweeps" / "golden").exists()  # planning writes nothing


def test_hashes_ignore_key_order_defaults_and_non_semantic_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the mixture names its store relative to the repository root
    assert hashes(golden_copy(tmp_path)) == GOLDEN_HASHES

    def reorder(obj):
        obj.update(reversed_mapping(dict(obj)))
    assert hashes(golden_copy(tmp_path, reorder, None,
                              lambda m: m["sources"][0].update(
                                  reversed_mapping(m["sources"][0])))) == GOLDEN_HASHES

    def defaults_and_cadence(base):
        base["train"].update(microbatches=1, log_every=3, eval_every=7)  # a default; cadence
        base["model"]["scan_layers"] = True
        base["data"]["cache_dir"] = "/somewhere/else"
        base["checkpoint"] = {"every": 5, "keep": 9}
    assert hashes(golden_copy(tmp_path, defaults_and_cadence)) == GOLDEN_HASHES

    changed = hashes(golden_copy(tmp_path, None,
                                 lambda s: s["grid"].update({"optimizer.learning_rate":
                                                             [1.0e-3, 2.0e-3]})))
    labels = list(GOLDEN_HASHES)
    assert [changed[l] for l in labels[:2]] == [GOLDEN_HASHES[l] for l in labels[:2]]
    assert set(changed.values()).isdisjoint(GOLDEN_HASHES[l] for l in labels[2:])

    other_store = tmp_path / "store"
    other_store.mkdir()
    manifest = json.loads((GOLDEN.parent / "store" / "manifest.json").read_text())
    (other_store / "manifest.json").write_text(json.dumps({**manifest, "tokens": 43}))
    moved = hashes(golden_copy(tmp_path, edit_mixture=lambda m: m["sources"][1].update(
        store=str(other_store))))
    # the cells with the store in their mixture change; those that drop it (tokens=0) do not
    assert [moved[l] == GOLDEN_HASHES[l] for l in labels] == [True, False, True, False]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["grid"].update({"optimizer.learnin_rate": [1]}),
     "unknown key optimizer.learnin_rate (did you mean optimizer.learning_rate?)"),
    (lambda s: s["zip"][0].update({"mixture.docs": [1.0]}), "zip[0]: its lists differ in length"),
    (lambda s: s["grid"].update({"train.log_every": [1, 2]}), "are the same run"),
    (lambda s: s["zip"][0].update({"mixture.code": [0.5, 0.5]}), "has no source code"),
    (lambda s: s["overrides"].update({"run.dir": "x"}), "the sweep sets run.dir"),
    (lambda s: s.update(grid={"optimizer.learning_rate": [-1.0]}),
     "optimizer.learning_rate must be positive"),
])
def test_a_bad_sweep_is_one_line_naming_the_file(tmp_path, edit, message):
    sweep = golden_copy(tmp_path, edit_sweep=edit)
    out = run_cli("sweep", "plan", sweep, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.startswith(f"phijax: error: sweep {sweep}") and out.stderr.count("\n") == 1


def test_render_gives_an_array_job_of_workers(tmp_path):
    sweep = golden_copy(tmp_path)
    out = run_cli("sweep", "render", sweep, "--launcher", "slurm", "--workers", "4",
                  "--stale-after", "300", "nodes=1", "gpus_per_node=8").stdout
    assert "#SBATCH --array=0-3" in out and "#SBATCH --job-name=golden" in out
    assert f"phijax sweep work {sweep} --stale-after 300\n" in out


def tiny_sweep(tmp_path: Path, name: str, grid: dict, **extra) -> Path:
    return write_yaml(tmp_path / f"{name}.yaml", {
        "name": name, "base": str(ROOT / "configs" / "tiny.yaml"), "root": str(tmp_path / "runs"),
        "overrides": {**CHEAP, **extra}, "grid": grid})


def cell_dirs(tmp_path: Path, name: str) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs" / name).iterdir() if p.is_dir())


def locks(cell: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cell / "locks").iterdir())]


def work(sweep: Path, *args, **popen):
    return run_cli("sweep", "work", sweep, "--poll", "1", *args, **popen)


def wait_for(predicate, timeout: float = 120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_workers_share_a_grid_and_a_rerun_runs_nothing(tmp_path):
    sweep = tiny_sweep(tmp_path, "grid", {"optimizer.learning_rate": [1.0e-3, 3.0e-3],
                                          "train.batch_size": [2, 4]})
    workers = [work(sweep, background=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    cells = cell_dirs(tmp_path, "grid")
    assert len(cells) == 4
    owners = set()
    for cell in cells:
        assert json.loads((cell / "status.json").read_text())["state"] == "success"
        claims = locks(cell)
        assert len(claims) == 1 and claims[0]["released"], claims  # claimed once: ran once
        owners.add(claims[0]["pid"])
        assert [m["step"] for m in read_metrics(cell)] == [1, 2]
        doc = json.loads((cell / "cell.json").read_text())
        assert doc["config"]["run"]["dir"] == str(cell) and cell.name.endswith(doc["hash"])
    assert owners == {w.pid for w in workers}  # both workers ran cells

    again = run_cli("sweep", "run", sweep)
    assert "ran 0 cells" in again.stderr and all(len(locks(c)) == 1 for c in cells)
    status = run_cli("sweep", "status", sweep, "--metrics", "loss").stdout
    assert status.count("success") == 4 and "lr=3e-3,batch=4" in status
    assert (tmp_path / "runs" / "grid" / "sweep.png").stat().st_size > 10_000

    doc = json.loads((cells[0] / "cell.json").read_text())
    doc["identity"]["config"]["optimizer"]["learning_rate"] = 0.5
    (cells[0] / "cell.json").write_text(json.dumps(doc))
    for command in ("plan", "run"):
        out = run_cli("sweep", command, sweep, check=False)
        assert out.returncode == 2, out.stderr
        assert f"cell {cells[0]}: its cell.json differs" in out.stderr
        assert "identity.config.optimizer.learning_rate" in out.stderr
    assert all(len(locks(c)) == 1 for c in cells)  # nothing ran


@pytest.mark.slow
def test_a_preempted_cell_is_pending_and_a_dead_workers_cell_is_taken_over(tmp_path):
    sweep = tiny_sweep(tmp_path, "one", {"optimizer.learning_rate": [1.0e-3]})
    first = work(sweep, background=True)
    wait_for(lambda: (tmp_path / "runs" / "one").is_dir() and cell_dirs(tmp_path, "one"))
    cell = cell_dirs(tmp_path, "one")[0]
    status = lambda: json.loads((cell / "status.json").read_text()) \
        if (cell / "status.json").is_file() else {}
    wait_for(lambda: status().get("state") == "running")
    first.send_signal(signal.SIGTERM)  # preempted: passed on to the run, not an attempt
    assert first.wait(120) == 42, first.communicate()[0]
    assert status()["state"] == "pending" and status()["attempts"] == 0
    assert status()["preemptions"] == 1 and locks(cell)[-1]["released"]

    second = work(sweep, "--stale-after", "4", background=True)
    wait_for(lambda: len(locks(cell)) == 2 and status().get("state") == "running")
    second.kill()  # no release, no status: its heartbeat stops
    second.communicate()
    third = work(sweep, "--stale-after", "4")
    assert "taken over from" in third.stderr
    s = status()
    assert s["state"] == "success" and s["attempts"] == 1 and s["preemptions"] == 1
    assert f":{second.pid} stopped heartbeating" in s["last_error"]
    claims = locks(cell)
    assert [c["released"] for c in claims] == [True, False, True]
    assert claims[1]["pid"] == second.pid and claims[2]["pid"] not in (first.pid, second.pid)
    assert json.loads((cell / "run.json").read_text())["outcome"] == "success"


@pytest.mark.slow
def test_a_config_mistake_fails_once_and_runs_again_when_asked(tmp_path):
    sweep = tiny_sweep(tmp_path, "bad", {"optimizer.learning_rate": [1.0e-3]},
                       **{"train.eval_tasks": ["gsm8k"], "train.eval_data_dir": str(tmp_path)})
    out = work(sweep, check=False)
    assert out.returncode == 1, out.stderr
    (cell,) = cell_dirs(tmp_path, "bad")
    status = json.loads((cell / "status.json").read_text())
    assert status["state"] == "failed" and status["attempts"] == 3  # exit 2: not retried
    assert status["last_error"].startswith("exit status 2: phijax: error: train.eval_tasks: "
                                           "task gsm8k: no data file")
    assert len(locks(cell)) == 1
    table = run_cli("sweep", "status", sweep, "--plot", "").stdout
    assert "failed" in table and "no data file" in table
    again = work(sweep, "--retry-failed", check=False)
    assert again.returncode == 1 and len(locks(cell)) == 3  # the reset, then one run


@pytest.mark.slow
def test_a_multi_host_worker_claims_on_process_0_and_runs_the_cell_on_both(tmp_path):
    sweep = tiny_sweep(tmp_path, "hosts", {"optimizer.learning_rate": [1.0e-3]},
                       **{"mesh.data": 2, "train.batch_size": 2})
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "phijax", "sweep", "work", str(sweep), "--poll", "1"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    (cell,) = cell_dirs(tmp_path, "hosts")
    assert [c["pid"] for c in locks(cell)] == [procs[0].pid]  # only process 0 claimed
    assert json.loads((cell / "status.json").read_text())["state"] == "success"
    assert [m["step"] for m in read_metrics(cell)] == [1, 2]
    assert "running `" in outputs[0] and "running `" not in outputs[1]
    assert "ran 1 cell;" in outputs[0] and "ran 1 cell;" in outputs[1]
