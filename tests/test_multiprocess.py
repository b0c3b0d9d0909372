"""Two JAX processes (4 virtual CPU devices each, gloo collectives) train like one process."""
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, read_metrics, run_cli

COMMON = ["train.steps=4", "train.log_every=1", "train.eval_every=1000", "checkpoint.every=1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, cache_dir):
    tiny = ROOT / "configs" / "tiny.yaml"
    run_cli("train", tiny, *COMMON, f"run.dir={tmp_path / 'one'}", f"data.cache_dir={cache_dir}")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "phijax", "train", str(tiny), *COMMON, "mesh.fsdp=8",
             f"run.dir={tmp_path / 'two'}", f"data.cache_dir={cache_dir}"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()
