"""The toy experiment's one command, end to end on a model whose answers are known: it says "7"
(p = 0.58) or "8" (p = 0.42) whatever the prompt, so a one-token answer has a pivotal first token."""
import json

import pytest
import yaml

from conftest import ROOT, SEVEN_EIGHT_MODEL, seven_or_eight_run
from experiments.cli import main as experiment_main
from phijax.files import write_jsonl


def main(args):
    return experiment_main(["pts-arith", *args])


def _questions(prefix, answers):
    return [{"id": f"{prefix}{i}", "kind": "math", "prompt": f"Tom has {i} apples. How many?",
             "answer": a} for i, a in enumerate(answers)]


@pytest.mark.slow
def test_one_command_runs_pts_and_sequence_dpo_and_reports_accuracy(tmp_path, capsys):
    base = seven_or_eight_run(tmp_path / "base")
    out = tmp_path / "exp"
    write_jsonl(out / "data" / "train.jsonl", [{"id": "t", "messages": [
        {"role": "user", "content": "?"}, {"role": "assistant", "content": "7"}]}])
    write_jsonl(out / "data" / "pts.jsonl", _questions("p", ["7"] * 40))
    write_jsonl(out / "data" / "heldout.jsonl", _questions("h", ["7", "8"] * 10))
    dpo = yaml.safe_load((ROOT / "configs" / "experiments" / "arith-dpo.yaml").read_text())
    dpo["model"].update(SEVEN_EIGHT_MODEL)
    dpo["train"].update(steps=4, batch_size=8, log_every=1)
    dpo["mesh"] = {"data": 2, "fsdp": 4, "tensor": 1}  # the 8 virtual devices of the tests
    dpo["checkpoint"]["every"] = 4
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    args = [str(ROOT / "configs" / "experiments" / "pts-arith.yaml"), f"out={out}",
            f"base_run={base}", f"dpo_config={tmp_path / 'dpo.yaml'}", "pts.rollouts=16",
            "pts.recheck=32", "pts.max_new_tokens=1", "pts.batch_rows=64",
            "sequence_samples=8", "eval.max_new_tokens=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| model | DPO pairs | greedy accuracy") and len(printed) == 6
    summary = json.loads(printed[-1])
    # Greedy "7" is right on half the held-out questions before any DPO; sampling "7" (p = 0.58)
    # or "8" is right on half the samples too, whatever the question.
    assert summary["base"]["greedy"] == {"accuracy": 0.5, "stderr": pytest.approx(0.5 / 20 ** 0.5)}
    assert summary["base"]["sampled"]["accuracy"] == pytest.approx(0.5, abs=0.15)
    pts = [json.loads(l) for l in (out / "pairs-pts.jsonl").read_text().splitlines()]
    seq = [json.loads(l) for l in (out / "pairs-seq.jsonl").read_text().splitlines()]
    assert pts and len(seq) == len(pts) == summary["pairs"]["pts"] == summary["pairs"]["sequence"]
    # Sequence pairs spread over the questions, one each: all 40 are sampled although the first
    # 32 (one sampling call) already hold enough pairs (they gave 31 questions for 38 pairs).
    assert len({p["question_id"] for p in seq}) == len(seq)
    from phijax.data.tokenizer import Tokenizer
    tok = Tokenizer(base / "tokenizer.model")
    seven, eight = tok.encode(["7"])[0][0], tok.encode(["8"])[0][0]
    for p in pts:  # the searched answer is "7" (p goes ~0.6 -> 1) or "8" (~0.6 -> 0): either
        # way "7" is chosen and "8" rejected
        assert (p["chosen_ids"], p["rejected_ids"]) == ([seven], [eight])
        assert p["p_after"] in (0.0, 1.0) and 0.2 <= p["p_before"] <= 0.8
    for p in seq:
        assert p["chosen_ids"][0] == seven and p["rejected_ids"][0] == eight
    results = json.loads((out / "results.json").read_text())
    assert {"base", "sequence_dpo", "pts_dpo", "pts_search"} <= set(results)
    for name in ("dpo-pts", "dpo-seq"):
        assert (out / name / "checkpoints" / "4").is_dir()
    # A rerun finds every stage done and prints the same table.
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[:5] == printed[:5]


def test_bad_experiment_keys_are_named(tmp_path, capsys):
    cfg = str(ROOT / "configs" / "experiments" / "pts-arith.yaml")
    assert main([cfg, "pts.rolouts=3"]) == 2
    assert "unknown key pts.rolouts (did you mean pts.rollouts?)" in capsys.readouterr().err
    assert main([cfg, "pts.recheck=4"]) == 2
    assert "pts.recheck 4: must be at least pts.rollouts (32)" in capsys.readouterr().err
    assert main([cfg, "eval.split=test"]) == 2
    assert "eval.split: 'test' is not one of heldout, valid" in capsys.readouterr().err
    assert main([cfg, f"dpo_config={tmp_path / 'none.yaml'}"]) == 2
    assert "dpo_config:" in capsys.readouterr().err


def test_lift_and_its_paired_standard_error():
    from experiments.pts_arith.run import lift
    before = {"accuracy": 0.5, "rates": [0, 1, 0, 1]}
    after = {"accuracy": 0.5, "rates": [1, 1, 0, 0]}
    diff, err = lift(after, before)  # differences 100, 0, 0, -100 points
    assert diff == 0 and err == pytest.approx((20000 / 4 / 4) ** 0.5)
    assert lift({"accuracy": 0.6}, before) == (pytest.approx(10.0), None)  # no per-question rates
