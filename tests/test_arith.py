"""The toy arithmetic task of the PTS experiment (templates split train/held-out, worked solutions the
oracle accepts, deterministic files written atomically)."""
import json
import random

import pytest

from conftest import run_script
from experiments.pts_arith import arith
from phijax.eval.questions import check, question_error
from phijax.files import write_jsonl


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_held_out_templates_are_disjoint_but_exercise_train_operations():
    train = {t.name for t in arith.TRAIN}
    heldout = {t.name for t in arith.HELDOUT}
    assert len(train) == len(arith.TRAIN) >= 10 and len(heldout) == len(arith.HELDOUT) >= 6
    assert not train & heldout
    assert not {t.text for t in arith.TRAIN} & {t.text for t in arith.HELDOUT}
    ops = lambda templates: set().union(*(t.op_sequences() for t in templates))
    assert ops(arith.HELDOUT) == ops(arith.TRAIN)
    assert {len(o) for o in ops(arith.TRAIN)} == {2, 3}
    for split, templates in (("heldout", arith.HELDOUT), ("train", arith.TRAIN)):
        for p in arith.generate(split, 200):  # each problem's steps are one of its template's
            t = next(t for t in templates if t.name == p["template"])
            steps = "".join(x.split(" ")[1] for x in p["solution"].split(". ")[:-1])
            assert steps in t.op_sequences()
    splits = {sp: {p["template"] for p in arith.generate(sp, 64)}
              for sp in ("train", "heldout", "valid", "pts")}
    assert splits["train"] == splits["pts"] == train
    assert splits["heldout"] == splits["valid"] == heldout


@pytest.mark.parametrize("split", ["train", "heldout", "pts"])
def test_every_worked_solution_passes_the_oracle(split):
    for p in arith.generate(split, 600, seed=3):
        q = arith.as_question(p)
        assert question_error(q) is None
        assert check(q, p["solution"]), p
        assert p["answer"] >= 0
        assert not check(q, p["solution"].replace(f"is {p['answer']}.", f"is {p['answer'] + 1}."))
        # every step is right arithmetic on non-negative numbers
        for step in p["solution"].split(". ")[:-1]:
            lhs, rhs = step.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs) >= 0, step
        assert len(p["solution"].split()) <= 25  # ~40 tokens with digits split


def test_numbers_keep_every_intermediate_non_negative():
    rng = random.Random(0)
    for ops in ("--", "-+-", "*-", "+-+"):
        for _ in range(500):
            values = arith.numbers(ops, rng, max_number=8)
            _, answer = arith.solve(ops, values)
            current = values[0]
            for op, x in zip(ops, values[1:]):
                current = {"+": current + x, "-": current - x, "*": current * x}[op]
                assert current >= 0
            assert answer == current


def test_write_task_is_deterministic_with_unique_stable_ids(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    arith.write_task(a, train=300, heldout=60, pts=120, seed=5, valid=40)
    arith.write_task(b, train=300, heldout=60, pts=120, seed=5, valid=40)
    arith.write_task(c, train=300, heldout=60, pts=120, seed=6, valid=40)
    names = ("train.jsonl", "heldout.jsonl", "valid.jsonl", "pts.jsonl")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    train, heldout, valid, pts = (_lines(a / n) for n in names)
    ids = [r["id"] for r in train + heldout + valid + pts]
    assert len(ids) == len(set(ids)) == 520
    # validation questions come from the held-out templates but never repeat a held-out one
    assert not {q["prompt"] for q in valid} & {q["prompt"] for q in heldout}
    # a larger set keeps the ids and texts of the smaller one (a question is (seed, split, i))
    arith.write_task(c, train=10, heldout=5, pts=5, seed=5)
    assert _lines(c / "heldout.jsonl") == heldout[:5]
    assert [r["role"] for r in train[0]["messages"]] == ["user", "assistant"]
    train_prompts = {r["messages"][0]["content"] for r in train}
    assert not train_prompts & {q["prompt"] for q in pts + heldout}
    for q in heldout + pts:
        assert question_error(q) is None and q["kind"] == "math"
    for r in train:  # the chat's answer is the oracle's answer
        user, assistant = r["messages"]
        assert assistant["content"].startswith(tuple("0123456789"))


def test_pts_questions_never_repeat_a_training_question():
    train = arith.generate("train", 4000, seed=0, max_number=5)  # small: collisions are common
    seen = {p["question"] for p in train}
    pts = arith.generate("pts", 400, seed=0, max_number=5, exclude=seen)
    assert not seen & {p["question"] for p in pts}


def test_cli_writes_atomically_and_prints_counts(tmp_path):
    out = tmp_path / "data"
    cmd = ["arith-data", "--out", out, "--train", "50", "--heldout", "12", "--pts", "7",
           "--seed", "2"]
    res = run_script("phijax-experiment", *cmd)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["train"] == 50
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "pts.jsonl", "train.jsonl",
                                                     "valid.jsonl"]
    assert [len(_lines(out / n)) for n in ("train.jsonl", "heldout.jsonl", "pts.jsonl",
                                           "valid.jsonl")] == [50, 12, 7, 0]
    bad = run_script("phijax-experiment", *cmd[:3], "--train", "-1")
    assert bad.returncode == 2
    assert bad.stderr == "phijax-experiment: error: --train must be >= 0, got -1\n"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"id": "old"}])
    with pytest.raises(TypeError):
        write_jsonl(path, [{"id": "new"}, {"id": object()}])
    assert _lines(path) == [{"id": "old"}]
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]
