"""The compiled pieces of batched decoding, and `Rows`: a running batch of sample rows that
requests join and leave between decode segments. `Sampler.generate` drives one for a fixed set
of requests; `phijax serve` keeps one running and admits requests as they arrive.

Rows decode in lockstep: every row writes its next token at the same cache slot `slot`. A new
prompt is left-padded so that it ends at that slot; a row's first real slot (`pad`, the
`key_start` of `Phi.decode`) masks what lies before it, and its position at slot s is s - pad.
Three compiled programs:

  prefill  the new prompts, left-padded to a common length P, fill a fresh cache; each sample
           row takes its prompt's cache rows (fan-out: the n samples of a prompt share one
           prefill) and draws its first token;
  merge    the rows still going, gathered into the smallest bucket that holds them (finished
           and cancelled rows dropped), their slots moved (forward, when every row's first
           slots are padding; back, when a new prompt is longer than the running slot), and the
           new rows' caches written in after them, ending at the common slot;
  decode   a segment of up to `segment` steps (a `while_loop`) that ends early once every row
           has hit a stop token or its max_new_tokens.

The cache grows (a merge) only when a segment would run past its end: attention reads only the
slots in use, and rows that stopped early (most PTS rollouts) cost nothing after their segment.

Row r's randomness is `fold_in(fold_in(key(seed), draw), step)`: a sample does not depend on
what else is in the batch or when it joined, so fan-out and independent prefills give the same
tokens, and a seeded request gives the same completion however the server batches it. Temperature
0 is greedy; top-k (0 = off) and top-p filter after temperature. Log-probabilities are the
model's (temperature 1, unfiltered), and so are the top log-probabilities a row may ask for
(computed only in programs where some row asks). Ids from `vocab_limit` on are never drawn.

Shapes are bucketed (prompt lengths and cache slots to multiples of 32, coarser past 256;
prompts and new rows to powers of two, batch rows from 8) so a server compiles a bounded set of
programs. On a mesh, rows are split over the data axes by the caller's `put`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phijax.config import ModelConfig
from phijax.model import decoder_from_params, empty_caches

SEGMENT = 32  # decode steps per segment in `Sampler.generate`
GROW = 32     # prompt lengths and cache slots are multiples of this
TOP_BUCKETS = (5, 20)  # top log-probs computed per token: the smallest of these that covers
MAX_TOP = TOP_BUCKETS[-1]


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def rows_bucket(n: int) -> int:
    """Sample rows are padded to a power of two from 8 on: a few compiled shapes."""
    return max(8, pow2(n))


def slots_bucket(n: int) -> int:
    """Cache slots (and prompt lengths): multiples of 32 up to 256, then of an eighth of the
    next power of two (at most 1/8 wasted), so long contexts compile a few shapes."""
    return _bucket(n, max(GROW, pow2(n) // 8))


def top_bucket(n: int) -> int:
    return 0 if n <= 0 else next(b for b in TOP_BUCKETS if b >= n)


# ---------------------------------------------------------------------------------------------
# Device functions


class Choice(NamedTuple):
    """What a batch's rows need (static: a program leaves out what no row uses; an argmax
    over the vocabulary alone costs about 5% of a decode step on CPU)."""
    greedy: bool  # some row has temperature 0
    sample: bool  # some row samples
    filtering: bool  # some sampling row has top-k or top-p
    top: int = 0  # top log-probs per token some row asks for (0: none computed)


class Picked(NamedTuple):
    """Per row: the token drawn, its model log-prob, and the `top` most likely ids and their
    log-probs (most likely first; width 0 when no row asks)."""
    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


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


def _blocks(logits, block: int = 128):
    """logits (rows, vocab) as (rows, vocab / block, block) blocks, the last padded with -inf,
    and each block's maximum."""
    rows, vocab = logits.shape
    blocks = jnp.pad(logits, ((0, 0), (0, -vocab % block)),
                     constant_values=-jnp.inf).reshape(rows, -1, block)
    return blocks, blocks.max(-1)


def _argmax(blocks, block_max):
    """jnp.argmax over the vocabulary (the first of equal maxima) of the logits `_blocks` cut,
    in two levels: the first block holding the maximum, then the first maximum in it. XLA:CPU
    runs argmax as a reduction over (value, index) pairs, about 2 ms for 32 rows of 32k ids, 9%
    of a decode step; two max-reductions and a small argmax take about 0.1 ms."""
    b = jnp.argmax(block_max, axis=-1)
    inner = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]
    return b * blocks.shape[-1] + jnp.argmax(inner, axis=-1)


def _log_normalizer(logits, row_max):
    """Per row, log(sum(exp(logits))) from the row's maximum: one fused pass over the logits
    (a log_softmax writes the whole (rows, vocab) array, then the caller reads one entry)."""
    return row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=-1))


def _sampled(logits, keys, row):
    """Tokens drawn at each row's temperature, after its top-k and top-p filters."""
    scaled = logits / jnp.maximum(row["temperature"], 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None]
    top_k, top_p = row["top_k"][:, None], row["top_p"][:, None]
    keep = ((top_k == 0) | (rank < top_k)) & (jnp.cumsum(probs, axis=-1) - probs < top_p)
    pick = _draw(keys, jnp.where(keep, ranked, -jnp.inf))
    return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]


def _choose(logits, keys, row, how: Choice) -> Picked:
    """Next token per row, its model log-probability and (how.top) the most likely ids."""
    blocks = _blocks(logits)  # the greedy argmax's first level, and each row's maximum
    normalizer = _log_normalizer(logits, blocks[1].max(-1))
    temperature = row["temperature"]
    if how.sample:  # a row without filters draws the same whether or not others have them
        sampled = _draw(keys, logits / jnp.maximum(temperature, 1e-6)[:, None])
        if how.filtering:
            filters = (row["top_k"] > 0) | (row["top_p"] < 1)
            sampled = jnp.where(filters, _sampled(logits, keys, row), sampled)
    if how.greedy:
        best = _argmax(*blocks)
        token = jnp.where(temperature == 0, best, sampled) if how.sample else best
    else:
        token = sampled
    token = token.astype(jnp.int32)
    logprob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - normalizer
    if how.top:
        top_logits, top_ids = jax.lax.top_k(logits, how.top)
        top_lp = top_logits - normalizer[:, None]
    else:
        top_lp, top_ids = jnp.zeros((token.shape[0], 0)), jnp.zeros((token.shape[0], 0))
    return Picked(token, logprob, top_ids.astype(jnp.int32), top_lp.astype(jnp.float32))


def _stopped(token, stop_ids):
    """Per row: is `token` one of the row's stop ids (stop_ids (R, S), -1 padded)?"""
    return (token[:, None] == stop_ids).any(axis=-1)


def _row_keys(row):
    """Row r's key; its key at step t is fold_in(row key, t)."""
    return jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(row["seeds"],
                                                                           row["draws"])


def _step_keys(row_keys, steps):
    return jax.vmap(jax.random.fold_in)(row_keys, steps)


def limit_vocab(logits, vocab_limit: int):
    """Logits with ids from `vocab_limit` on never drawn."""
    if vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def _finished(pick: Picked, row, steps):
    return _stopped(pick.token, row["stop_ids"]) | (steps + 1 >= row["max_new"])


def _prefill(cfg, how: Choice, vocab_limit: int, params, prompts, pad, source, row):
    """prompts (B, P) left-padded by pad (B,) -> per new row (R,): the caches of its prompt
    (`source`: fan-out), its first token (drawn at row["step"]) and whether it is done."""
    b, p = prompts.shape
    positions = jnp.maximum(jnp.arange(p)[None] - pad[:, None], 0)
    logits, caches = decoder_from_params(cfg, params).decode(
        prompts, positions, empty_caches(cfg, b, p), 0, pad)
    caches = [(jnp.take(ck, source, axis=0), jnp.take(cv, source, axis=0)) for ck, cv in caches]
    logits = limit_vocab(logits[source], vocab_limit)
    pick = _choose(logits, _step_keys(_row_keys(row), row["step"]), row, how)
    return caches, pick, _finished(pick, row, row["step"])


def _moved(a, axis: int, slots: int, shift):
    """`a` with `slots` slots on `axis`, slot j holding a's slot j - shift (zeros past a)."""
    n = a.shape[axis]
    index = jnp.arange(slots) - shift
    out = jnp.take(a, jnp.clip(index, 0, n - 1), axis=axis)
    inside = ((index >= 0) & (index < n)).reshape([-1 if i == axis else 1 for i in range(a.ndim)])
    return jnp.where(inside, out, jnp.zeros((), a.dtype))


def _merge(cfg, slots: int, caches, token, index, shift, new):
    """The running rows `index` picks (caches None: an empty batch), slots moved by `shift`,
    then (new: (caches, token, rows, shift)) the new rows written at `rows` (past the end:
    dropped), their slots moved by their shift; caches of `slots` slots."""
    rows = index.shape[0]
    if caches is None:
        caches, token = empty_caches(cfg, rows, slots), jnp.zeros(rows, jnp.int32)
    else:
        caches = [(_moved(jnp.take(ck, index, axis=0), 3, slots, shift),
                   _moved(jnp.take(cv, index, axis=0), 2, slots, shift)) for ck, cv in caches]
        token = jnp.take(token, index)
    if new is not None:
        new_caches, new_token, at, new_shift = new
        caches = [(ck.at[at].set(_moved(nk, 3, slots, new_shift), mode="drop"),
                   cv.at[at].set(_moved(nv, 2, slots, new_shift), mode="drop"))
                  for (ck, cv), (nk, nv) in zip(caches, new_caches)]
        token = token.at[at].set(new_token, mode="drop")
    return caches, token


def _decode(cfg, how: Choice, vocab_limit: int, segment: int, params, caches, token, done,
            slot, row):
    """Up to `segment` decode steps from cache slot `slot`: the caches, last tokens, done, each
    row's count of new tokens and its tokens (a Picked of (R, segment) arrays), steps run."""
    model = decoder_from_params(cfg, params)
    rows, pad = token.shape[0], row["pad"]
    row_keys = _row_keys(row)

    def cond(state):
        return (state[0] < segment) & ~state[3].all()

    def body(state):
        i, caches, token, done, count, out = state
        s = slot + i
        logits, caches = model.decode(token[:, None], (s - pad)[:, None], caches, s, pad)
        steps = row["step"] + i
        pick = _choose(limit_vocab(logits, vocab_limit), _step_keys(row_keys, steps), row, how)
        out = Picked(*(buf.at[:, i].set(jnp.where(
            done.reshape(-1, *[1] * (x.ndim - 1)), jnp.zeros((), x.dtype), x))
            for buf, x in zip(out, pick)))
        count = count + (~done).astype(jnp.int32)
        return i + 1, caches, pick.token, done | _finished(pick, row, steps), count, out

    out = Picked(jnp.zeros((rows, segment), jnp.int32), jnp.zeros((rows, segment), jnp.float32),
                 jnp.zeros((rows, segment, how.top), jnp.int32),
                 jnp.zeros((rows, segment, how.top), jnp.float32))
    state = (jnp.int32(0), caches, token, done, jnp.zeros(rows, jnp.int32), out)
    steps, caches, token, done, count, out = jax.lax.while_loop(cond, body, state)
    return caches, token, done, count, out, steps


@functools.lru_cache(maxsize=16)
def programs(cfg_fields: tuple):
    """The compiled programs for a model shape: prefill, merge and a decode segment; jax.jit
    keys them further by shape and Choice. Shared by every Sampler of that shape."""
    cfg = ModelConfig(*cfg_fields)
    prefill = jax.jit(functools.partial(_prefill, cfg), static_argnums=(0, 1))
    merge = jax.jit(functools.partial(_merge, cfg), static_argnums=0)
    decode = jax.jit(functools.partial(_decode, cfg), static_argnums=(0, 1, 2),
                     donate_argnums=(4,))
    return prefill, merge, decode
