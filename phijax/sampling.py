"""Batched sampling: one prefill of every distinct prompt, then decoding with a static KV cache.

`Sampler.generate` takes requests (token-id prompts, so a prefix is continued exactly as given),
and returns, per request, its `n` samples with per-token log-probabilities and finish reasons.
Three compiled programs run it on the device:

  prefill   the prompts, left-padded to a common length P, fill cache slots [0, P); each of
            the R sample rows takes its prompt's cache rows (`take`: fan-out), so `n` samples
            of one prompt share one prefill;
  decode    a segment of up to 32 steps (a `while_loop`) feeds each row's last token at slot
            P + t - 1, until the segment ends or every row has hit a stop token or its
            max_new_tokens;
  regroup   between segments, the rows still going are gathered into the smallest bucket that
            holds them and the cache grows by 32 slots: attention reads only the slots written
            so far, and rows that stopped early (most PTS rollouts) cost nothing afterwards.

Row r's randomness is `fold_in(fold_in(key(seed), sample index), step)`: a sample does not
depend on what else is in the batch, so fan-out and independent prefills give the same tokens,
and a seeded request gives the same completion however the server batches it. Temperature 0 is
greedy; top-k (0 = off) and top-p filter after temperature. Log-probabilities are the model's
(temperature 1, unfiltered), which is what PTS and evaluation need. Where the model's vocabulary
is larger than its tokenizer's (`vocab_limit`), the ids past the tokenizer are never drawn.

Shapes are bucketed (prompt length and cache slots to multiples of 32, prompts and rows to
powers of two, rows from 8) so a server compiles a handful of programs. On a mesh,
rows are split over the data axes and heads over `tensor` by the parameters' shardings.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from phijax.config import ModelConfig
from phijax.errors import ConfigError
from phijax.model import decoder_from_params, decoding_params, empty_caches
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


@dataclass
class Sample:
    tokens: list[int]  # new tokens; a stop token that ended the sample is the last one
    logprobs: list[float]  # model log-probability of each new token
    finish_reason: str  # "stop" | "length"


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _rows_bucket(n: int) -> int:
    """Sample rows are padded to a power of two from 8 on: a few compiled shapes."""
    return max(8, _pow2(n))


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


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
    return None


def _draw(keys, logits, block: int = 128):
    """One categorical draw per row by inverting the CDF with a single uniform.

    The usual Gumbel trick needs a random number per vocabulary entry, and a full-length cumsum
    is slow on XLA:CPU; so the CDF is inverted in two levels: over sums of blocks of `block`
    entries, then within the chosen block.
    """
    rows, vocab = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.pad(probs, ((0, 0), (0, -vocab % block))).reshape(rows, -1, block)
    sums = probs.sum(-1)
    cdf = jnp.cumsum(sums, axis=-1)
    target = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    b = jnp.minimum(jnp.sum(cdf < target[:, None], axis=-1), sums.shape[1] - 1)
    before = jnp.take_along_axis(cdf - sums, b[:, None], axis=-1)[:, 0]
    inner = jnp.cumsum(jnp.take_along_axis(probs, b[:, None, None], axis=1)[:, 0], axis=-1)
    j = jnp.minimum(jnp.sum(inner < (target - before)[:, None], axis=-1), block - 1)
    return jnp.minimum(b * block + j, vocab - 1)


class Choice(NamedTuple):
    """What a batch's rows need (static: a program leaves out what no row uses; an argmax
    over the vocabulary alone costs about 5% of a decode step on CPU)."""
    greedy: bool  # some row has temperature 0
    sample: bool  # some row samples
    filtering: bool  # some sampling row has top-k or top-p


def _choose(logits, keys, temperature, top_k, top_p, how: Choice):
    """Next token per row and its model log-probability."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    if how.sample:
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        if how.filtering:
            order = jnp.argsort(-scaled, axis=-1)
            ranked = jnp.take_along_axis(scaled, order, axis=-1)
            probs = jax.nn.softmax(ranked, axis=-1)
            rank = jnp.arange(logits.shape[-1])[None]
            keep = ((top_k[:, None] == 0) | (rank < top_k[:, None])) & \
                (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None])
            pick = _draw(keys, jnp.where(keep, ranked, -jnp.inf))
            sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]
        else:
            sampled = _draw(keys, scaled)
    if how.greedy:
        best = jnp.argmax(logits, axis=-1)
        token = jnp.where(temperature == 0, best, sampled) if how.sample else best
    else:
        token = sampled
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


SEGMENT = 32  # decode steps per compiled segment


def _prefill(cfg, how: Choice, vocab_limit: int, params, prompts, pad, source, seeds,
             draws, temperature, top_k, top_p, row_max_new, stop_ids):
    """prompts (B, P) left-padded by pad (B,) -> per sample row (R,): the caches of its prompt
    (`source`: fan-out, one prefill per prompt), its first token, that token's log-prob, done."""
    b, p = prompts.shape
    positions = jnp.maximum(jnp.arange(p)[None] - pad[:, None], 0)
    logits, caches = decoder_from_params(cfg, params).decode(
        prompts, positions, empty_caches(cfg, b, p), 0, pad)
    caches = [(jnp.take(ck, source, axis=0), jnp.take(cv, source, axis=0)) for ck, cv in caches]
    logits = _limit(logits[source], vocab_limit)
    keys = _step_keys(_row_keys(seeds, draws), 0)
    token, logprob = _choose(logits, keys, temperature, top_k, top_p, how)
    done = _stopped(token, stop_ids) | (row_max_new <= 1)
    return caches, token, logprob, done


def _regroup(slots: int, caches, index, token):
    """The rows `index` picks (finished rows dropped), their caches grown to `slots`."""
    grow = lambda a, axis: jnp.pad(jnp.take(a, index, axis=0),
                                   [(0, slots - a.shape[axis]) if i == axis else (0, 0)
                                    for i in range(a.ndim)])
    return [(grow(ck, 3), grow(cv, 2)) for ck, cv in caches], jnp.take(token, index)


def _decode(cfg, how: Choice, vocab_limit: int, params, caches, token, done, t0, p,
            seeds, draws, temperature, top_k, top_p, row_max_new, stop_ids, length, pad):
    """Up to SEGMENT decode steps t0, t0 + 1, ... (prompts of P = p slots, left-padded by pad):
    the caches, each row's new tokens and log-probs (SEGMENT,) and their count, done."""
    model = decoder_from_params(cfg, params)
    rows = token.shape[0]
    row_keys = _row_keys(seeds, draws)

    def cond(state):
        i, _, _, _, _, done, _ = state
        return (i < SEGMENT) & ~done.all()

    def body(state):
        i, caches, token, out, out_lp, done, count = state
        t = t0 + i
        logits, caches = model.decode(token[:, None], (length + t - 1)[:, None], caches,
                                      p + t - 1, pad)
        new, lp = _choose(_limit(logits, vocab_limit), _step_keys(row_keys, t), temperature,
                          top_k, top_p, how)
        out = out.at[:, i].set(jnp.where(done, 0, new))
        out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, lp))
        count = count + (~done).astype(jnp.int32)
        done = done | _stopped(new, stop_ids) | (t + 1 >= row_max_new)
        return i + 1, caches, new, out, out_lp, done, count

    state = (jnp.int32(0), caches, token, jnp.zeros((rows, SEGMENT), jnp.int32),
             jnp.zeros((rows, SEGMENT), jnp.float32), done, jnp.zeros(rows, jnp.int32))
    _, caches, token, out, out_lp, done, count = jax.lax.while_loop(cond, body, state)
    return caches, token, out, out_lp, count, done


def _stopped(token, stop_ids):
    """Per row: is `token` one of the row's stop ids (stop_ids (R, S), -1 padded)?"""
    return (token[:, None] == stop_ids).any(axis=-1)


def _row_keys(seeds, draws):
    """Row r's key; its key at step t is fold_in(row key, t)."""
    return jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(seeds, draws)


def _step_keys(row_keys, t):
    return jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)


def _limit(logits, vocab_limit: int):
    """Logits with ids from `vocab_limit` on never drawn."""
    if vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


@functools.lru_cache(maxsize=16)
def _programs(cfg_fields: tuple):
    """The compiled programs for a model shape: prefill, regroup (drop finished rows, grow the
    cache) and a decode segment; jax.jit keys them further by shape and Choice. Shared by every
    Sampler of that shape (evaluating several checkpoints compiles once)."""
    cfg = ModelConfig(*cfg_fields)
    prefill = jax.jit(functools.partial(_prefill, cfg), static_argnums=(0, 1))
    regroup = jax.jit(_regroup, static_argnums=0)
    decode = jax.jit(functools.partial(_decode, cfg), static_argnums=(0, 1), donate_argnums=(3,))
    return prefill, regroup, decode


ROW_KEYS = ("seeds", "draws", "temperature", "top_k", "top_p", "row_max_new", "stop_ids")


@dataclass
class _Layout:
    """One `generate` call laid out for the device: the prompts to prefill, and per sample row
    (padded to a bucket; padding rows stop at once) what the programs need."""
    rows: list[tuple[int, int]]  # (request, sample) of each real row
    prompts: np.ndarray  # (B, P) left-padded prompts
    pad: np.ndarray  # (B,) left padding of each prompt
    source: np.ndarray  # (R,) the prompt each sample row continues
    row: dict  # ROW_KEYS, "length" and "pad" per sample row (R, ...)
    how: Choice
    max_new: int


def _layout(requests: list[Request], share_prefix: bool) -> _Layout:
    rows = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]
    n_rows = _rows_bucket(len(rows))
    padded = rows + [(0, 0)] * (n_rows - len(rows))
    owners = list(range(len(requests))) if share_prefix else [i for i, _ in rows]
    p = _bucket(max(len(r.prompt) for r in requests), 32)
    prompts = np.zeros((_pow2(len(owners)), p), np.int32)
    pad = np.full(prompts.shape[0], p - 1, np.int32)  # unused prompt slots hold one token
    for k, i in enumerate(owners):
        prompts[k, p - len(requests[i].prompt):] = requests[i].prompt
        pad[k] = p - len(requests[i].prompt)
    source = np.array([i for i, _ in padded] if share_prefix else
                      list(range(len(rows))) + [0] * (n_rows - len(rows)), np.int32)
    per_row = lambda f, dtype: np.array([f(requests[i]) for i, _ in padded], dtype)
    stop_ids = np.full((n_rows, max(1, max(len(r.stop_ids) for r in requests))), -1, np.int32)
    for k, (i, _) in enumerate(padded):
        stop_ids[k, :len(requests[i].stop_ids)] = requests[i].stop_ids
    row_max_new = per_row(lambda r: r.max_new_tokens, np.int32)
    row_max_new[len(rows):] = 1  # padding rows stop at once
    row = {"seeds": per_row(lambda r: r.seed % 2**32, np.uint32),
           "draws": np.array([j for _, j in padded], np.uint32),
           "temperature": per_row(lambda r: r.temperature, np.float32),
           "top_k": per_row(lambda r: r.top_k, np.int32),
           "top_p": per_row(lambda r: r.top_p, np.float32),
           "row_max_new": row_max_new, "stop_ids": stop_ids,
           "length": (p - pad)[source], "pad": pad[source]}
    how = Choice(greedy=any(r.temperature == 0 for r in requests),
                 sample=any(r.temperature > 0 for r in requests),
                 filtering=any(r.top_k > 0 or r.top_p < 1
                               for r in requests if r.temperature > 0))
    return _Layout(rows, prompts, pad, source, row, how,
                   max(r.max_new_tokens for r in requests))


class _Outputs:
    """Host buffers of every row's new tokens and log-probs, filled segment by segment."""

    def __init__(self, n_rows: int, max_new: int, token, logprob):
        self.tokens = np.zeros((n_rows, max_new), np.int32)
        self.logprobs = np.zeros((n_rows, max_new), np.float32)
        self.tokens[:, 0], self.logprobs[:, 0] = jax.device_get((token, logprob))
        self.count = np.ones(n_rows, np.int32)

    def add(self, alive, real_rows: int, seg, seg_lp, seg_n) -> None:
        for k, o in enumerate(alive):
            n, c = int(seg_n[k]), self.count[o]
            if n and o < real_rows:
                self.tokens[o, c:c + n], self.logprobs[o, c:c + n] = seg[k, :n], seg_lp[k, :n]
                self.count[o] += n

    def samples(self, requests: list[Request], rows) -> list[list[Sample]]:
        results: list[list[Sample]] = [[] for _ in requests]
        for k, (i, _) in enumerate(rows):
            n = int(self.count[k])
            tokens = self.tokens[k, :n].tolist()
            results[i].append(Sample(tokens, self.logprobs[k, :n].tolist(),
                                     "stop" if tokens[-1] in requests[i].stop_ids else "length"))
        return results


class Sampler:
    """Batched sampling from `params` (a pure dict, as training and `weights.load_params` give)."""

    def __init__(self, cfg: ModelConfig, params, mesh: jax.sharding.Mesh | None = None,
                 vocab_limit: int | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.vocab_limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
        self.max_len = cfg.max_position_embeddings
        self.params = decoding_params(cfg, params)

    def _put(self, *arrays):
        """Row arrays split over the mesh's data axes (where the rows divide evenly)."""
        if self.mesh is None:
            return arrays
        rows_sh = NamedSharding(self.mesh, P(RULES["batch"]))
        dp = math.prod(self.mesh.shape[a] for a in RULES["batch"])
        return tuple(jax.device_put(a, rows_sh) if a.shape[0] % dp == 0 else a for a in arrays)

    def generate(self, requests: list[Request], share_prefix: bool = True) -> list[list[Sample]]:
        """Each request's `n` samples. `share_prefix=False` prefills every sample row on its
        own (the same tokens, for comparison and benchmarks)."""
        for i, r in enumerate(requests):
            error = check_request(r, self.max_len, self.cfg.vocab_size)
            if error:
                raise ConfigError(f"request {i}: {error}")
        lay = _layout(requests, share_prefix)
        prefill, _, _ = _programs(dataclasses.astuple(self.cfg))
        caches, token, logprob, done = prefill(
            lay.how, self.vocab_limit, self.params,
            *self._put(lay.prompts, lay.pad, lay.source, *(lay.row[k] for k in ROW_KEYS)))
        out = _Outputs(lay.source.size, lay.max_new, token, logprob)
        self._decode(lay, caches, token, np.asarray(done), out)
        return out.samples(requests, lay.rows)

    def _decode(self, lay: _Layout, caches, token, done, out: _Outputs) -> None:
        """Decode segments of SEGMENT steps until every row is done. Between segments the
        finished rows are dropped (the live ones gathered into the smallest bucket that holds
        them) and the cache grows by SEGMENT slots, so attention reads only the slots written
        so far and a row that stopped early costs nothing after its segment."""
        _, regroup, decode = _programs(dataclasses.astuple(self.cfg))
        p = lay.prompts.shape[1]
        alive = np.arange(lay.source.size)  # the original row of each current row
        t0 = 1
        while t0 < lay.max_new and not done.all():
            live = np.flatnonzero(~done)
            keep = _rows_bucket(len(live))
            if keep < len(alive):  # the live rows, padded with a finished one (dropped)
                index = np.concatenate([live, np.full(keep - len(live), np.flatnonzero(done)[0])])
                done = np.arange(keep) >= len(live)
            else:
                index = np.arange(len(alive))
            alive = alive[index]
            args = self._put(index.astype(np.int32), done, *(lay.row[k][alive] for k in ROW_KEYS),
                             lay.row["length"][alive], lay.row["pad"][alive])
            caches, token = regroup(p + t0 + SEGMENT - 1, caches, args[0], token)
            caches, token, seg, seg_lp, seg_n, done = decode(
                lay.how, self.vocab_limit, self.params, caches, token, args[1], np.int32(t0),
                np.int32(p), *args[2:])
            seg, seg_lp, seg_n, done = jax.device_get((seg, seg_lp, seg_n, done))
            out.add(alive, len(lay.rows), seg, seg_lp, seg_n)
            t0 += SEGMENT


def load_sampler(run_dir: str | Path, mesh: jax.sharding.Mesh | None = None):
    """(Sampler, Tokenizer) of a run directory's latest checkpoint (see
    `phijax.weights.load_checkpoint` for the mesh it lands on)."""
    from phijax.weights import load_checkpoint

    cfg, params, tokenizer, mesh = load_checkpoint(run_dir, mesh)
    return Sampler(cfg.model, params, mesh, vocab_limit=tokenizer.vocab_size), tokenizer
