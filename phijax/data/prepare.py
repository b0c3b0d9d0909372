"""Make sure a run's tokenizer and token store exist, building them once into a cache."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from phijax.config import DataConfig
from phijax.data.corpus import Skipped, check_specs, documents
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger("phijax")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def prepare(cfg: DataConfig) -> tuple[Tokenizer, TokenStore]:
    check_specs(cfg.corpus)
    cache = Path(cfg.cache_dir).expanduser()
    if cfg.tokenizer:
        tokenizer = Tokenizer(cfg.tokenizer)
    else:
        path = cache / "tokenizers" / f"sp-{_key(cfg.corpus, cfg.text_field, cfg.tokenizer_vocab_size)}"
        if not path.with_suffix(".model").is_file():
            log.info("training a %d-piece tokenizer on %s", cfg.tokenizer_vocab_size, cfg.corpus)
            train_tokenizer(documents(cfg.corpus, cfg.text_field), path, cfg.tokenizer_vocab_size)
        tokenizer = Tokenizer(path.with_suffix(".model"))
    store_path = cache / "stores" / f"store-{_key(cfg.corpus, cfg.text_field, tokenizer.hash)}"
    if not (store_path / "manifest.json").is_file():
        skipped = Skipped()
        build_store(documents(cfg.corpus, cfg.text_field, skipped), tokenizer, store_path, skipped)
        if skipped.counts:
            log.warning("skipped records %s, e.g. %s", skipped.counts, "; ".join(skipped.examples))
    return tokenizer, TokenStore(store_path)
