"""Log-likelihood of continuations: log p(continuation | context), summed over its tokens.

Rows of context + continuation run through the training forward pass (`Phi.hidden_states`)
in batches of `batch` rows; the LM head (`Phi.logits`) runs only at the positions that predict
a continuation token: a multiple-choice row is mostly context, and over a 32k vocabulary the
head is a large share of a token's work. Rows are sorted by length and padded to a multiple of
32 tokens (continuations to a multiple of 8), so the choices of one question usually share a
batch and few shapes compile; choices that differ only in their last token (" A" ... " D") share
one row, their last tokens read off the same log-softmax. Ids from `vocab_limit` on (a model
vocabulary padded past its tokenizer's) get no probability, as in sampling and serving. A
context too long for the model loses tokens from its start, as lm-eval truncates.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phijax.config import ModelConfig
from phijax.decoding import limit_vocab, pow2
from phijax.model import abstract_model

PAD_TO = 32      # row lengths
CONT_PAD_TO = 8  # scored positions per row

ROW_KEYS = ("tokens", "segment_ids", "scored", "targets", "weights")


def _row(context: list[int], continuations: list[list[int]], length: int, width: int,
         members: int) -> dict:
    """One row: its input tokens (padding a segment of its own), the `width` positions whose
    next token is scored, and per member (continuations that differ only in their last token
    share the row) the tokens there and 0/1 weights."""
    first = continuations[0]
    ids = (context + first)[-(length + 1):]
    n, k = len(ids) - 1, len(first)
    row = {"tokens": np.zeros(length, np.int32), "segment_ids": np.zeros(length, np.int32),
           "scored": np.zeros(width, np.int32),
           "targets": np.zeros((members, width), np.int32),
           "weights": np.zeros((members, width), np.float32)}
    row["tokens"][:n] = ids[:-1]
    row["segment_ids"][n:] = 1
    row["scored"][:k] = np.arange(n - k, n)
    for m, continuation in enumerate(continuations):
        row["targets"][m, :k] = ids[n - k + 1:-1] + continuation[-1:]
        row["weights"][m, :k] = 1.0
    return row


def _continuation_logprobs(graphdef, vocab_limit, params, rows):
    """(rows, members): per member the sum over its scored positions of log p(target), the LM
    head run only at the row's scored positions."""
    model = nnx.merge(graphdef, params)
    b, s = rows["tokens"].shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    h = model.hidden_states(rows["tokens"], positions, rows["segment_ids"])
    h = jnp.take_along_axis(h, rows["scored"][..., None], axis=1)  # (b, width, hidden)
    logp = jax.nn.log_softmax(limit_vocab(model.logits(h), vocab_limit), axis=-1)
    target = jnp.take_along_axis(logp[:, None], rows["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(target * rows["weights"], axis=-1)


def _groups(pairs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Pair indices grouped by context + continuation[:-1] (one forward serves them all: the
    choices " A" ... " D" of a question), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        groups.setdefault(tuple(context + continuation[:-1]), []).append(i)
    return list(groups.values())


class LikelihoodScorer:
    """`score(pairs)` for (context ids, continuation ids) pairs, with the model's params (a
    pure dict, stacked layers, as checkpoints hold them); ids from `vocab_limit` on (default:
    none) are outside the tokenizer's vocabulary and get no probability."""

    def __init__(self, cfg: ModelConfig, params, batch: int = 32, vocab_limit: int | None = None):
        graphdef = nnx.graphdef(abstract_model(cfg))
        limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
        self.cfg, self.params, self.batch = cfg, params, batch
        self._fn = jax.jit(lambda p, rows: _continuation_logprobs(graphdef, limit, p, rows))

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log p(continuation | context) per pair, in the order given."""
        for i, (_, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError(f"pair {i}: an empty continuation has no likelihood")
        limit = self.cfg.max_position_embeddings
        groups = sorted(_groups(pairs), key=lambda g: len(pairs[g[0]][0]) + len(pairs[g[0]][1]))
        out = np.zeros(len(pairs), np.float64)
        for start in range(0, len(groups), self.batch):
            chunk = groups[start:start + self.batch]
            longest = max(len(pairs[g[0]][0]) + len(pairs[g[0]][1]) - 1 for g in chunk)
            length = min(limit, -(-longest // PAD_TO) * PAD_TO)
            width = min(length, -(-max(len(pairs[g[0]][1]) for g in chunk) // CONT_PAD_TO)
                        * CONT_PAD_TO)
            members = pow2(max(len(g) for g in chunk))
            rows = [_row(pairs[g[0]][0], [pairs[i][1] for i in g], length, width, members)
                    for g in chunk]
            rows += [rows[-1]] * (self.batch - len(rows))  # one compiled batch size
            batch = {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
            logp = np.asarray(jax.device_get(self._fn(self.params, batch)))
            for r, g in enumerate(chunk):
                out[g] = logp[r, :len(g)]
        return out.tolist()
