"""Mixtures of token stores: shares per source, the planning report, and the exact block mixer.

Every training window has `seq_len + 1` tokens, so mixing windows in fixed proportions mixes
tokens in those proportions. The block mixer makes that exact rather than expected: the global
window stream is cut into blocks of `block` windows; each block holds a fixed count of windows
from every source (largest-remainder rounding of share * block), in a seeded order that differs
per block. Window i of the stream is a pure function of (seed, i), so resume needs only the step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from phijax.config import from_dict, read_yaml
from phijax.errors import ConfigError


@dataclass
class SourceConfig:
    name: str
    share: float
    corpus: list[str] = field(default_factory=list)  # specs to build a store from (cached)
    glob: Optional[str] = None  # which files of a corpus directory to read, e.g. "**/*.py"
    store: Optional[str] = None  # or an existing token store directory
    unique_tokens: Optional[float] = None  # for planning without a store (e.g. the paper's counts)
    # Only the store's documents of at least this many tokens (with their <|endoftext|>): the
    # long-context sources of mid-training. Windows are drawn from those documents alone.
    min_doc_tokens: Optional[int] = None


@dataclass
class MixtureConfig:
    sources: list[SourceConfig]
    max_epochs: float = 20.0  # the report warns when a source would repeat more often


def load_mixture(path: str | Path) -> MixtureConfig:
    raw = read_yaml(path, "mixture file")
    if not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise ConfigError(f"mixture {path}: 'sources' must be a non-empty list")
    cfg = from_dict(MixtureConfig, raw)
    validate_mixture(cfg)
    return cfg


def validate_mixture(cfg: MixtureConfig) -> None:
    names = [s.name for s in cfg.sources]
    for i, s in enumerate(cfg.sources):
        if not s.name:
            raise ConfigError(f"sources[{i}]: every source needs a name")
        if names.count(s.name) > 1:
            raise ConfigError(f"source {s.name}: the name is used twice")
        if s.share <= 0:
            raise ConfigError(f"source {s.name}: share must be positive, got {s.share}")
        if s.corpus and s.store:
            raise ConfigError(f"source {s.name}: give either corpus or store, not both")
        if s.min_doc_tokens is not None and s.min_doc_tokens <= 0:
            raise ConfigError(f"source {s.name}: min_doc_tokens must be positive, got "
                              f"{s.min_doc_tokens}")
    total = sum(s.share for s in cfg.sources)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"mixture shares sum to {total:g}, not 1 "
                          f"({', '.join(f'{s.name}={s.share:g}' for s in cfg.sources)})")


def block_counts(shares: list[float], block: int, names: Optional[list[str]] = None) -> np.ndarray:
    """Windows per source in one block: largest-remainder rounding of share * block."""
    exact = np.asarray(shares, np.float64) * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    if (counts == 0).any():
        i = int(np.flatnonzero(counts == 0)[0])
        name = f"source {names[i]}" if names else f"sources[{i}]"
        raise ConfigError(f"{name}: share {shares[i]:g} gives it no window in a block of "
                          f"{block} windows; raise it to at least {1 / block:g}")
    return counts


class BlockMixer:
    """Maps global window index -> (source, index within that source's stream).

    Each source's stream is consumed in order (0, 1, 2, ...), so a source's own per-epoch
    shuffle decides which window comes next and every window is seen once per epoch.
    """

    def __init__(self, shares: list[float], seed: int, block: int = 1000,
                 names: Optional[list[str]] = None):
        self.counts = block_counts(shares, block, names)
        self.block, self.seed = block, seed
        self.layout = np.repeat(np.arange(len(shares)), self.counts)

    @functools.lru_cache(maxsize=4)
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, how many earlier positions of the block share it)."""
        sources = np.random.default_rng([self.seed, b]).permutation(self.layout)
        rank = np.zeros(self.block, np.int64)
        for source in range(len(self.counts)):
            where = sources == source
            rank[where] = np.arange(where.sum())
        return sources, rank

    def consumed(self, n: int) -> np.ndarray:
        """Windows taken from each source by the first `n` windows of the stream."""
        b, pos = divmod(int(n), self.block)
        return b * self.counts + np.bincount(self._block(b)[0][:pos], minlength=len(self.counts))

    def __call__(self, index: int) -> tuple[int, int]:
        b, pos = divmod(int(index), self.block)
        sources, rank = self._block(b)
        source = int(sources[pos])
        return source, b * int(self.counts[source]) + int(rank[pos])


def plan(cfg: MixtureConfig, total_tokens: float, counts: Optional[dict] = None) -> list[dict]:
    """Per source: share, unique tokens, tokens seen and epochs after `total_tokens`. A source's
    unique tokens are its `unique_tokens`, else `counts[name]` (its store's tokens)."""
    rows = []
    for s in cfg.sources:
        unique = s.unique_tokens if s.unique_tokens is not None else (counts or {}).get(s.name)
        if unique is None:
            raise ConfigError(f"source {s.name}: needs unique_tokens, a store or a corpus to plan")
        seen = s.share * total_tokens
        rows.append({"source": s.name, "share": s.share, "unique_tokens": unique,
                     "tokens_seen": seen, "epochs": seen / unique,
                     "warning": seen / unique > cfg.max_epochs})
    return rows


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_plan(rows: list[dict], total_tokens: float, max_epochs: float) -> str:
    lines = [f"plan for {_human(total_tokens)} training tokens",
             f"{'source':<16} {'share':>6} {'unique':>8} {'seen':>8} {'epochs':>7}"]
    for r in rows:
        lines.append(f"{r['source']:<16} {r['share']:>6.1%} {_human(r['unique_tokens']):>8} "
                     f"{_human(r['tokens_seen']):>8} {r['epochs']:>7.1f}")
    for r in rows:
        if r["warning"]:
            lines.append(f"warning: source {r['source']} repeats {r['epochs']:.1f} times, "
                         f"more than max_epochs {max_epochs:g}")
    return "\n".join(lines)
