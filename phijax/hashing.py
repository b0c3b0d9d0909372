"""Hashes: content digests of data and files, and the 64-bit mixer for vectorised n-gram hashing."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def digest(*parts: Any, length: int = 16) -> str:
    """A short hex key of JSON-able `parts` (the keys of tokenizer and token-store caches): the
    sha256 of their JSON with sorted keys, as cache directories have always been named."""
    return sha256_hex(json.dumps(parts, sort_keys=True))[:length]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over a uint64 array (arithmetic wraps mod 2**64): spreads
    polynomial or combined hashes over all 64 bits. One new array and one scratch array (1.5x
    faster than a new array per operation on MinHash's [permutations, shingles] arrays)."""
    x = np.asarray(x ^ (x >> np.uint64(30)))
    scratch = np.empty_like(x)
    np.multiply(x, _M1, out=x)
    np.bitwise_xor(x, np.right_shift(x, np.uint64(27), out=scratch), out=x)
    np.multiply(x, _M2, out=x)
    return np.bitwise_xor(x, np.right_shift(x, np.uint64(31), out=scratch), out=x)
