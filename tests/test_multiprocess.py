"""Two JAX processes (4 virtual CPU devices each, gloo collectives) stop together when one of
them is interrupted. (Two processes training like one, under each launcher's environment, and
the preemption contract: tests/test_distributed.py.)"""
import re
import signal

import pytest

from conftest import ROOT, read_metrics
from launchers import finish, signal_at_step, start_two

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.slow
def test_ctrl_c_to_one_process_stops_both_at_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    procs = start_two(TINY, "data.synthetic=true", "train.steps=500", "train.log_every=1",
                      "train.eval_every=1000", "checkpoint.every=1000", f"run.dir={run_dir}",
                      "mesh.fsdp=8")
    signal_at_step(procs, run_dir, 3, signal.SIGINT)
    outputs = finish(procs, 120)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    stopped = [int(re.search(r"stopped at step (\d+) after ", out).group(1)) for out in outputs]
    assert stopped[0] == stopped[1] < 500, outputs
    assert "after SIGINT" in outputs[1] and "after a signal to another process" in outputs[0]
    assert read_metrics(run_dir)[-1]["step"] == stopped[0]
    assert (run_dir / "checkpoints" / str(stopped[0])).is_dir()
