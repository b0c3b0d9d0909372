"""Exact and MinHash-LSH deduplication: in memory (`find_duplicates`, the seeds' dedup), or as a
sharded flow that never holds the corpus in memory (`phijax-tools corpus run`):

  signatures  per input shard: each document's exact hash (of its normalised text) and its
              LSH band hashes, written per band as sorted (hash, document) arrays
  buckets     per (band, hash range): the documents whose band hashes are equal, read from
              every shard's sorted arrays by binary search, as edges to the bucket's first
              document
  clusters    connected components of all edges (scipy); each cluster keeps its first document
              (the smallest id: shard, then position) and names every member by that id
  filter      per shard: documents that are not their cluster's kept one are removed

A document's id is shard << 32 | position. Exact duplicates share the hash of their text
NFKC-normalised, case-folded, whitespace collapsed. Shingles are word n-grams of the normalised text
(NFKC, lowercase, punctuation dropped), hashed once to 64 bits (tools.decontam.ngram_hashes,
vectorised over a batch); the `bands * rows` MinHash permutations are one array op,
splitmix64(shingle ^ seed_i), and a signature is its minimum per permutation. Defaults as
FineWeb: 5-grams, 14 bands of 8 rows (documents with Jaccard similarity 0.75 share a bucket with
probability 0.77, 0.85 with 0.98). A text shorter than n words is one shingle; a text without
words is deduplicated exactly only.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from phijax.config import positive
from phijax.files import atomic_open
from phijax.hashing import mix64
from tools.decontam import ngram_hashes, normalize

_FOLD = np.uint64(0x100000001B3)
_MAX_CELLS = 1 << 18  # permutations x shingles hashed at once: 2 MiB of uint64 stays in
# cache (2x faster than 64 MiB blocks, which wait on memory)


@dataclass
class DedupConfig:
    exact: bool = True
    fuzzy: bool = True
    ngram: int = positive(5)
    bands: int = positive(14)
    rows: int = positive(8)
    seed: int = 1
    partitions: int = positive(4)  # hash ranges per band in the buckets step


def normalise_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the key for exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_hash(text: str) -> int:
    """64 bits of the BLAKE2b of the normalised text."""
    digest = hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _shingles(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shingle hashes, text index), sorted by text; a text of fewer than n words is one."""
    hashes, index = ngram_hashes(texts, n)
    have = np.zeros(len(texts), bool)
    have[index] = True
    extra = [(i, len(normalize(texts[i]))) for i in np.flatnonzero(~have)]
    extra = [(i, k) for i, k in extra if k]
    if extra:
        more = [ngram_hashes([texts[i]], k)[0] for i, k in extra]
        hashes = np.concatenate([hashes] + more)
        index = np.concatenate([index] + [np.full(len(m), i) for (i, _), m in zip(extra, more)])
        order = np.argsort(index, kind="stable")
        hashes, index = hashes[order], index[order]
    return hashes, index


class MinHasher:
    """Signatures and band hashes for `bands * rows` permutations seeded by `seed`."""

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, 2**63, bands * rows, dtype=np.uint64) * np.uint64(2) + \
            np.uint64(1)

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures [len(texts), bands*rows] uint64, has_words [len(texts)] bool)."""
        hashes, index = _shingles(texts, self.ngram)
        sigs = np.full((len(texts), len(self.seeds)), np.iinfo(np.uint64).max, np.uint64)
        step = max(1, _MAX_CELLS // len(self.seeds))
        for start in range(0, len(hashes), step):
            h, ix = hashes[start:start + step], index[start:start + step]
            perm = mix64(h[None, :] ^ self.seeds[:, None])  # [perms, shingles]
            bounds = np.flatnonzero(np.r_[True, ix[1:] != ix[:-1]])
            mins = np.minimum.reduceat(perm, bounds, axis=1).T
            docs = ix[bounds]
            sigs[docs] = np.minimum(sigs[docs], mins)
        has = np.zeros(len(texts), bool)
        has[index] = True
        return sigs, has

    def band_hashes(self, sigs: np.ndarray) -> np.ndarray:
        """[n, bands] uint64: each band's rows folded into one hash."""
        rows = sigs.reshape(len(sigs), self.bands, self.rows)
        h = np.zeros(rows.shape[:2], np.uint64)
        for r in range(self.rows):
            h = mix64(h * _FOLD ^ rows[:, :, r])
        return h


# ---------------------------------------------------------------- in memory (seeds)

def find_duplicates(texts: Iterable[str], ngram: int = 5, bands: int = 14, rows: int = 8,
                    seed: int = 1, threshold: float | None = None,
                    exact: bool = True) -> list[tuple[int, int, str]]:
    """(index, index of the earlier kept text it duplicates, "exact" | "near") for every text
    that is removed, in input order; the first of a group is kept. With `threshold`, an LSH
    candidate counts only if its signatures agree on at least that share of permutations (the
    estimated Jaccard similarity)."""
    texts = list(texts)
    hasher = MinHasher(ngram, bands, rows, seed)
    sigs, has = hasher.signatures(texts)
    bands_of = hasher.band_hashes(sigs)
    seen: dict[int, int] = {}
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    out = []
    for i, text in enumerate(texts):
        key = exact_hash(text) if exact else None
        if key is not None and key in seen:
            out.append((i, seen[key], "exact"))
            continue
        if has[i]:
            hits = sorted({j for b, h in enumerate(bands_of[i].tolist())
                           for j in buckets[b].get(h, ())})
            if threshold is not None:
                hits = [j for j in hits if (sigs[j] == sigs[i]).mean() >= threshold]
            if hits:
                out.append((i, hits[0], "near"))
                continue
            for b, h in enumerate(bands_of[i].tolist()):
                buckets[b].setdefault(h, []).append(i)
        if key is not None:
            seen[key] = i
    return out


# ---------------------------------------------------------------- sharded: signatures

def _save(path: Path, array: np.ndarray) -> None:
    """Written whole or not at all (renamed into place); not fsynced: these are a run's
    intermediate files, and a run killed at any point redoes what has no marker."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_signatures(texts: Sequence[str], shard: int, out: Path, cfg: DedupConfig) -> None:
    """One shard's sorted (hash, document id) arrays: `b{band}` per LSH band, `exact`; the
    `done-{shard}` marker last."""
    out.mkdir(parents=True, exist_ok=True)
    ids = (np.uint64(shard) << np.uint64(32)) | np.arange(len(texts), dtype=np.uint64)
    columns = {}
    if cfg.fuzzy:
        hasher = MinHasher(cfg.ngram, cfg.bands, cfg.rows, cfg.seed)
        sigs, has = hasher.signatures(texts)
        bands = hasher.band_hashes(sigs)
        columns.update({f"b{b}": (bands[has, b], ids[has]) for b in range(cfg.bands)})
    if cfg.exact:
        columns["exact"] = (np.fromiter(map(exact_hash, texts), np.uint64, len(texts)), ids)
    for name, (hashes, doc_ids) in columns.items():
        order = np.argsort(hashes, kind="stable")
        _save(out / f"{name}-{shard:06d}.hash.npy", hashes[order])
        _save(out / f"{name}-{shard:06d}.ids.npy", doc_ids[order])
    (out / f"done-{shard:06d}").touch()


def band_names(cfg: DedupConfig) -> list[str]:
    return ([f"b{b}" for b in range(cfg.bands)] if cfg.fuzzy else []) + \
        (["exact"] if cfg.exact else [])


# ---------------------------------------------------------------- sharded: buckets

def _hash_range(part: int, parts: int) -> tuple[int, int]:
    return (part << 64) // parts, ((part + 1) << 64) // parts


def bucket_edges(sig_dir: Path, shards: int, band: str, part: int, parts: int) -> np.ndarray:
    """[k, 2] uint64 edges (document, first document of its bucket) among the band hashes of
    range `part` of `parts`, read from every shard by binary search."""
    lo, hi = _hash_range(part, parts)
    hashes, ids = [], []
    for shard in range(shards):
        h = np.load(sig_dir / f"{band}-{shard:06d}.hash.npy", mmap_mode="r")
        a = np.searchsorted(h, np.uint64(lo))
        b = len(h) if hi >= 1 << 64 else np.searchsorted(h, np.uint64(hi))
        hashes.append(np.asarray(h[a:b]))
        ids.append(np.asarray(np.load(sig_dir / f"{band}-{shard:06d}.ids.npy",
                                      mmap_mode="r")[a:b]))
    h, d = np.concatenate(hashes), np.concatenate(ids)
    if not len(h):
        return np.zeros((0, 2), np.uint64)
    order = np.lexsort((d, h))  # by hash, then document: a bucket's first is its smallest id
    h, d = h[order], d[order]
    start = np.r_[True, h[1:] != h[:-1]]
    first = d[np.flatnonzero(start)[np.cumsum(start) - 1]]
    dup = ~start
    return np.stack([d[dup], first[dup]], axis=1)


def write_bucket_edges(sig_dir: Path, shards: int, band: str, part: int, parts: int,
                       out: Path) -> int:
    edges = bucket_edges(sig_dir, shards, band, part, parts)
    _save(out / f"edges-{band}-{part:04d}.npy", edges)
    return len(edges)


# ---------------------------------------------------------------- sharded: clusters

def cluster(edge_dir: Path, out: Path) -> dict:
    """Connected components of every edge file: `clusters.npz` holds the sorted ids of the
    documents in a cluster of two or more, the kept id of each one's cluster, and whether it
    is an exact copy of another; returns the cluster-size report."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    parts = sorted(edge_dir.glob("edges-*.npy"))
    edges = [np.load(p) for p in parts]
    exact = [e[:, 0] for p, e in zip(parts, edges) if p.name.startswith("edges-exact-")]
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64)
    members, local = np.unique(edges, return_inverse=True)
    local = local.reshape(-1, 2)
    n = len(members)
    graph = coo_matrix((np.ones(len(local), np.int8), (local[:, 0], local[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    kept = np.full(labels.max() + 1 if n else 0, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(kept, labels, members)  # the smallest id of each component
    copies = np.isin(members, np.concatenate(exact)) if exact else np.zeros(n, bool)
    with atomic_open(out / "clusters.npz") as f:
        np.savez(f, members=members, kept=kept[labels], exact=copies)
    sizes = np.bincount(labels) if n else np.zeros(0, np.int64)
    histogram = np.unique(sizes, return_counts=True)
    return {"clusters": int(len(sizes)), "documents_in_clusters": int(n),
            "removed": int(n - len(sizes)), "largest": int(sizes.max()) if n else 0,
            "sizes": {int(s): int(c) for s, c in zip(*histogram)}}


class Clusters:
    """`lookup(ids)` -> (cluster id or -1, removal reason or None) of each document id."""

    def __init__(self, path: Path):
        with np.load(path) as z:
            self.members, self.kept, self.exact = z["members"], z["kept"], z["exact"]

    def lookup(self, ids: np.ndarray) -> list[tuple[int, str | None]]:
        ids = np.asarray(ids, np.uint64)
        at = np.minimum(np.searchsorted(self.members, ids), max(len(self.members) - 1, 0))
        found = (self.members[at] == ids) if len(self.members) else np.zeros(len(ids), bool)
        out = []
        for doc, hit, k in zip(ids.tolist(), found.tolist(), at.tolist()):
            if not hit:
                out.append((-1, None))
                continue
            kept = int(self.kept[k])
            reason = None if kept == doc else \
                "exact duplicate" if self.exact[k] else "near duplicate"
            out.append((kept, reason))
        return out
