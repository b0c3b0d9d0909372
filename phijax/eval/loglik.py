"""Log-likelihood of continuations: log p(continuation | context), summed over its tokens.

A row holds a context once and every continuation of it: each continuation's tokens follow the
context in a segment of their own that attends to the context and to itself (the shared-prefix
mask of `phijax.model.attention_mask`), at positions counting on from the context's end. The
choices of a multiple-choice question so run their context through the layers once, not once
per choice; choices that differ only in their last token (" A" ... " D") also share their
tokens, their last tokens read off the same log-softmax. The LM head (`Phi.logits`) runs only
at the positions that predict a continuation token: over a 32k vocabulary the head is a large
share of a token's work. Rows go through the training forward pass (`Phi.hidden_states`) in
batches of `batch` rows, sorted by length and padded to a multiple of 32 tokens (scored
positions to a multiple of 8), so few shapes compile. Ids from `vocab_limit` on (a model
vocabulary padded past its tokenizer's) get no probability, as in sampling and serving.
A context whose continuations do not fit the model's context length together is scored one
continuation at a time, and a context too long for one loses tokens from its start, as lm-eval
truncates; so is every continuation under the splash kernel, whose mask comes from segment ids
alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phijax.config import ModelConfig
from phijax.decoding import limit_vocab, pow2
from phijax.model import abstract_model
from phijax.splash import uses_splash

PAD_TO = 32      # row lengths
CONT_PAD_TO = 8  # scored positions per row

ROW_KEYS = ("tokens", "positions", "segment_ids", "scored", "targets", "weights")


@dataclass
class Row:
    """A context and its branches: per branch, the tokens it adds after the context (its
    continuations less their last token) and the (pair index, continuation) scored on it."""
    context: list[int]
    branches: list[tuple[list[int], list[tuple[int, list[int]]]]]

    @property
    def length(self) -> int:
        """Tokens through the layers."""
        return len(self.context) + sum(len(tokens) for tokens, _ in self.branches)

    @property
    def scored(self) -> int:
        """Positions through the LM head: the context's last, and every branch token."""
        return 1 + sum(len(tokens) for tokens, _ in self.branches)

    @property
    def pair_indices(self) -> list[int]:
        """The row's pairs (its members), in the order of its member slots."""
        return [i for _, pairs in self.branches for i, _ in pairs]


def plan_rows(pairs: list[tuple[list[int], list[int]]], limit: int,
              share: bool = True) -> list[Row]:
    """The rows that score `pairs`, in order of first appearance: one per context (with
    `share`, where the context and all its branches fit in `limit` tokens), else one per
    branch, its context cut from the start to fit."""
    contexts: dict[tuple, dict[tuple, list]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: an empty {'context' if not context else 'continuation'}"
                             f" has no likelihood")
        if len(continuation) > limit:
            raise ValueError(f"pair {i}: a continuation of {len(continuation)} tokens does not "
                             f"fit the model's context length {limit}")
        branches = contexts.setdefault(tuple(context), {})
        branches.setdefault(tuple(continuation[:-1]), []).append((i, continuation))
    rows = []
    for context, branches in contexts.items():
        row = Row(list(context), [(list(tokens), members) for tokens, members in branches.items()])
        if share and row.length <= limit:
            rows.append(row)
        else:
            rows += [Row(row.context[-(limit - len(tokens)):], [(tokens, members)])
                     for tokens, members in row.branches]
    return rows


def _arrays(row: Row, length: int, width: int, members: int) -> dict:
    """A row's model inputs (padding a segment of its own), its `width` scored positions, and
    per member (pair) the tokens predicted there and 0/1 weights."""
    n, alone = len(row.context), len(row.branches) == 1
    a = {"tokens": np.zeros(length, np.int32), "positions": np.zeros(length, np.int32),
         "segment_ids": np.full(length, len(row.branches) + 1, np.int32),
         "scored": np.zeros(width, np.int32), "targets": np.zeros((members, width), np.int32),
         "weights": np.zeros((members, width), np.float32)}
    a["tokens"][:n], a["positions"][:n], a["segment_ids"][:n] = row.context, np.arange(n), 0
    a["scored"][0] = n - 1  # predicts every continuation's first token
    at, slot, m = n, 1, 0
    for b, (tokens, pairs) in enumerate(row.branches):
        k = len(tokens)
        a["tokens"][at:at + k], a["positions"][at:at + k] = tokens, np.arange(n, n + k)
        a["segment_ids"][at:at + k] = 0 if alone else b + 1
        a["scored"][slot:slot + k] = np.arange(at, at + k)
        for _, continuation in pairs:
            a["targets"][m, 0], a["targets"][m, slot:slot + k] = continuation[0], continuation[1:]
            a["weights"][m, [0, *range(slot, slot + k)]] = 1.0
            m += 1
        at, slot = at + k, slot + k
    return a


def _continuation_logprobs(graphdef, vocab_limit, shared, params, rows):
    """(rows, members): per member the sum over its scored positions of log p(target), the LM
    head run only at the row's scored positions."""
    model = nnx.merge(graphdef, params)
    h = model.hidden_states(rows["tokens"], rows["positions"], rows["segment_ids"], shared)
    h = jnp.take_along_axis(h, rows["scored"][..., None], axis=1)  # (b, width, hidden)
    logp = jax.nn.log_softmax(limit_vocab(model.logits(h), vocab_limit), axis=-1)
    target = jnp.take_along_axis(logp[:, None], rows["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(target * rows["weights"], axis=-1)


class LikelihoodScorer:
    """`score(pairs)` for (context ids, continuation ids) pairs, with the model's params (a
    pure dict, stacked layers, as checkpoints hold them); ids from `vocab_limit` on (default:
    none) are outside the tokenizer's vocabulary and get no probability."""

    def __init__(self, cfg: ModelConfig, params, batch: int = 32, vocab_limit: int | None = None):
        graphdef = nnx.graphdef(abstract_model(cfg))
        limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
        self.cfg, self.params, self.batch = cfg, params, batch
        self.share = not uses_splash(cfg)
        self._fn = jax.jit(lambda p, rows: _continuation_logprobs(graphdef, limit, self.share,
                                                                  p, rows))

    def rows(self, pairs: list[tuple[list[int], list[int]]]) -> list[Row]:
        """The rows `score` runs, in the order it runs them."""
        rows = plan_rows(pairs, self.cfg.max_position_embeddings, self.share)
        return sorted(rows, key=lambda r: r.length)

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log p(continuation | context) per pair, in the order given."""
        rows, limit = self.rows(pairs), self.cfg.max_position_embeddings
        out = np.zeros(len(pairs), np.float64)
        for start in range(0, len(rows), self.batch):
            chunk = rows[start:start + self.batch]
            length = min(limit, -(-max(r.length for r in chunk) // PAD_TO) * PAD_TO)
            width = min(length, -(-max(r.scored for r in chunk) // CONT_PAD_TO) * CONT_PAD_TO)
            members = pow2(max(len(r.pair_indices) for r in chunk))
            arrays = [_arrays(r, length, width, members) for r in chunk]
            arrays += [arrays[-1]] * (self.batch - len(arrays))  # one compiled batch size
            batch = {k: np.stack([a[k] for a in arrays]) for k in ROW_KEYS}
            logp = np.asarray(jax.device_get(self._fn(self.params, batch)))
            for r, row in enumerate(chunk):
                index = row.pair_indices
                out[index] = logp[r, :len(index)]
        return out.tolist()
