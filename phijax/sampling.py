"""Batched sampling: one prefill of every distinct prompt, then decoding with a static KV cache.

`Sampler.generate` takes requests (token-id prompts, so a prefix is continued exactly as given),
and returns, per request, its `n` samples with per-token log-probabilities (and, where asked,
the most likely tokens at each step) and finish reasons. It admits every request into a
`phijax.rows.Rows` batch at once (one prefill per prompt, fanned out to its samples), then runs
decode segments of 32 steps until every row is done; between segments the rows still going are
gathered into the smallest bucket that holds them, so rows that stopped early cost nothing
afterwards. `phijax serve` drives the same batch continuously (requests join between segments).
See `phijax.decoding` for the programs, the slot layout and the row randomness: a sample does
not depend on what else is in the batch, so a seeded request gives the same tokens however it
is batched. `Sampler.prompt_logprobs` scores prompts with the model's forward pass
(`phijax.scoring`).

Temperature 0 is greedy; top-k (0 = off) and top-p filter after temperature. Log-probabilities
are the model's (temperature 1, unfiltered), which is what PTS and evaluation need. Where the
model's vocabulary is larger than its tokenizer's (`vocab_limit`), the ids past the tokenizer
are never drawn. On a mesh, rows are split over the data axes and heads over `tensor` by the
parameters' shardings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from phijax.config import ModelConfig
from phijax.decoding import MAX_TOP, SEGMENT
from phijax.errors import ConfigError
from phijax.model import decoding_params
from phijax.rows import Emit, Rows, Seq
from phijax.sharding import RULES


@dataclass
class Request:
    prompt: list[int]  # token ids to continue
    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int = 0
    top_logprobs: int = 0  # most likely tokens (and log-probs) reported per new token


@dataclass
class Sample:
    tokens: list[int]  # new tokens; a stop token that ended the sample is the last one
    logprobs: list[float]  # model log-probability of each new token
    finish_reason: str  # "stop" | "length"
    # per new token, the request's top_logprobs most likely (id, log-prob), most likely first;
    # None when the request asks for none
    top_logprobs: list[list[tuple[int, float]]] | None = None


def check_request(r: Request, max_len: int, vocab_size: int) -> str | None:
    """Why `r` cannot be sampled, or None."""
    if not r.prompt:
        return "prompt is empty"
    if min(r.prompt) < 0 or max(r.prompt) >= vocab_size:
        return f"prompt has token ids outside [0, {vocab_size})"
    if r.n < 1:
        return f"n must be at least 1, got {r.n}"
    if r.max_new_tokens < 1:
        return f"max_new_tokens must be at least 1, got {r.max_new_tokens}"
    if len(r.prompt) + r.max_new_tokens > max_len:
        return (f"prompt of {len(r.prompt)} tokens + {r.max_new_tokens} new tokens exceeds the "
                f"context length {max_len}")
    if r.temperature < 0:
        return f"temperature must be >= 0, got {r.temperature}"
    if r.top_k < 0:
        return f"top_k must be >= 0, got {r.top_k}"
    if not 0 < r.top_p <= 1:
        return f"top_p must be in (0, 1], got {r.top_p}"
    if not 0 <= r.top_logprobs <= MAX_TOP:
        return f"top_logprobs must be in [0, {MAX_TOP}], got {r.top_logprobs}"
    return None


def seqs_of(requests: list[Request], owner=lambda i, j: (i, j),
            share_prefix: bool = True) -> list[Seq]:
    """The prefills of `requests`: one per request, its n sample rows fanned out from it (or,
    without `share_prefix`, one per sample); row j of request i is owned by owner(i, j)."""
    if share_prefix:
        return [Seq(r.prompt, r, [(owner(i, j), j, 0) for j in range(r.n)])
                for i, r in enumerate(requests)]
    return [Seq(r.prompt, r, [(owner(i, j), j, 0)]) for i, r in enumerate(requests)
            for j in range(r.n)]


class Collect:
    """Each row's tokens, log-probs and top log-probs, gathered from `Emit`s; `sample(owner,
    request)` gives the row's `Sample`."""

    def __init__(self):
        self.rows: dict = {}

    def add(self, emits: list[Emit]) -> None:
        for e in emits:
            tokens, logprobs, top = self.rows.setdefault(e.owner, ([], [], []))
            tokens += e.tokens
            logprobs += e.logprobs
            top += e.top or []

    def sample(self, owner, request: Request) -> Sample:
        tokens, logprobs, top = self.rows.get(owner, ([], [], []))
        reason = "stop" if tokens and tokens[-1] in request.stop_ids else "length"
        return Sample(tokens, logprobs, reason, top if request.top_logprobs else None)


class Sampler:
    """Batched sampling from `params` (a pure dict, as training and `weights.load_params` give)."""

    def __init__(self, cfg: ModelConfig, params, mesh: jax.sharding.Mesh | None = None,
                 vocab_limit: int | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.vocab_limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
        self.max_len = cfg.max_position_embeddings
        self.params = decoding_params(cfg, params)

    def put(self, *arrays):
        """Row arrays split over the mesh's data axes (where the rows divide evenly)."""
        if self.mesh is None:
            return arrays
        rows_sh = NamedSharding(self.mesh, P(RULES["batch"]))
        dp = math.prod(self.mesh.shape[a] for a in RULES["batch"])
        return tuple(jax.device_put(a, rows_sh) if a.shape[0] % dp == 0 else a for a in arrays)

    def check(self, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            error = check_request(r, self.max_len, self.cfg.vocab_size)
            if error:
                raise ConfigError(f"request {i}: {error}")

    def generate(self, requests: list[Request], share_prefix: bool = True) -> list[list[Sample]]:
        """Each request's `n` samples. `share_prefix=False` prefills every sample row on its
        own (the same tokens, for comparison and benchmarks)."""
        self.check(requests)
        rows, got = Rows(self, SEGMENT), Collect()
        got.add(rows.admit(seqs_of(requests, share_prefix=share_prefix)))
        while rows.live:
            got.add(rows.step())
        return [[got.sample((i, j), r) for j in range(r.n)] for i, r in enumerate(requests)]

    def prompt_logprobs(self, prompts: list[list[int]], top: int = 0):
        """Per prompt, the log-prob of each token after the first given those before it, and
        (top > 0) the `top` most likely tokens there: a `phijax.scoring.Scored` each."""
        from phijax.scoring import prompt_logprobs

        return prompt_logprobs(self, prompts, top)


def load_sampler(run_dir: str | Path, mesh: jax.sharding.Mesh | None = None):
    """(Sampler, Tokenizer) of a run directory's latest checkpoint (see
    `phijax.weights.load_checkpoint` for the mesh it lands on)."""
    from phijax.weights import load_checkpoint

    cfg, params, tokenizer, mesh = load_checkpoint(run_dir, mesh)
    return Sampler(cfg.model, params, mesh, vocab_limit=tokenizer.vocab_size), tokenizer
