"""Orbax checkpoints: exact resume after SIGTERM or Ctrl-C, and restore onto a different mesh."""
import signal
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, read_metrics, run_cli
from phijax.config import CheckpointConfig, load_config
from phijax.sharding import make_mesh
from phijax.train.checkpoint import Checkpointer
from phijax.train.step import build_trainer
from test_sharding import SMALL

TINY = ROOT / "configs" / "tiny.yaml"


def test_restore_onto_a_different_mesh(tmp_path):
    """8 devices (fsdp=8) -> 1 device -> 8 devices (data=2,fsdp=2,tensor=2), values exact."""
    def trainer_for(*mesh):
        cfg = load_config(None, SMALL + list(mesh))
        devices = jax.devices()[:int(np.prod(cfg.mesh.shape))]
        mesh = make_mesh(cfg.mesh, devices)
        return build_trainer(cfg, mesh), mesh

    trainer, mesh = trainer_for("mesh.fsdp=8")
    with jax.set_mesh(mesh):
        state = trainer.init()
    saved = jax.tree.map(np.asarray, state)
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig())
    ckpt.save(3, state, {"step": 3, "seed": 0})
    ckpt.close()
    for step, target in ((3, ()), (4, ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))):
        trainer, mesh = trainer_for(*target)
        ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig())
        with jax.set_mesh(mesh):
            restored, data = ckpt.restore(step, trainer.abstract_state)
        assert data == {"step": step, "seed": 0}
        leaves = jax.tree.leaves(restored)
        assert all(len(x.sharding.device_set) == mesh.size for x in leaves)
        for a, b in zip(jax.tree.leaves(saved), leaves):
            np.testing.assert_array_equal(a, np.asarray(b))
        ckpt.save(4, restored, {"step": 4, "seed": 0})
        ckpt.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 42), (signal.SIGINT, 0)])
def test_a_signal_then_resume_equals_uninterrupted_run(tmp_path, cache_dir, sig, status):
    """SIGTERM (a preemption: exit 42, which schedulers retry) and Ctrl-C (SIGINT: exit 0)
    both save a checkpoint; the resume is exact."""
    common = [TINY, "train.steps=12", "train.log_every=1", "train.eval_every=1000",
              "checkpoint.every=1000", f"data.cache_dir={cache_dir}"]
    run_cli("train", *common, f"run.dir={tmp_path / 'straight'}")
    straight = read_metrics(tmp_path / "straight")
    assert [m["step"] for m in straight] == list(range(1, 13))

    interrupted = tmp_path / "interrupted"
    proc = run_cli("train", *common, f"run.dir={interrupted}", background=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(m["step"] >= 6 for m in read_metrics(interrupted)):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == status, output
    stopped = read_metrics(interrupted)[-1]["step"]
    assert 6 <= stopped < 12, f"stopped at {stopped}\n{output}"
    assert f"stopped at step {stopped} after {sig.name}; checkpoint saved" in output
    assert (interrupted / "checkpoints" / str(stopped)).is_dir()

    resumed = run_cli("train", *common, f"run.dir={interrupted}")
    assert f"resumed from step {stopped}" in resumed.stderr
    after = read_metrics(interrupted)
    assert [m["step"] for m in after] == list(range(1, 13))
    assert [m["loss"] for m in after] == [m["loss"] for m in straight]  # bitwise
    assert [m["grad_norm"] for m in after] == [m["grad_norm"] for m in straight]
