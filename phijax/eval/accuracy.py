"""Accuracy of a checkpoint on a question set, with its standard error.

Questions are `phijax.eval.questions` records (`{"id", "kind", "prompt" | "prompt_ids", "answer" |
"tests"}`). Each prompt is rendered as a user turn of the chat template (`prompt_ids` are used
as given), sampled `samples` times at `temperature` until `<|im_end|>` or `<|endoftext|>`
through `phijax.sampling.Sampler.generate` (many questions per call), decoded and checked with
`phijax.eval.questions.check`.

Accuracy is the mean over questions of each question's success rate (its samples averaged
first); the standard error is over questions, sqrt(var / n) with var the (population) variance
of the per-question rates. With one sample per question that is the binomial sqrt(p (1 - p) / n).
A question's sampling seed is a function of (seed, id), so results do not depend on batching.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from phijax.config import positive, ranged
from phijax.eval.generate import generate_texts
from phijax.eval.questions import check, prompt_ids


@dataclass
class EvalConfig:
    """How a checkpoint answers: greedy at temperature 0, else `samples` answers per question."""
    temperature: float = ranged(0.0, ge=0)
    samples: int = positive(1)  # answers per question
    max_new_tokens: int = positive(64)
    seed: int = 0  # with the question id, fixes each question's samples
    batch: int = positive(64)  # sample rows per generate call
    top_p: float = ranged(1.0, gt=0, le=1)


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / n), var the population variance (0, 0 if empty)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n / n)


def summarize(scores: list[list[bool]]) -> dict:
    """Accuracy and its standard error from per-question sample outcomes: each question's rate
    is the mean of its samples, accuracy the mean rate, and the standard error
    sqrt(var(rates) / n) over the n questions (binomial sqrt(p (1 - p) / n) with one sample)."""
    p, stderr = mean_stderr([sum(s) / len(s) for s in scores])
    return {"accuracy": p, "stderr": stderr, "n": len(scores)}


def evaluate(sampler, tokenizer, questions: list[dict], cfg: EvalConfig = EvalConfig(),
             details: bool = False) -> dict:
    """{"accuracy", "stderr", "n", "samples", "temperature", "seconds"[, "results"]}.

    Each call samples `cfg.batch` rows (questions per call: batch // samples, at least one).
    `details` adds per-question results: {"id", "correct" (samples that succeeded),
    "samples", "completions"}."""
    t0 = time.perf_counter()
    answers = generate_texts(sampler, tokenizer, [prompt_ids(q, tokenizer) for q in questions],
                             [q["id"] for q in questions], samples=cfg.samples,
                             temperature=cfg.temperature, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch=cfg.batch,
                             label="evaluate")
    scores = [[check(q, text) for text in texts] for q, texts in zip(questions, answers)]
    out = {**summarize(scores), "samples": cfg.samples, "temperature": cfg.temperature,
           "seconds": round(time.perf_counter() - t0, 2)}
    if details:
        out["results"] = [{"id": q["id"], "correct": sum(ok), "samples": len(ok),
                           "completions": texts}
                          for q, ok, texts in zip(questions, scores, answers)]
    return out
