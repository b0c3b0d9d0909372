"""What a run trains on: the `Task` (batches from a step, eval batches, the objective) and the
language-modelling task of `phijax train` and `sft`, over the configured corpus or mixture."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import jax
from jax.experimental import multihost_utils

from phijax import paths
from phijax.config import Config
from phijax.data.loader import synthetic_batches
from phijax.errors import ConfigError


@dataclass
class Task:
    """What a run trains on. `phijax train` and `sft` use `lm_task`; `phijax dpo` uses
    `phijax.posttrain.dpo.dpo_task`. `data(start)` gives (batches from step `start`, fixed eval
    batches, step -> extra metrics such as realized epochs); `sources_at(step)` the windows each
    source of a mixture gives that step's batch ({} for data without sources)."""
    data: Callable
    tokens_per_step: int
    objective: Optional[Callable] = None  # None: next-token cross-entropy
    batch_dims: Optional[dict] = None  # batch key -> rank; None: the LM batch
    tokenizer: Optional[Path] = None  # its file; its files are copied into the run directory
    sources_at: Optional[Callable[[int], dict]] = None


def _synthetic(cfg: Config, start: int):
    d, t, pc = cfg.data, cfg.train, jax.process_count()
    it = synthetic_batches(cfg.model.vocab_size, t.batch_size // pc, cfg.data.seq_len,
                           d.seed + jax.process_index(), start, t.steps)
    return it, [], lambda step: {}


def lm_task(cfg: Config, mesh, chats_only: bool = False) -> Task:
    """Language modelling on the configured corpus or mixture (tokenized and cached once);
    `chats_only` (SFT) rejects a source with any non-chat document. Every check of the data
    (see `phijax.data.training`) runs here, before anything compiles."""
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    if cfg.data.synthetic:
        return Task(data=lambda start: _synthetic(cfg, start), tokens_per_step=tokens_per_step,
                    sources_at=lambda step: {})
    from phijax.data.prepare import prepare
    from phijax.data.training import TrainingData
    prepared = None
    if jax.process_index() == 0:  # builds the cache once; the others then read it
        prepared = prepare(cfg.data)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("phijax: data prepared")
    tokenizer, mixture, stores = prepared or prepare(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} pieces")
    for source, store in zip(mixture.sources, stores):
        m = store.manifest
        if chats_only and m["chat_documents"] != m["documents"]:
            raise ConfigError(f"source {source.name}: {m['documents'] - m['chat_documents']} "
                              f"of {m['documents']} documents are not chats (messages)")
    data = TrainingData(cfg, tokenizer, mixture, stores)
    where = (jax.process_index(), jax.process_count())
    return Task(data=lambda start: data.data(start, *where), tokens_per_step=tokens_per_step,
                tokenizer=tokenizer.path, sources_at=data.sources_at)


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_init_from(cfg: Config) -> None:
    """run.init_from must be a run directory with a checkpoint of this model's shapes; its
    tokenizer becomes data.tokenizer unless one is set."""
    if not cfg.run.init_from:
        return
    from phijax.data.tokenizer import find_tokenizer
    from phijax.weights import latest_step, load_config
    source = paths.as_path(cfg.run.init_from)
    base = load_config(source).model
    for name in SHAPE_FIELDS:
        if getattr(base, name) != getattr(cfg.model, name):
            raise ConfigError(f"model.{name} is {getattr(cfg.model, name)} but run.init_from "
                              f"{source} has {getattr(base, name)}")
    latest_step(source)
    if not cfg.data.tokenizer and (found := find_tokenizer(source)) is not None:
        cfg.data.tokenizer = str(found)
