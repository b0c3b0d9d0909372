import pytest

from phijax.eval.questions import check, question_error
from tools.sandbox import isolation_mode


def test_math_oracle_normalises_both_sides():
    q = {"id": 1, "kind": "math", "prompt": "?", "answer": "0.75"}
    assert check(q, "so we get \\boxed{\\frac{3}{4}}")
    assert check(q, "6/8 of it. The answer is 3/4")
    assert not check(q, "The answer is 4/3")
    assert not check(q, "I do not know")


def test_choice_oracle_compares_letters():
    q = {"id": "c", "kind": "choice", "prompt": "?", "answer": "B"}
    assert check(q, "The correct option is (B).") and not check(q, "Answer: C")


@pytest.mark.skipif(isolation_mode() is None, reason="no sandbox isolation on this machine")
def test_code_oracle_runs_the_tests_in_the_installed_sandbox():
    q = {"id": "f", "kind": "code", "prompt": "?", "tests": "assert double(4) == 8"}
    assert check(q, "Here:\n```python\ndef double(x):\n    return 2 * x\n```")
    assert not check(q, "```python\ndef double(x):\n    return x\n```")


def test_code_answers_go_to_the_given_runner():
    seen = []
    q = {"id": "f", "kind": "code", "prompt": "?", "tests": "assert f() == 1"}
    assert check(q, "```python\ndef f():\n    return 1\n```",
                 run_code=lambda code, tests: seen.append((code, tests)) or True)
    assert seen == [("def f():\n    return 1\n", "assert f() == 1")]


@pytest.mark.parametrize("q, words", [
    ({"kind": "math", "prompt": "?", "answer": "1"}, "no id"),
    ({"id": 1, "kind": "essay", "prompt": "?", "answer": "1"}, "kind must be one of"),
    ({"id": 1, "kind": "math", "answer": "1"}, "exactly one of prompt"),
    ({"id": 1, "kind": "math", "prompt_ids": [], "answer": "1"}, "non-empty list"),
    ({"id": 1, "kind": "code", "prompt": "?"}, "needs a string tests"),
    ({"id": 1, "kind": "choice", "prompt": "?", "answer": "banana split"}, "does not normalise"),
])
def test_bad_questions_are_named(q, words):
    assert words in question_error(q)
