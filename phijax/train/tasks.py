"""What a run trains on: the `Task` (batches from a step, eval batches, the objective) and the
language-modelling task of `phijax train` and `sft`, over the configured corpus or mixture."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from phijax.config import Config
from phijax.data.loader import (PackedDocuments, Windows, batches, split_documents, split_windows,
                                synthetic_batches)
from phijax.data.mixture import BlockMixer
from phijax.errors import ConfigError

log = logging.getLogger("phijax")


def _data(cfg: Config, prepared, start: int):
    """(train iterator from `start`, fixed eval batches, step -> realized epochs per source)."""
    d, t = cfg.data, cfg.train
    pi, pc = jax.process_index(), jax.process_count()
    if d.synthetic:
        return (synthetic_batches(cfg.model.vocab_size, t.batch_size // pc, d.seq_len,
                                  d.seed + pi, start, t.steps), [], lambda step: {})
    tokenizer, mixture, stores = prepared
    shares = [s.share for s in mixture.sources]
    if d.packing == "documents":
        ranges = [split_documents(store, d.eval_fraction) for store in stores]
        make = lambda st, r: PackedDocuments(st, d.seq_len, *r, pad_id=tokenizer.pad_id)
    else:
        ranges = [split_windows(store, d.seq_len, d.eval_fraction) for store in stores]
        make = lambda st, r: Windows(st, d.seq_len, *r, document_mask=d.document_mask)
    train = [make(st, r["train"]) for st, r in zip(stores, ranges)]
    for source, rows in zip(mixture.sources, train):
        if getattr(rows, "truncated", 0):
            log.warning("source %s: %d documents are longer than data.seq_len + 1 and are cut",
                        source.name, rows.truncated)
    mixer = BlockMixer(shares, d.seed)
    it = batches(train, mixer, t.batch_size, d.seed, start, t.steps, pi, pc, prefetch=d.prefetch)
    evals = []
    if all(r["eval"][1] > r["eval"][0] for r in ranges):
        held = [make(st, r["eval"]) for st, r in zip(stores, ranges)]
        evals = list(batches(held, mixer, t.batch_size, d.seed, 0, t.eval_batches, pi, pc,
                             prefetch=0))
    sizes = np.array([len(w) for w in train])

    def epochs_at(step: int) -> dict:
        seen = mixer.consumed(step * t.batch_size) / sizes
        return {f"epochs/{s.name}": float(e) for s, e in zip(mixture.sources, seen)}

    return it, evals, epochs_at


@dataclass
class Task:
    """What a run trains on. `phijax train` and `sft` use `lm_task`; `phijax dpo` uses
    `phijax.posttrain.dpo.dpo_task`. `data(start)` gives (batches from step `start`, fixed eval
    batches, step -> extra metrics such as realized epochs)."""
    data: Callable
    tokens_per_step: int
    objective: Optional[Callable] = None  # None: next-token cross-entropy
    batch_dims: Optional[dict] = None  # batch key -> rank; None: the LM batch
    tokenizer: Optional[Path] = None  # copied into the run directory


def lm_task(cfg: Config, mesh, chats_only: bool = False) -> Task:
    """Language modelling on the configured corpus or mixture (tokenized and cached once);
    `chats_only` (SFT) rejects a source with any non-chat document."""
    prepared = None
    if not cfg.data.synthetic:
        from phijax.data.prepare import prepare
        if jax.process_index() == 0:  # builds the cache once; the others then read it
            prepared = prepare(cfg.data)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("phijax: data prepared")
        prepared = prepared or prepare(cfg.data)
        if prepared[0].vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {prepared[0].vocab_size} pieces")
        for source, store in zip(prepared[1].sources, prepared[2]):
            m = store.manifest
            if chats_only and m["chat_documents"] != m["documents"]:
                raise ConfigError(f"source {source.name}: {m['documents'] - m['chat_documents']} "
                                  f"of {m['documents']} documents are not chats (messages)")
    return Task(data=lambda start: _data(cfg, prepared, start),
                tokens_per_step=cfg.train.batch_size * cfg.data.seq_len,
                tokenizer=prepared[0].path if prepared else None)


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_init_from(cfg: Config) -> None:
    """run.init_from must be a run directory with a checkpoint of this model's shapes; its
    tokenizer becomes data.tokenizer unless one is set."""
    if not cfg.run.init_from:
        return
    from phijax.weights import latest_step, load_config
    source = Path(cfg.run.init_from)
    base = load_config(source).model
    for name in SHAPE_FIELDS:
        if getattr(base, name) != getattr(cfg.model, name):
            raise ConfigError(f"model.{name} is {getattr(cfg.model, name)} but run.init_from "
                              f"{source} has {getattr(base, name)}")
    latest_step(source)
    if not cfg.data.tokenizer and (source / "tokenizer.model").is_file():
        cfg.data.tokenizer = str(source / "tokenizer.model")
