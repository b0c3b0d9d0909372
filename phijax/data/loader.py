"""Grain pipeline: fixed-length windows of a token store, shuffled per epoch, batched by step.

Window i covers tokens [i*S, i*S + S + 1): inputs are its first S tokens, targets the last S.
Segment ids and positions come from the store's document offsets, so attention can stop at
document boundaries. Sources are mixed by `BlockMixer`. The batch for a step is a pure function
of (seed, step), so the data state to checkpoint is just the step.
"""
from __future__ import annotations

import grain
import numpy as np

from phijax.data.mixture import BlockMixer
from phijax.data.store import TokenStore


class Windows:
    """Random-access source of windows over the token range [start, stop) of a store."""

    def __init__(self, store: TokenStore, seq_len: int, start_window: int, stop_window: int,
                 document_mask: bool = True):
        self.store, self.seq_len = store, seq_len
        self.start, self.stop = start_window, stop_window
        self.document_mask = document_mask

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        s = self.seq_len
        begin = (self.start + int(i)) * s
        window = np.asarray(self.store.tokens[begin: begin + s + 1], np.int32)
        index = np.arange(begin, begin + s + 1)
        doc = np.searchsorted(self.store.offsets, index, side="right") - 1
        if not self.document_mask:
            doc = np.zeros_like(doc)
        doc_start = np.maximum(self.store.offsets[doc], begin)
        return {
            "tokens": window[:-1], "targets": window[1:],
            "positions": (index - doc_start)[:-1].astype(np.int32),
            "segment_ids": (doc - doc[0])[:-1].astype(np.int32),
            # The last token of a document does not predict the first of the next one.
            "loss_weights": (doc[1:] == doc[:-1]).astype(np.float32) if self.document_mask
            else np.ones(s, np.float32),
        }


def split_windows(store: TokenStore, seq_len: int, eval_fraction: float) -> dict[str, tuple]:
    n = (len(store) - 1) // seq_len
    n_eval = int(n * eval_fraction)
    if n - n_eval < 1:
        raise ValueError(f"token store {store.path}: {len(store)} tokens make no training window "
                         f"of data.seq_len {seq_len}")
    return {"train": (0, n - n_eval), "eval": (n - n_eval, n)}


def batches(sources: list[Windows], mixer: BlockMixer, batch_size: int, seed: int,
            start_step: int, stop_step: int, process_index: int = 0, process_count: int = 1,
            threads: int = 2, prefetch: int = 2):
    """Iterator over this process's rows of the global batches for steps [start, stop).

    Each source is reshuffled every epoch (from `seed`); `mixer` interleaves them in exactly the
    configured shares of windows, hence of tokens.
    """
    streams = [grain.MapDataset.source(s).shuffle(seed=seed + i).repeat(None)
               for i, s in enumerate(sources)]
    local = batch_size // process_count
    first_row = process_index * local

    def batch_at(step: int) -> dict:
        rows = []
        for j in range(local):
            source, index = mixer(step * batch_size + first_row + j)
            rows.append(streams[source][index])
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    steps = grain.MapDataset.range(start_step, stop_step).map(batch_at)
    if prefetch <= 0:
        return iter(steps)
    return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                        prefetch_buffer_size=prefetch)))


def synthetic_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int,
                      start_step: int, stop_step: int):
    """Random tokens (for benchmarks): same contract as `batches`."""
    for step in range(start_step, stop_step):
        rng = np.random.default_rng([seed, step])
        window = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        yield {"tokens": window[:, :-1], "targets": window[:, 1:],
               "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                            (batch_size, seq_len)).copy(),
               "segment_ids": np.zeros((batch_size, seq_len), np.int32),
               "loss_weights": np.ones((batch_size, seq_len), np.float32)}
