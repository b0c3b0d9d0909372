"""Benchmark tasks inside the training loop: `train.eval_tasks` scores the tasks of `phijax eval`
on the live parameters every `train.eval_every` steps and at the last one, for `phijax train`,
`sft` and `dpo` alike."""
import re

import pytest

from conftest import ROOT, read_metrics, run_cli

TINY = ROOT / "configs" / "tiny.yaml"
ARITH = ROOT / "tests" / "data" / "eval" / "arith.jsonl"


@pytest.mark.slow
def test_eval_tasks_are_scored_at_eval_points_and_logged(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    out = run_cli("train", TINY, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
                  "train.steps=4", "train.eval_every=2", "train.log_every=100",
                  "train.eval_batches=1", "checkpoint.every=1000", "train.eval_tasks=[arith]",
                  f"train.eval_paths.arith={ARITH}", "train.eval_limit=2",
                  "train.eval_max_new_tokens=8")
    metrics = read_metrics(run_dir)
    scored = [m for m in metrics if "eval/arith/accuracy" in m]
    assert [m["step"] for m in scored] == [2, 4]
    for m in scored:
        assert 0 <= m["eval/arith/accuracy"] <= 1 and m["eval/arith/accuracy_stderr"] >= 0
        assert "eval_loss" in m  # the held-out loss keeps its schedule
    assert re.search(r"eval tasks at step 2 \([\d.]+s\): arith accuracy [\d.]+ ± [\d.]+ "
                     r"\(2 items\)", out.stderr), out.stderr
    assert "eval tasks at step 4" in out.stderr
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def _one_line_error(out) -> str:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # no traceback, no data prepared, nothing compiled
    last = lines[0]
    assert last.startswith("phijax: error: "), last
    return last


@pytest.mark.parametrize("command", ["train", "sft", "dpo"])
def test_an_unknown_task_is_one_line_before_any_work(tmp_path, command):
    out = run_cli(command, TINY, f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path}",
                  "data.packing=documents", f"run.init_from={tmp_path / 'base'}",
                  "train.eval_tasks=[arith, gsm9k]", f"train.eval_paths.arith={ARITH}",
                  check=False)
    last = _one_line_error(out)
    assert "train.eval_tasks: unknown task 'gsm9k'; known tasks: " in last, last
    assert "arith" in last.split("known tasks:")[1] and "mmlu" in last, last
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_tasks=[arith]"], "train.eval_paths.arith: no data file for task arith"),
    (["train.eval_tasks=[arith]", "train.eval_paths.arith=/nonexistent/arith.jsonl"],
     "train.eval_tasks: task arith: no data file at /nonexistent/arith.jsonl"),
    ([f"train.eval_paths.arith={ARITH}"], "train.eval_paths.arith: arith is not among "
                                          "train.eval_tasks"),
    (["train.eval_tasks=[arith, arith]", f"train.eval_paths.arith={ARITH}"],
     "train.eval_tasks: arith is named twice"),
    (["train.eval_tasks=[arith]", f"train.eval_paths.arith={ARITH}", "data.synthetic=true"],
     "train.eval_tasks needs a tokenizer"),
])
def test_eval_task_mistakes_are_one_line_before_any_compile(tmp_path, overrides, message):
    out = run_cli("train", TINY, f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path}",
                  *overrides, check=False)
    assert message in _one_line_error(out)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_eval_task_keys_load_as_overrides_and_are_checked():
    from phijax.config import load_config
    from phijax.errors import ConfigError

    cfg = load_config(ROOT / "configs" / "sft-phi-4.yaml",
                      ["train.eval_tasks=[gsm8k, mmlu]", "train.eval_data_dir=evals",
                       "train.eval_paths.mmlu=evals/mmlu_dev", "train.eval_limit=50",
                       "train.eval_max_new_tokens=256"])
    t = cfg.train
    assert t.eval_tasks == ["gsm8k", "mmlu"] and t.eval_data_dir == "evals"
    assert t.eval_paths == {"mmlu": "evals/mmlu_dev"}
    assert (t.eval_limit, t.eval_max_new_tokens) == (50, 256)
    assert load_config(TINY, ["train.eval_tasks=arith"]).train.eval_tasks == ["arith"]
    assert load_config(TINY).train.eval_tasks == []
    with pytest.raises(ConfigError, match="^train.eval_limit must be positive, got 0$"):
        load_config(TINY, ["train.eval_limit=0"])
