"""The user-facing commands: `phijax info` and the README's main job."""
import re

import pytest

from conftest import ROOT, read_metrics, run_cli


def test_info_phi4_reports_14_66b_params():
    out = run_cli("info", ROOT / "configs" / "phi-4.yaml").stdout
    total = int(re.search(r"total\s+([\d,]+)", out).group(1).replace(",", ""))
    assert abs(total - 14.66e9) / 14.66e9 < 0.005
    for part in ("embedding", "attention", "mlp", "norms", "lm_head"):
        assert part in out


@pytest.mark.slow
def test_main_job_trains_tiny_model_and_loss_falls(tmp_path, cache_dir):
    run_dir = tmp_path / "tiny"
    out = run_cli("train", ROOT / "configs" / "tiny.yaml", f"run.dir={run_dir}",
                  f"data.cache_dir={cache_dir}")
    metrics = read_metrics(run_dir)
    first, last = metrics[0], metrics[-1]
    assert first["step"] == 1 and last["step"] == 300
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    assert last["eval_loss"] < 0.6 * first["loss"]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in last
    assert last["epochs/python-docs"] > 0 and last["epochs/python-stdlib"] > 0
    assert "realized epochs per source: python-docs" in out.stderr
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "300").is_dir()
    assert re.search(r"step 300/300 loss [\d.]+ eval [\d.]+ .* tok/s mfu [\d.]+% \| eta", out.stderr)
    # Rerunning a finished run is a no-op that says so.
    again = run_cli("train", ROOT / "configs" / "tiny.yaml", f"run.dir={run_dir}",
                    f"data.cache_dir={cache_dir}")
    assert "already complete at step 300" in again.stderr
