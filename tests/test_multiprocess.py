"""Two JAX processes (4 virtual CPU devices each, gloo collectives) train like one process, and
stop together when one of them is interrupted."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, read_metrics, run_cli

COMMON = ["train.steps=4", "train.log_every=1", "train.eval_every=1000", "checkpoint.every=1000"]
TINY = ROOT / "configs" / "tiny.yaml"


def start_two(*args) -> list[subprocess.Popen]:
    """`phijax train ARGS` as process 0 and 1 of one JAX job, 4 CPU devices each."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "phijax", "train", *map(str, args), "mesh.fsdp=8"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout: float) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, cache_dir):
    run_cli("train", TINY, *COMMON, f"run.dir={tmp_path / 'one'}", f"data.cache_dir={cache_dir}")
    procs = start_two(TINY, *COMMON, f"run.dir={tmp_path / 'two'}", f"data.cache_dir={cache_dir}")
    outputs = finish(procs, 600)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_ctrl_c_to_one_process_stops_both_at_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    procs = start_two(TINY, "data.synthetic=true", "train.steps=500", "train.log_every=1",
                      "train.eval_every=1000", "checkpoint.every=1000", f"run.dir={run_dir}")
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(m["step"] >= 3 for m in read_metrics(run_dir)):
            procs[1].send_signal(signal.SIGINT)  # the process that does not write the metrics
            break
        time.sleep(0.01)
    outputs = finish(procs, 120)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    stopped = [int(re.search(r"stopped at step (\d+) after ", out).group(1)) for out in outputs]
    assert stopped[0] == stopped[1] < 500, outputs
    assert "after SIGINT" in outputs[1] and "after a signal to another process" in outputs[0]
    assert read_metrics(run_dir)[-1]["step"] == stopped[0]
    assert (run_dir / "checkpoints" / str(stopped[0])).is_dir()
