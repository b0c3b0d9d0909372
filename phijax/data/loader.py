"""Grain pipeline: fixed-length windows of a token store, shuffled per epoch, batched by step.

Window i covers tokens [i*S, i*S + S + 1) of a store (or of a `DocumentSubset`: the store's
long documents back to back): inputs are its first S tokens, targets the last S.
Segment ids and positions come from the store's document offsets, so attention can stop at
document boundaries. Sources are mixed by `BlockMixer`. The batch for a step is a pure function
of (seed, step), so the data state to checkpoint is just the step.
"""
from __future__ import annotations

import functools
import threading

import grain
import numpy as np

from phijax.data.mixture import BlockMixer
from phijax.data.store import TokenStore
from phijax.errors import DataError


class Windows:
    """Random-access source of windows over the token range [start, stop) of a store."""

    def __init__(self, store: TokenStore, seq_len: int, start_window: int, stop_window: int,
                 document_mask: bool = True):
        self.store, self.seq_len = store, seq_len
        self.start, self.stop = start_window, stop_window
        self.document_mask = document_mask

    def __len__(self) -> int:
        return self.stop - self.start

    def stream(self, seed: int) -> grain.MapDataset:
        """Every window once per epoch, in a fresh order each epoch, repeated without end."""
        return grain.MapDataset.source(self).shuffle(seed=seed).repeat(None)

    def __getitem__(self, i: int) -> dict:
        s = self.seq_len
        begin = (self.start + int(i)) * s
        window = self.store.read(begin, begin + s + 1)
        index = np.arange(begin, begin + s + 1)
        doc = np.searchsorted(self.store.offsets, index, side="right") - 1
        if not self.document_mask:
            doc = np.zeros_like(doc)
        doc_start = np.maximum(self.store.offsets[doc], begin)
        # The last token of a document does not predict the first of the next one.
        weights = (doc[1:] == doc[:-1]).astype(np.float32) if self.document_mask \
            else np.ones(s, np.float32)
        mask = self.store.read_mask(begin + 1, begin + s + 1)
        if mask is not None:  # chats: loss on assistant tokens only
            weights *= mask
        return {
            "tokens": window[:-1], "targets": window[1:],
            "positions": (index - doc_start)[:-1].astype(np.int32),
            "segment_ids": (doc - doc[0])[:-1].astype(np.int32),
            "loss_weights": weights,
        }


def split_windows(store: TokenStore, seq_len: int, eval_fraction: float) -> dict[str, tuple]:
    n = (len(store) - 1) // seq_len
    n_eval = int(n * eval_fraction)
    if n - n_eval < 1:
        raise DataError(f"token store {store.path}: {len(store)} tokens make no training window "
                         f"of data.seq_len {seq_len}")
    return {"train": (0, n - n_eval), "eval": (n - n_eval, n)}


class PackedDocuments:
    """Whole documents packed into rows of seq_len + 1 tokens, never split (SFT).

    Each epoch shuffles the documents [first, stop) with its own permutation and packs them in
    that order, next-fit, into rows; the rest of a row is <|pad|> with no loss. A document longer
    than a row is cut to the row (counted in `truncated`). Row i of the endless stream is a pure
    function of (seed, i), like a window.
    """

    def __init__(self, store: TokenStore, seq_len: int, first: int, stop: int, pad_id: int):
        self.store, self.seq_len, self.pad_id = store, seq_len, pad_id
        self.docs = np.arange(first, stop)
        lengths = np.diff(store.offsets)[first:stop]
        self.truncated = int((lengths > seq_len + 1).sum())
        self.lengths = np.minimum(lengths, seq_len + 1)
        self._ends: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def stream(self, seed: int):
        """Rows of epoch after epoch, as an indexable endless stream."""
        return _Rows(functools.partial(self.row, seed))

    @functools.lru_cache(maxsize=8)
    def _epoch(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, index in it where each row starts, plus the end)."""
        order = np.random.default_rng([seed, epoch]).permutation(self.docs.size)
        starts, fill, cap = [0], 0, self.seq_len + 1
        for j, n in enumerate(self.lengths[order].tolist()):
            if fill + n > cap:
                starts.append(j)
                fill = 0
            fill += n
        return order, np.array(starts + [order.size])

    def __len__(self) -> int:
        """Rows in the first epoch (later epochs differ by a few)."""
        return self._epoch(0, 0)[1].size - 1

    def row(self, seed: int, i: int) -> dict:
        with self._lock:
            ends = self._ends.setdefault(seed, [])  # rows up to the end of each epoch
            while not ends or ends[-1] <= i:
                ends.append((ends[-1] if ends else 0) + self._epoch(seed, len(ends))[1].size - 1)
        epoch = int(np.searchsorted(ends, i, side="right"))
        i -= ends[epoch - 1] if epoch else 0
        order, starts = self._epoch(seed, epoch)
        cap = self.seq_len + 1
        tokens = np.full(cap, self.pad_id, np.int32)
        segments = np.full(cap, -1, np.int32)
        positions = np.zeros(cap, np.int32)
        mask = np.zeros(cap, np.float32)
        pos = 0
        for k, j in enumerate(order[starts[i]:starts[i + 1]]):
            doc, n = self.docs[j], int(self.lengths[j])
            begin = int(self.store.offsets[doc])
            tokens[pos:pos + n] = self.store.read(begin, begin + n)
            m = self.store.read_mask(begin, begin + n)
            mask[pos:pos + n] = 1.0 if m is None else m
            segments[pos:pos + n] = k
            positions[pos:pos + n] = np.arange(n)
            pos += n
        segments[pos:] = segments[pos - 1] + 1  # padding: a segment of its own
        return {"tokens": tokens[:-1], "targets": tokens[1:], "positions": positions[:-1],
                "segment_ids": segments[:-1],
                "loss_weights": mask[1:] * (segments[1:] == segments[:-1])}


class _Rows:
    def __init__(self, row):
        self.row = row

    def __getitem__(self, i: int) -> dict:
        return self.row(i)


def split_documents(store: TokenStore, eval_fraction: float) -> dict[str, tuple]:
    n = store.documents
    n_eval = int(n * eval_fraction)
    if n - n_eval < 1:
        raise DataError(f"token store {store.path}: no training document left")
    return {"train": (0, n - n_eval), "eval": (n - n_eval, n)}


def batches(sources: list, mixer: BlockMixer, batch_size: int, seed: int,
            start_step: int, stop_step: int, process_index: int = 0, process_count: int = 1,
            threads: int = 2, prefetch: int = 2):
    """Iterator over this process's rows of the global batches for steps [start, stop).

    `sources` are `Windows` or `PackedDocuments`; each is reshuffled every epoch (from `seed`)
    and `mixer` interleaves them in exactly the configured shares of rows.
    """
    streams = [s.stream(seed + i) for i, s in enumerate(sources)]
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
