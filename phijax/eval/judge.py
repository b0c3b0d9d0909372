"""Short answers graded by a judge model at any OpenAI-compatible endpoint, as SimpleQA grades
them: the judge reads the question, the gold answer and the model's answer and replies A
(correct), B (incorrect) or C (not attempted)."""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from phijax.config import positive
from phijax.errors import EndpointError

GRADER = """Grade a predicted answer to a question against the gold target.
A: CORRECT - the prediction contains the gold target's meaning and nothing contradicting it
(hedging is fine if the gold target is stated; small spelling slips are fine).
B: INCORRECT - the prediction contradicts the gold target or states a wrong answer.
C: NOT_ATTEMPTED - the prediction does not give an answer (e.g. "I don't know") and does not
contradict the gold target.

Question: {question}
Gold target: {target}
Predicted answer: {predicted}

Reply with one letter: A, B or C."""

GRADES = {"A": "correct", "B": "incorrect", "C": "not_attempted"}


@dataclass
class JudgeEndpoint:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    concurrency: int = positive(8)
    timeout_s: float = positive(60.0)


def _grade_reply(text: str) -> str | None:
    m = re.search(r"\b([ABC])\b", text or "")
    return GRADES[m[1]] if m else None


def judge_short_answers(endpoint: JudgeEndpoint, questions: list[str], targets: list[str],
                        answers: list[str]) -> list[dict]:
    """One grade per answer ({"grade", "score", "extracted": the judge's reply}); an
    unparsable reply counts as not attempted."""
    import openai

    client = openai.OpenAI(base_url=endpoint.base_url, timeout=endpoint.timeout_s,
                           api_key=os.environ.get(endpoint.api_key_env) or "local",
                           max_retries=2)

    def one(args) -> dict:
        question, target, answer = args
        prompt = GRADER.format(question=question, target=target, predicted=answer)
        try:
            reply = client.chat.completions.create(
                model=endpoint.model, temperature=0.0, max_tokens=8,
                messages=[{"role": "user", "content": prompt}]).choices[0].message.content
        except openai.APIError as e:
            raise EndpointError(f"judge {endpoint.base_url} model {endpoint.model!r}: "
                                f"{type(e).__name__}: {' '.join(str(e).split())}") from None
        grade = _grade_reply(reply) or "not_attempted"
        return {"extracted": reply, "grade": grade, "score": float(grade == "correct")}

    with ThreadPoolExecutor(endpoint.concurrency) as pool:
        return list(pool.map(one, zip(questions, targets, answers)))
