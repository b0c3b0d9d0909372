"""Make sure a run's tokenizer and token store exist, building them once into a cache."""
from __future__ import annotations

import logging
from pathlib import Path

from phijax.config import DataConfig
from phijax.data.corpus import check_specs, documents
from phijax.data.mixture import MixtureConfig, SourceConfig, load_mixture
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import Tokenizer, train_tokenizer
from phijax.errors import ConfigError
from phijax.hashing import digest

log = logging.getLogger("phijax")
TOKENIZER_VERSION = 2  # bump when training settings change, so caches retrain


def mixture_for(cfg: DataConfig) -> MixtureConfig:
    """The run's mixture: `data.mixture`, or `data.corpus` as a mixture of one."""
    if cfg.mixture:
        return load_mixture(cfg.mixture)
    return MixtureConfig(sources=[SourceConfig(name="corpus", share=1.0, corpus=cfg.corpus)])


def prepare(cfg: DataConfig) -> tuple[Tokenizer, MixtureConfig, list[TokenStore]]:
    """Tokenizer and one token store per mixture source, built into the cache when missing."""
    mixture = mixture_for(cfg)
    for s in mixture.sources:
        if not s.corpus and not s.store:
            raise ConfigError(f"source {s.name}: needs a corpus or a store")
        check_specs(s.corpus)
    corpus = [spec for s in mixture.sources for spec in s.corpus]
    cache = Path(cfg.cache_dir).expanduser()
    if cfg.tokenizer:
        tokenizer = Tokenizer(cfg.tokenizer)
    else:
        if not corpus:
            raise ConfigError("data.tokenizer is unset and no source has a corpus to train one on")
        key = digest(TOKENIZER_VERSION, corpus, cfg.text_field, cfg.tokenizer_vocab_size,
                     cfg.tokenizer_multiple, length=12)
        path = cache / "tokenizers" / f"sp-{key}"
        if not path.with_suffix(".model").is_file():
            log.info("training a %d-piece tokenizer on %s", cfg.tokenizer_vocab_size, corpus)
            train_tokenizer(documents(corpus, cfg.text_field), path, cfg.tokenizer_vocab_size,
                            cfg.tokenizer_multiple)
        tokenizer = Tokenizer(path.with_suffix(".model"))
    stores = [TokenStore(s.store) if s.store else _cached_store(s, cfg, tokenizer, cache)
              for s in mixture.sources]
    return tokenizer, mixture, stores


def _cached_store(source: SourceConfig, cfg: DataConfig, tokenizer: Tokenizer, cache: Path):
    key = digest(source.corpus, source.glob, cfg.text_field, tokenizer.hash, length=12)
    path = cache / "stores" / f"store-{key}"
    store = TokenStore(build_store(source.corpus, tokenizer, path, cfg.text_field, source.glob))
    if store.manifest["skipped"]:
        log.warning("source %s: skipped records %s, e.g. %s", source.name,
                    store.manifest["skipped"], "; ".join(store.manifest["skipped_examples"]))
    return store
