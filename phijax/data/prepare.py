"""Make sure a run's tokenizer and token stores exist, building them once into a cache.

Every source is checked before anything is built: its corpus paths exist and its `store:` opens,
and an error names the source and the path. The tokenizer is `data.tokenizer`, or one trained on
the mixture's corpora (cached by corpus and settings). A corpus source's store is cached by
corpus, glob, text field and tokenizer, so runs and `phijax data report` build it once.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from phijax import paths
from phijax.config import DataConfig
from phijax.data.corpus import check_specs, documents
from phijax.data.mixture import MixtureConfig, SourceConfig, load_mixture
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from phijax.errors import ConfigError
from phijax.hashing import digest

log = logging.getLogger("phijax")
TOKENIZER_VERSION = 2  # bump when training settings change, so caches retrain


def cache_path(cfg: DataConfig):
    """data.cache_dir: a local directory (`~` expanded), or a gs:// or s3:// URL that every
    host of a pod reads the tokenizer and stores process 0 built from."""
    return paths.as_path(cfg.cache_dir) if paths.is_url(cfg.cache_dir) else \
        Path(cfg.cache_dir).expanduser()


def mixture_for(cfg: DataConfig) -> MixtureConfig:
    """The run's mixture: `data.mixture`, or `data.corpus` as a mixture of one."""
    if cfg.mixture:
        return load_mixture(cfg.mixture)
    return MixtureConfig(sources=[SourceConfig(name="corpus", share=1.0, corpus=cfg.corpus)])


def open_sources(sources: list[SourceConfig],
                 in_mixture: bool = True) -> list[Optional[TokenStore]]:
    """Check every source before anything is built (its corpus paths exist, its store opens);
    the store of each `store:` source, None for a corpus source. `in_mixture`: errors name the
    source (`source NAME`), else `data.corpus`."""
    stores = []
    for s in sources:
        if not s.corpus and not s.store:
            raise ConfigError(f"source {s.name}: needs a corpus or a store")
        check_specs(s.corpus, f"source {s.name}: corpus" if in_mixture else "data.corpus:")
        stores.append(TokenStore(s.store, f"source {s.name}: store {s.store}") if s.store
                      else None)
    return stores


def run_tokenizer(cfg: DataConfig, mixture: MixtureConfig) -> Tokenizer:
    """`data.tokenizer` (a sentencepiece .model, or a Hugging Face tokenizer.json or the directory
    holding one), or the tokenizer trained on the mixture's corpora (cached)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    # each corpus once: sources over the same corpus (a length filter's) train the same tokenizer
    corpus = list(dict.fromkeys(spec for s in mixture.sources for spec in s.corpus))
    if not corpus:
        raise ConfigError("data.tokenizer is unset and no source has a corpus to train one on")
    key = digest(TOKENIZER_VERSION, corpus, cfg.text_field, cfg.tokenizer_vocab_size,
                 cfg.tokenizer_multiple, length=12)
    path = cache_path(cfg) / "tokenizers" / f"sp-{key}"
    if not paths.exists(path.with_suffix(".model")):
        log.info("training a %d-piece tokenizer on %s", cfg.tokenizer_vocab_size, corpus)
        train_tokenizer(documents(corpus, cfg.text_field), path, cfg.tokenizer_vocab_size,
                        cfg.tokenizer_multiple)
    return load_tokenizer(path.with_suffix(".model"))


def prepare(cfg: DataConfig) -> tuple[Tokenizer, MixtureConfig, list[TokenStore]]:
    """Tokenizer and one token store per mixture source, built into the cache when missing."""
    mixture = mixture_for(cfg)
    opened = open_sources(mixture.sources, in_mixture=bool(cfg.mixture))
    tokenizer = run_tokenizer(cfg, mixture)
    stores = [store or _cached_store(s, cfg, tokenizer)
              for s, store in zip(mixture.sources, opened)]
    return tokenizer, mixture, stores


def source_tokens(cfg: DataConfig, mixture: MixtureConfig) -> dict[str, int]:
    """Tokens in the store of each source that has no `unique_tokens` (for `phijax data
    report`): a `store:` source's store, or a corpus source's cached store, built with the run's
    tokenizer (`cfg`) when missing; only its documents of at least `min_doc_tokens` tokens."""
    wanted = [s for s in mixture.sources if s.unique_tokens is None and (s.corpus or s.store)]
    opened = open_sources(wanted)
    counts = {s.name: len(store.select(s.min_doc_tokens))
              for s, store in zip(wanted, opened) if store is not None}
    corpora = [s for s, store in zip(wanted, opened) if store is None]
    if corpora:
        tokenizer = run_tokenizer(cfg, mixture)  # the whole mixture's, as a run trains it
        for s in corpora:
            log.info("source %s: counting the tokens of corpus %s: its token store in %s (built "
                     "once, with tokenizer %s)", s.name, " ".join(s.corpus),
                     cache_path(cfg) / "stores", tokenizer.path)
            counts[s.name] = len(_cached_store(s, cfg, tokenizer).select(s.min_doc_tokens))
    return counts


def _cached_store(source: SourceConfig, cfg: DataConfig, tokenizer: Tokenizer) -> TokenStore:
    key = digest(source.corpus, source.glob, cfg.text_field, tokenizer.hash, length=12)
    path = cache_path(cfg) / "stores" / f"store-{key}"
    store = TokenStore(build_store(source.corpus, tokenizer, path, cfg.text_field, source.glob,
                                   what=f"source {source.name}"))
    if store.manifest["skipped"]:
        log.warning("source %s: skipped records %s, e.g. %s", source.name,
                    store.manifest["skipped"], "; ".join(store.manifest["skipped_examples"]))
    return store
