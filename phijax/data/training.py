"""What a run reads from its prepared data, checked before anything compiles.

`TrainingData` takes the run's tokenizer, mixture and stores (see prepare.py) and checks every
source: its store was made with the run's tokenizer and holds no id at or above the model's
`vocab_size`, it holds at least one window (in its documents of at least `min_doc_tokens`
tokens, when the source sets it: windows are drawn from those alone), and its share gets it at
least one window in the run. Each error is one line naming the source and its store or corpus.
It then splits every source into training and eval windows (or packed documents), mixes the
training ones by share with a `BlockMixer`, and evaluates on the sources that have eval windows;
a warning names each source without any, or says that eval is off and why.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from phijax.config import Config
from phijax.data.loader import PackedDocuments, Windows, batches, split_documents, split_windows
from phijax.data.mixture import BlockMixer, MixtureConfig, SourceConfig
from phijax.data.store import TokenStore
from phijax.data.tokenizer import Tokenizer
from phijax.errors import ConfigError, DataError

log = logging.getLogger("phijax")


def describe(source: SourceConfig, in_mixture: bool = True) -> str:
    """How errors name a source's data: `source NAME: store PATH`, `source NAME: corpus
    SPEC...` (its store is in the cache), or `data.corpus SPEC...` outside a mixture."""
    if not in_mixture:
        return f"data.corpus {' '.join(source.corpus)}"
    if source.store:
        return f"source {source.name}: store {source.store}"
    return f"source {source.name}: corpus {' '.join(source.corpus)}"


def check_store(what: str, store: TokenStore, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Every id of the store is below the model's `vocab_size`, and the store was made with the
    run's tokenizer (the hash of its model file); errors begin with `what` (`describe`)."""
    made, made_hash = store.manifest.get("tokenizer"), store.manifest.get("tokenizer_hash")
    other = made_hash != tokenizer.hash
    if store.max_id >= vocab_size:
        because = f" (it was made with tokenizer {made}, not the run's {tokenizer.path})" \
            if other else ""
        raise DataError(f"{what} holds token ids up to {store.max_id}, not all below "
                        f"model.vocab_size {vocab_size}{because}")
    if other:
        raise DataError(f"{what} was made with tokenizer {made} (hash {made_hash}), "
                        f"not the run's {tokenizer.path} (hash {tokenizer.hash}); tokenize its "
                        f"corpus again with `phijax data tokenize ... --tokenizer "
                        f"{tokenizer.path}`")


def _fewest_for_one(fraction: float) -> int:
    """The fewest windows (or documents) of which `fraction` rounds down to at least one."""
    n = math.ceil(1 / fraction)
    return n if int(n * fraction) >= 1 else n + 1


class TrainingData:
    """A run's checked sources: `data(start, ...)` gives (train batches from step `start`, fixed
    eval batches, step -> realized epochs per source); `sources_at(step)` the windows each source
    gives that step's batch."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, mixture: MixtureConfig,
                 stores: list[TokenStore]):
        self.cfg, self.sources = cfg, mixture.sources
        self.names = [s.name for s in self.sources]
        d = cfg.data
        self.what = {s.name: describe(s, bool(d.mixture)) for s in self.sources}
        for source, store in zip(self.sources, stores):
            check_store(self.what[source.name], store, tokenizer, cfg.model.vocab_size)
        stores = [store.select(s.min_doc_tokens) for s, store in zip(self.sources, stores)]
        if d.packing == "documents":
            make = lambda st, r: PackedDocuments(st, d.seq_len, *r, pad_id=tokenizer.pad_id)
        else:
            make = lambda st, r: Windows(st, d.seq_len, *r, document_mask=d.document_mask)
        ranges = [self._split(s, st) for s, st in zip(self.sources, stores)]
        self.train = [make(st, r["train"]) for st, r in zip(stores, ranges)]
        self.sizes = np.array([len(rows) for rows in self.train])
        for source, rows in zip(self.sources, self.train):
            if getattr(rows, "truncated", 0):
                log.warning("source %s: %d documents are longer than data.seq_len + 1 and are "
                            "cut", source.name, rows.truncated)
        self.mixer = BlockMixer([s.share for s in self.sources], d.seed, names=self.names)
        self._check_shares()
        held = self._eval_sources(ranges)
        self.held = [make(stores[i], ranges[i]["eval"]) for i in held]
        self.eval_mixer = None
        if held:  # the eval sources' shares, renormalized
            shares = np.array([self.sources[i].share for i in held])
            self.eval_mixer = BlockMixer(list(shares / shares.sum()), d.seed,
                                         names=[self.names[i] for i in held])

    def _split(self, source: SourceConfig, store: TokenStore) -> dict[str, tuple]:
        d = self.cfg.data
        what, n = self.what[source.name], source.min_doc_tokens
        if n and not store.documents:
            raise DataError(f"{what} has no document of at least {n} tokens (min_doc_tokens)")
        if d.packing == "documents":
            return split_documents(store, d.eval_fraction)
        if len(store) < d.seq_len + 1:
            held = f" in its {store.documents} documents of at least {n} tokens " \
                   f"(min_doc_tokens)" if n else ""
            raise DataError(f"{what} has {len(store)} tokens{held}, fewer than one window "
                            f"(data.seq_len + 1 = {d.seq_len + 1} tokens)")
        return split_windows(store, d.seq_len, d.eval_fraction)

    def _check_shares(self) -> None:
        """Every source gets at least one window of the run's train.steps * train.batch_size."""
        t = self.cfg.train
        total = t.steps * t.batch_size
        for source, taken in zip(self.sources, self.mixer.consumed(total)):
            if not taken:
                raise ConfigError(f"source {source.name}: share {source.share:g} gives it no "
                                  f"window in the run's {total} windows (train.steps {t.steps} "
                                  f"x train.batch_size {t.batch_size}); raise its share or "
                                  f"train.steps")

    def _eval_sources(self, ranges: list[dict]) -> list[int]:
        """The sources with eval windows (or documents); a warning names the others."""
        fraction = self.cfg.data.eval_fraction
        if not fraction:
            log.info("eval is off: data.eval_fraction is 0")
            return []
        unit = "documents" if self.cfg.data.packing == "documents" else "windows"
        have = [i for i, r in enumerate(ranges) if r["eval"][1] > r["eval"][0]]
        needs, totals = _fewest_for_one(fraction), [r["eval"][1] for r in ranges]
        if not have:
            sizes = ", ".join(f"{n}: {total} {unit}" for n, total in zip(self.names, totals))
            log.warning("eval is off: no source gives an eval %s at data.eval_fraction %g (%s; "
                        "a source needs %d)", unit[:-1], fraction, sizes, needs)
            return []
        for i, name in enumerate(self.names):
            if i not in have:
                log.warning("source %s: its %d %s give no eval %s at data.eval_fraction %g (it "
                            "needs %d); eval leaves it out", name, totals[i], unit, unit[:-1],
                            fraction, needs)
        return have

    def data(self, start: int, process_index: int = 0, process_count: int = 1):
        """(train batches from step `start`, fixed eval batches, step -> realized epochs)."""
        d, t = self.cfg.data, self.cfg.train
        where = (process_index, process_count)
        it = batches(self.train, self.mixer, t.batch_size, d.seed, start, t.steps, *where,
                     prefetch=d.prefetch)
        evals = list(batches(self.held, self.eval_mixer, t.batch_size, d.seed, 0, t.eval_batches,
                             *where, prefetch=0)) if self.held else []
        return it, evals, self.epochs_at

    def epochs_at(self, step: int) -> dict:
        """Realized epochs of every source after `step` steps."""
        seen = self.mixer.consumed(step * self.cfg.train.batch_size) / self.sizes
        return {f"epochs/{name}": float(e) for name, e in zip(self.names, seen)}

    def sources_at(self, step: int) -> dict:
        """Windows (rows) each source gives the batch of `step`."""
        b = self.cfg.train.batch_size
        counts = self.mixer.consumed((step + 1) * b) - self.mixer.consumed(step * b)
        return {name: int(n) for name, n in zip(self.names, counts)}
