"""Final-answer normalisation (phijax.eval.answers) and the Phi-4 difficulty filter (tools.stages)."""
import pytest

from phijax.eval.answers import last_boxed, normalize_answer
from tools.stages.reasoning import difficulty_filter


@pytest.mark.parametrize("text, want", [
    (r"so the result is \boxed{\frac{3}{4}}.", "3/4"),
    (r"$\dfrac{6}{8}$", "3/4"),
    ("0.75", "3/4"),
    ("The answer is 3/4", "3/4"),
    (r"\boxed{\tfrac34}", "3/4"),
    ("1,000", "1000"),
    ("The answer is 1,000.", "1000"),
    (r"\boxed{1{,}000}", "1000"),
    ("Answer: $4.0$", "4"),
    (r"\boxed{-\frac12}", "-1/2"),
    (r"\boxed{50\%}", "50"),
    (r"$90^\circ$", "90"),
    ("We add them and get 12 apples, so x = 12", "12"),
    ("The final answer is 42 apples.", "42"),
    (r"first \boxed{1}, then \boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"\boxed{x^{2}+\frac{1}{2}}", "x^{2}+(1)/(2)"),
    (r"\boxed{\text{Paris}}", "paris"),
    (r"\boxed{{3}}", "3"),
])
def test_normalize_math(text, want):
    assert normalize_answer(text) == want


def test_nested_boxed_braces():
    assert last_boxed(r"\boxed{1} and \boxed{\frac{a^{2}}{b_{1}}} end") == r"\frac{a^{2}}{b_{1}}"
    assert last_boxed(r"no box") is None and last_boxed(r"\boxed{unclosed") is None
    assert normalize_answer(r"\boxed{\frac{a^{2}}{b}}") == normalize_answer(r"$\boxed{\frac{a^{2}}{b}}$")


@pytest.mark.parametrize("text", ["(B)", "B)", "answer: b", "Answer: (b)", "The correct option is B",
                                  "So the correct answer is B.", r"\boxed{B}", r"\boxed{\text{(B)}}",
                                  "Let me think... the answer is B because the others fail."])
def test_choice_letters(text):
    assert normalize_answer(text, "choice") == "B"
    assert normalize_answer(text) == "B"


def test_choice_auto_does_not_eat_words():
    assert normalize_answer("The answer is a prime number") != "A"
    assert normalize_answer("I cannot decide", "choice") is None


@pytest.mark.parametrize("text", [None, "", "   ", "I don't know.", "no idea at all"])
def test_unparseable(text):
    assert normalize_answer(text) is None


def test_all_agree_dropped():
    d = difficulty_filter([r"\boxed{3/4}", "0.75", r"Answer: \frac{3}{4}", "the answer is 3/4"])
    assert not d.keep and d.reason == "all_agree" and d.agreement == 1.0 and d.reference == "3/4"


def test_none_agree_dropped():
    d = difficulty_filter([r"\boxed{1}", r"\boxed{2}", r"\boxed{3}", "no idea"])
    assert not d.keep and d.reason == "none_agree" and d.count == 1
    d = difficulty_filter(["no idea", "?", "dunno"])  # nothing parses: none agree
    assert not d.keep and d.reason == "none_agree" and d.reference is None


def test_plurality_kept():
    answers = [r"\boxed{1,000}", "1000", "The answer is 999", r"\boxed{1000.0}", "I give up"]
    d = difficulty_filter(answers)
    assert d.keep and d.reason == "kept"
    assert d.reference == "1000" and d.count == 3 and d.k == 5
    assert d.agreement == pytest.approx(0.6) and d.reference_index == 0


def test_unparseable_never_agree_and_ties_are_deterministic():
    d = difficulty_filter([None, "no idea", "none", r"\boxed{5}"])
    assert d.reason == "none_agree"
    a = difficulty_filter(["(A)", "(A)", "(C)", "(C)"], "choice")
    b = difficulty_filter(["(C)", "(C)", "(A)", "(A)"], "choice")
    assert a.keep and a.tie and a.reference == b.reference == "A" and a.agreement == 0.5


def test_too_few_answers():
    assert difficulty_filter([r"\boxed{2}"]).reason == "too_few"
