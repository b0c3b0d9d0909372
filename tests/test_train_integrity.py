"""A run never applies or saves a non-finite step, never loses its last good checkpoint, and a
resume that cannot work says why in one line before anything compiles."""
import logging
import math
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from conftest import ROOT, read_metrics, run_cli

TINY = ROOT / "configs" / "tiny.yaml"
SYNTHETIC = [TINY, "data.synthetic=true", "model.hidden_size=64", "model.intermediate_size=128",
             "model.num_hidden_layers=1", "data.seq_len=32", "train.batch_size=4",
             "train.log_every=1", "train.eval_every=1000", "checkpoint.every=2",
             "checkpoint.async_save=false"]
# Learning rate 1e3 and weight decay 0.1 multiply the weights by ~-99 each step: the gradients
# overflow after a few finite steps (step 6 on the tiny model and corpus).
EXPLODING = ["optimizer.learning_rate=1e3", "optimizer.warmup_steps=0"]


def _checkpoints(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _last_line(out) -> str:
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    from phijax.sharding import make_mesh
    from phijax.weights import load_config, load_params

    run_dir = tmp_path / "run"
    common = [TINY, "train.steps=12", "train.log_every=3", "train.eval_every=1000",
              "checkpoint.every=2", f"data.cache_dir={cache_dir}", f"run.dir={run_dir}", *EXPLODING]
    out = run_cli("train", *common, check=False)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    line = _last_line(out)
    bad = int(re.match(r"phijax: error: step (\d+): ", line).group(1))
    assert "not finite" in line and "train.on_nonfinite=skip" in line, line
    assert re.search(r"sources python-docs \d+, python-stdlib \d+ windows", line), line
    saved = _checkpoints(run_dir)
    assert saved and saved[-1] == (bad - 1) // 2 * 2, (saved, line)  # every save before it
    assert f"last checkpoint: step {saved[-1]}" in line
    assert all(m["step"] < bad and math.isfinite(m["loss"]) for m in read_metrics(run_dir))
    params = load_params(run_dir, make_mesh(load_config(run_dir).mesh, jax.devices()[:1]))[1]
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))

    # The kept checkpoint resumes; `skip` steps over the non-finite steps and counts them.
    out = run_cli("train", *common, "train.on_nonfinite=skip")
    assert f"resumed from step {saved[-1]}" in out.stderr
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 12 and last["skipped_steps"] >= 1
    assert "skipped" in out.stderr


def test_skip_counts_nonfinite_steps_and_the_state_stays_finite(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", *SYNTHETIC, "train.steps=10", f"run.dir={run_dir}", *EXPLODING,
            "train.on_nonfinite=skip")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert metrics[0]["skipped_steps"] == 0 and metrics[-1]["skipped_steps"] >= 1
    assert all(math.isfinite(m["loss"]) for m in metrics if m["skipped_steps"] == 0)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", *SYNTHETIC, "train.steps=4", f"run.dir={run_dir}")
    assert _checkpoints(run_dir) == [2, 4]
    for path in (run_dir / "checkpoints" / "4").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"")  # the array data, truncated
    out = run_cli("train", *SYNTHETIC, "train.steps=6", f"run.dir={run_dir}")
    warnings = [l for l in out.stderr.splitlines() if "checkpoint 4 cannot be read" in l]
    assert len(warnings) == 1 and "resuming from step 2" in warnings[0], out.stderr
    assert "Traceback" not in out.stderr
    assert "resumed from step 2" in out.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 7))
    assert _checkpoints(run_dir) == [4, 6]
    assert (run_dir / "checkpoints" / "4.corrupt").is_dir()  # kept aside, not deleted


def test_a_failed_restores_other_reads_report_nothing(tmp_path, caplog):
    """A checkpoint whose data file is truncated fails every one of its many reads; orbax
    gives up at the first, and the others, finishing after, must not be reported (asyncio's
    "exception was never retrieved", on some runs only: hence many restores)."""
    import gc
    from phijax.config import CheckpointConfig
    from phijax.train.checkpoint import Checkpointer

    state = {f"w{i}": np.full((8, 8), i, np.float32) for i in range(48)}
    saved = Checkpointer(tmp_path / "saved", CheckpointConfig(async_save=False))
    for step in (2, 4):
        saved.save(step, state, {"step": step})
    saved.close()
    for path in (tmp_path / "saved" / "4").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"")
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                            state)
    caplog.set_level(logging.WARNING)
    for attempt in range(30):
        shutil.copytree(tmp_path / "saved", tmp_path / f"try{attempt}")
        ckpt = Checkpointer(tmp_path / f"try{attempt}", CheckpointConfig(async_save=False))
        step, restored, data = ckpt.restore_latest(abstract)
        assert step == 2 and data == {"step": 2}
        np.testing.assert_array_equal(restored["w7"], state["w7"])
        ckpt.close()
        gc.collect()
    reports = [r for r in caplog.records if r.name == "asyncio"]
    assert not reports, reports[0].getMessage()[:300]
    assert len([r for r in caplog.records if "checkpoint 4 cannot be read" in r.getMessage()]) == 30


def test_no_readable_checkpoint_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", *SYNTHETIC, "train.steps=2", f"run.dir={run_dir}")
    shutil.rmtree(run_dir / "checkpoints" / "2" / "state")
    out = run_cli("train", *SYNTHETIC, "train.steps=4", f"run.dir={run_dir}", check=False)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert re.match(r"phijax: error: .*checkpoints: no checkpoint can be read", _last_line(out))


def test_a_resume_with_another_model_shape_is_one_line_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", *SYNTHETIC, "train.steps=2", f"run.dir={run_dir}")
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    out = run_cli("train", *SYNTHETIC, "train.steps=4", f"run.dir={run_dir}",
                  "model.hidden_size=32", "model.num_hidden_layers=2", check=False)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    line = _last_line(out)
    assert line.startswith("phijax: error: ") and f"run.dir {run_dir}" in line
    assert "model.hidden_size 64 -> 32" in line and "model.num_hidden_layers 1 -> 2" in line, line
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    # Settings that leave the state's shapes alone still resume.
    run_cli("train", *SYNTHETIC, "train.steps=4", f"run.dir={run_dir}", "model.remat=full",
            "optimizer.learning_rate=1e-3")
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_ctrl_c_stops_like_sigterm_and_a_second_one_aborts():
    from phijax.train.loop import _StopFlag

    before = signal.getsignal(signal.SIGINT)
    stop = _StopFlag()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop() and stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is before
