"""A sweep cell's identity: what it computes, hashed, so equal cells share one directory.

The identity is the cell's resolved training config with two kinds of keys dropped, plus what
its data is:
- keys that never change what a run computes (`NON_SEMANTIC`: where it writes, how often it logs,
  evaluates or checkpoints, and the paths whose contents the data identity holds instead);
- fields at their default value, so adding a field with a default, or writing a default out,
  keeps every hash (as in Marin's executor, which versions only the fields a step names).
The data identity is the source spec itself for synthetic data and `builtin:`/corpus sources
(as the token-store cache keys them), each `store:` source's manifest, the mixture's contents
(not its path) and the content hash of `data.tokenizer`. Reordering keys changes nothing: the
hash is of JSON with sorted keys.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from phijax.config import Config, from_dict
from phijax.errors import ConfigError, DataError
from phijax.hashing import digest

# Dotted keys of the training config that do not change what a run computes.
NON_SEMANTIC = (
    "run.dir",                      # the sweep sets it to the cell's directory
    "run.distributed",              # how processes start, not what they compute
    "data.cache_dir",               # where tokenizers and stores are cached
    "data.prefetch",
    "data.corpus", "data.mixture", "data.tokenizer",  # paths: the data identity holds their contents
    "train.log_every",              # logging, evaluation and checkpoint cadence
    "train.eval_every",
    "train.peak_flops_per_device",  # only the reported MFU
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
)
HASH_LENGTH = 12


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def explicit_fields(obj: Any) -> dict:
    """The fields of a dataclass that differ from their declared defaults, nested like the
    dataclass (required fields always kept; a list of dataclasses kept item by item)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            inner = explicit_fields(value)
            if inner:
                out[f.name] = inner
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            out[f.name] = [explicit_fields(v) for v in value]
        elif value != _default(f):
            out[f.name] = value
    return out


def _drop(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(last, None)


def semantic_config(cfg: Config) -> dict:
    """The fields of `cfg` that change what a run computes and differ from their defaults."""
    tree = explicit_fields(cfg)
    for key in NON_SEMANTIC:
        _drop(tree, key)
    return {section: fields for section, fields in tree.items() if fields}


def store_manifest(name: str, store: str) -> dict:
    path = Path(store) / "manifest.json"
    if not path.is_file():
        raise DataError(f"source {name}: store {store} does not exist (no manifest.json); "
                        f"make it with `phijax data tokenize ... --out {store}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"source {name}: {path} is not JSON") from None


def mixture_identity(raw: dict) -> dict:
    """A mixture mapping (as its YAML holds it) checked, with each `store:` replaced by the
    manifest of that store."""
    from phijax.data.mixture import MixtureConfig, validate_mixture

    mixture = from_dict(MixtureConfig, raw)
    validate_mixture(mixture)
    tree = explicit_fields(mixture)
    for source, spec in zip(mixture.sources, tree["sources"]):
        if source.store:
            spec["store"] = store_manifest(source.name, source.store)
    return tree


def data_identity(cfg: Config, mixture: Optional[dict]) -> dict:
    """What the run's data is (see the module docstring); `mixture` is the mapping of
    `data.mixture` (None without one)."""
    d = cfg.data
    if d.synthetic:
        return {"synthetic": True}
    out: dict = {"mixture": mixture_identity(mixture)} if mixture is not None else \
        {"corpus": list(d.corpus)}
    if d.tokenizer:
        from phijax.data.tokenizer import load_tokenizer
        out["tokenizer"] = load_tokenizer(d.tokenizer).hash
    return out


def identity(cfg: Config, mixture: Optional[dict], command: str = "train") -> dict:
    """Everything a cell's hash covers."""
    out = {"config": semantic_config(cfg), "data": data_identity(cfg, mixture)}
    if command != "train":
        out["command"] = command
    return out


def cell_hash(ident: dict) -> str:
    return digest(ident, length=HASH_LENGTH)


def differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys at which two JSON-like trees differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(before.keys() | after.keys())
        return [d for k in keys for d in differences(before.get(k), after.get(k),
                                                     f"{prefix}.{k}" if prefix else str(k))]
    return [] if before == after else [prefix or "(whole)"]


def check_unique(cells: list) -> None:
    """Two cells of one sweep with equal identities: the keys they differ by do not change
    what a run computes."""
    seen: dict[str, Any] = {}
    for cell in cells:
        other = seen.setdefault(cell.hash, cell)
        if other is not cell:
            raise ConfigError(f"cells {other.label} and {cell.label} are the same run (hash "
                              f"{cell.hash}): the keys they differ by are not semantic "
                              f"({', '.join(NON_SEMANTIC)})")
