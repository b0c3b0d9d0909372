"""Answers from a checkpoint for evaluation: many prompts per `Sampler.generate` call, `samples`
answers per prompt from one prefill (shared-prefix fan-out), decoded without the stop token.

A prompt's sampling seed is a function of (seed, its id), so answers do not depend on the
batching, the order of the prompts or which other prompts are evaluated with them.
"""
from __future__ import annotations

import logging
import time

from phijax.errors import ConfigError
from phijax.eval.questions import answer_text, question_seed

log = logging.getLogger("phijax.eval")


def generate_texts(sampler, tokenizer, prompts: list[list[int]], ids: list, *, samples: int = 1,
                   temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                   seed: int = 0, batch: int = 64, label: str = "eval") -> list[list[str]]:
    """For each prompt (token ids), its `samples` answers as text. `batch` is the number of
    sample rows per call; a short last call is padded to the same size (no new compile)."""
    from phijax.sampling import Request

    per_call = max(1, batch // samples)
    out: list[list[str]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), per_call):
        requests = [Request(p, n=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, stop_ids=tokenizer.stop_ids,
                            seed=question_seed(seed, i))
                    for p, i in zip(prompts[start:start + per_call], ids[start:start + per_call])]
        padded = requests + [requests[0]] * (per_call - len(requests)) \
            if len(prompts) > per_call else requests
        for got in sampler.generate(padded)[:len(requests)]:
            out.append([answer_text(s.tokens, tokenizer) for s in got])
        rate = len(out) / (time.perf_counter() - t0)
        log.info("%s: %d/%d prompts, %.1f prompts/s, eta %.0fs", label, len(out), len(prompts),
                 rate, (len(prompts) - len(out)) / rate)
    return out


def fit_prompt(ids: list[int], max_new_tokens: int, max_len: int) -> list[int]:
    """A prompt that leaves room for `max_new_tokens`: its last tokens when it is too long."""
    room = max_len - max_new_tokens
    if room < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room in the context "
                          f"length {max_len}")
    return ids[-room:]
