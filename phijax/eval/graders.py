"""How an answer is scored, per task: final numbers, LaTeX equivalence (math-verify, in worker
processes), short factual answers (correct / incorrect / not attempted), choice letters, and
programs run with their tests in the sandbox (pass@k).

Every grader returns a dict with `score` (a number in [0, 1]) and what it extracted, so a
per-item record shows why an answer scored as it did.
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from phijax.eval.answers import extract_python, normalize_answer
from phijax.eval.questions import check, installed_sandbox


def grade_number(reference: str, completion: str) -> dict:
    """GSM8K: the final answer (boxed, after "the answer is", else the last number)."""
    got = normalize_answer(completion, "math")
    return {"extracted": got, "score": float(got is not None and
                                             got == normalize_answer(reference, "math"))}


def grade_letter(reference: str, completion: str) -> dict:
    """A generated choice: the letter the answer names."""
    got = normalize_answer(completion, "choice")
    return {"extracted": got, "score": float(got == reference)}


def grade_question(question: dict, completion: str) -> dict:
    """A phijax question record (`phijax.eval.questions`)."""
    return {"extracted": normalize_answer(completion, question["kind"])
            if question["kind"] != "code" else None,
            "score": float(check(question, completion))}


# ---------------------------------------------------------------- math-verify

def _verify(pair: tuple[str, str]) -> tuple[str | None, bool]:
    from math_verify import parse, verify
    gold = parse(f"${pair[0]}$")
    pred = parse(pair[1])
    shown = str(pred[-1]) if pred else None
    return shown, bool(gold and pred and verify(gold, pred))


def grade_math(references: list[str], completions: list[str], workers: int = 2) -> list[dict]:
    """MATH: the completion's final answer equivalent to the reference, by math-verify. It
    bounds its own parsing with signal timeouts, which work only in a process's main thread,
    so the checks run in worker processes."""
    if not completions:
        return []
    with ProcessPoolExecutor(max(1, min(workers, len(completions))),
                             mp_context=get_context("spawn")) as pool:
        found = list(pool.map(_verify, zip(references, completions), chunksize=8))
    return [{"extracted": shown, "score": float(ok)} for shown, ok in found]


# ---------------------------------------------------------------- short answers

_HEDGES = ("i don't know", "i do not know", "not sure", "i'm not sure", "i cannot", "i can't",
           "unknown", "no idea", "unable to", "i am not sure")


def normalise_short(text: str) -> str:
    """Lowercase, accents and punctuation removed, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = text.translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def grade_short_answer(answers: list[str], completion: str) -> dict:
    """SimpleQA-style: `correct` when a normalised answer (or alias) is the completion or
    stands in it as whole words, `not_attempted` when the completion is empty or hedges,
    else `incorrect`. Score: 1 for correct."""
    got = normalise_short(completion)
    hedged = not got or any(h in completion.lower() for h in _HEDGES)
    padded = f" {got} "
    correct = any(a and (got == a or f" {a} " in padded)
                  for a in (normalise_short(x) for x in answers))
    grade = "correct" if correct else "not_attempted" if hedged else "incorrect"
    return {"extracted": got, "grade": grade, "score": float(grade == "correct")}


# ---------------------------------------------------------------- programs

_STOPS = re.compile(r"\n(?:def |class |if __name__|print\(|#)")


def program(prompt: str, completion: str, continues_prompt: bool) -> str:
    """The program an answer gives: its last ```python block when it has one; else, for a
    task whose prompt is the program's start (HumanEval), prompt + completion up to the next
    top-level statement; else the completion."""
    block = extract_python(completion)
    if block is not None:
        return block if not continues_prompt or "def " in block else prompt + block
    if continues_prompt:
        stop = _STOPS.search(completion)
        return prompt + (completion[:stop.start()] if stop else completion)
    return completion


def grade_program(code: str, tests: str) -> dict:
    """Whether `code` followed by `tests` passes in the installed sandbox."""
    return {"extracted": code, "score": float(installed_sandbox()(code, tests))}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed:
    1 - C(n - c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
