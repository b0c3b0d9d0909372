"""phijax.eval.accuracy and `phijax eval`: accuracy and standard error over a real (tiny, hand-set) checkpoint, the CLI's
table and JSON line, and one-line errors for bad question records."""
import json
import math

import numpy as np
import pytest

from conftest import run_cli, seven_or_eight_run
from phijax.eval.accuracy import EvalConfig, evaluate, summarize
from phijax.eval.questions import load_questions
from phijax.sampling import load_sampler


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return seven_or_eight_run(tmp_path_factory.mktemp("evaluate") / "run")


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_sampler(run_dir)


def _questions(answers):
    return [{"id": f"q{i}", "kind": "math", "prompt": f"Tom has {i} apples. How many?",
             "answer": a} for i, a in enumerate(answers)]


def test_summarize_averages_samples_per_question_then_takes_stderr_over_questions():
    one = summarize([[True], [True], [True], [False]])
    assert one["accuracy"] == 0.75 and one["n"] == 4
    assert one["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # binomial
    many = summarize([[True, False], [True, True], [False, False], [True, False]])
    assert many["accuracy"] == pytest.approx(0.5)
    rates = np.array([0.5, 1.0, 0.0, 0.5])
    assert many["stderr"] == pytest.approx(math.sqrt(rates.var() / 4))
    assert summarize([[True, True]] * 5)["stderr"] == 0.0


# Every evaluate call below runs 4 prompts x 8 rows per generate call (one compiled program)
# but the one that checks batching, so the file compiles twice.

def test_greedy_accuracy_on_a_controlled_model(loaded):
    sampler, tok = loaded
    qs = _questions(["7", "7", "8", "7", "7", "9"])
    out = evaluate(sampler, tok, qs, EvalConfig(temperature=0.0, max_new_tokens=1, batch=4),
                   details=True)
    assert [r["completions"] for r in out["results"]] == [["7"]] * 6
    assert [r["correct"] for r in out["results"]] == [1, 1, 0, 1, 1, 0]
    assert out["accuracy"] == pytest.approx(4 / 6) and out["n"] == 6
    assert out["stderr"] == pytest.approx(math.sqrt(4 / 6 * 2 / 6 / 6))
    greedy = EvalConfig(max_new_tokens=1, batch=4)
    assert evaluate(sampler, tok, _questions(["7"] * 4), greedy)["accuracy"] == 1.0
    assert evaluate(sampler, tok, _questions(["5"] * 4), greedy)["accuracy"] == 0.0
    # prompt_ids are used as given; longer completions are decoded whole ("777")
    ids = tok.encode_prompt([{"role": "user", "content": "Tom has 3 apples."}])
    q = {"id": "ids", "kind": "math", "prompt_ids": ids, "answer": "777"}
    out = evaluate(sampler, tok, [q] + _questions(["7"] * 3),
                   EvalConfig(max_new_tokens=3, batch=4), details=True)
    assert out["results"][0]["completions"] == ["777"] and out["accuracy"] == 0.25


def test_samples_are_averaged_per_question_and_fixed_by_seed_and_id(loaded):
    sampler, tok = loaded
    qs = _questions(["7"] * 16)
    run = lambda qs, seed, batch: evaluate(sampler, tok, qs, EvalConfig(
        temperature=1.0, samples=2, max_new_tokens=1, seed=seed, batch=batch), details=True)
    out = run(qs, 3, 8)
    rates = np.array([r["correct"] / r["samples"] for r in out["results"]])
    assert {c for r in out["results"] for c in r["completions"]} == {"7", "8"}
    assert 0.2 < out["accuracy"] < 0.8 and out["accuracy"] == pytest.approx(rates.mean())
    assert out["stderr"] == pytest.approx(math.sqrt(rates.var() / 16))
    again = run(qs[::-1], 3, 4)  # another order and batching: the same samples
    assert {r["id"]: r["completions"] for r in again["results"]} == \
        {r["id"]: r["completions"] for r in out["results"]}
    other = run(qs, 4, 8)
    assert [r["completions"] for r in other["results"]] != [r["completions"] for r in out["results"]]


def _cli(*args):
    return run_cli("eval", *args, check=False)


def test_cli_prints_a_table_and_one_json_line(run_dir, tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in _questions(["7", "7", "7", "8"])))
    res = _cli(run_dir, "--questions", qfile, "max_new_tokens=1", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].split() == ["task", "metric", "value", "±", "stderr", "n"]
    assert lines[1].split()[:2] == ["arith", "accuracy"]
    got = json.loads(lines[-1])["arith"]["accuracy"]
    assert got["value"] == 0.75 and got["n"] == 4
    assert got["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    records = [json.loads(l) for l in
               (tmp_path / "out" / "items" / "arith.jsonl").read_text().splitlines()]
    assert [r["score"] for r in records] == [1, 1, 1, 0]
    assert "prompts/s" in res.stderr


@pytest.mark.parametrize("line, reason", [
    ('{"id": "a", "kind": "math", "prompt": "x"}', "needs a string answer"),
    ('{"id": "a", "kind": "poem", "prompt": "x", "answer": "1"}', "kind must be one of"),
    ('{"id": "a", "kind": "math", "prompt": "x", "answer": "1"', "invalid JSON"),
    ('{"id": "q0", "kind": "math", "prompt": "x", "answer": "1"}', "already used at line 1"),
])
def test_a_bad_record_fails_in_one_line_naming_file_and_line(tmp_path, line, reason):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps(_questions(["1"])[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=f"q.jsonl:3: .*{reason}"):
        load_questions(qfile)
    if "already" in reason:  # one CLI run: the model (missing here) is never loaded
        res = _cli(tmp_path / "no-such-run", "--questions", qfile)
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr.strip().count("\n") == 0
        assert f"{qfile}:3: id 'q0' already used at line 1" in res.stderr
