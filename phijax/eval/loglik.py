"""Log-likelihood of continuations: log p(continuation | context), summed over its tokens.

Rows of context + continuation run through the training forward pass (`sequence_logprobs`,
the same function DPO's reference log-probs use) in batches of `batch` rows; the loss weights
select the continuation's targets. Rows are sorted by length and padded to a multiple of 32
tokens, so the choices of one question usually share a forward pass and few shapes compile.
A context too long for the model loses tokens from its start, as lm-eval truncates.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from phijax.config import ModelConfig
from phijax.model import abstract_model
from phijax.train.step import BATCH_KEYS, sequence_logprobs

PAD_TO = 32


def _row(context: list[int], continuation: list[int], length: int) -> dict:
    ids = (context + continuation)[-(length + 1):]
    n = len(ids) - 1
    row = {k: np.zeros(length, np.int32) for k in BATCH_KEYS}
    row["loss_weights"] = np.zeros(length, np.float32)
    row["tokens"][:n], row["targets"][:n] = ids[:-1], ids[1:]
    row["positions"][:] = np.arange(length)
    row["segment_ids"][n:] = 1  # padding: a segment of its own
    row["loss_weights"][n - len(continuation):n] = 1.0
    return row


class LikelihoodScorer:
    """`score(pairs)` for (context ids, continuation ids) pairs, with the model's params (a
    pure dict, stacked layers, as checkpoints hold them)."""

    def __init__(self, cfg: ModelConfig, params, batch: int = 32):
        graphdef = nnx.graphdef(abstract_model(cfg))
        self.cfg, self.params, self.batch = cfg, params, batch
        self._fn = jax.jit(lambda p, b: sequence_logprobs(graphdef, p, b))

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log p(continuation | context) per pair, in the order given."""
        for i, (_, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError(f"pair {i}: an empty continuation has no likelihood")
        limit = self.cfg.max_position_embeddings
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        out = np.zeros(len(pairs), np.float64)
        for start in range(0, len(order), self.batch):
            chunk = order[start:start + self.batch]
            longest = max(len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in chunk)
            length = min(limit, -(-longest // PAD_TO) * PAD_TO)
            rows = [_row(*pairs[i], length) for i in chunk]
            rows += [rows[-1]] * (self.batch - len(rows))  # one compiled batch size
            batch = {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}
            logp = np.asarray(jax.device_get(self._fn(self.params, batch)))
            out[chunk] = logp[:len(chunk)]
        return out.tolist()
