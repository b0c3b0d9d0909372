"""Token stores: one flat token array plus document offsets, and a manifest.

A store directory holds tokens.npy (uint32), offsets.npy (int64, document starts plus the end)
and manifest.json. It is written to a temporary directory and renamed into place, so a crash
never leaves a half-written store behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from phijax.data.corpus import Skipped
from phijax.data.tokenizer import Tokenizer


def build_store(docs: Iterable[str], tokenizer: Tokenizer, out: str | Path,
                skipped: Skipped | None = None, chunk: int = 256) -> Path:
    """Tokenize `docs` (each followed by <|endoftext|>) into a store at `out`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pieces, lengths, batch = [], [], []
    bar = tqdm(desc=f"tokenize {out.name}", unit=" docs", mininterval=2.0)

    def flush():
        for ids in tokenizer.encode(batch):
            ids.append(tokenizer.eos_id)
            pieces.append(np.asarray(ids, np.uint32))
            lengths.append(len(ids))
        bar.update(len(batch))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) == chunk:
            flush()
    flush()
    bar.close()
    if not pieces:
        raise ValueError(f"store {out}: the corpus produced no documents")
    tokens = np.concatenate(pieces)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "offsets.npy", offsets)
    manifest = {"documents": len(lengths), "tokens": int(tokens.size),
                "tokenizer": str(tokenizer.path), "tokenizer_hash": tokenizer.hash,
                "skipped": (skipped.counts if skipped else {}),
                "skipped_examples": (skipped.examples if skipped else [])}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class TokenStore:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise ValueError(f"token store {path} has no manifest.json")
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_text())
        self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(path / "offsets.npy")

    def __len__(self) -> int:
        return int(self.tokens.size)
