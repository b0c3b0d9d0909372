"""The sweep file: a base training config, overrides, a grid, zipped lists and seeds, expanded
into cells, each a resolved and checked training config with its identity and directory.

    name: tiny-lr-batch                 # the sweep's directory under root
    base: configs/tiny.yaml             # the training config every cell starts from
    root: runs/sweeps                   # cells live in root/name/<label>-<hash> (or gs://B/sweeps)
    overrides: {train.steps: 200}       # dotted keys set in every cell
    grid:                               # the cartesian product of these lists
      optimizer.learning_rate: [1e-3, 3e-3]
      train.batch_size: [8, 16]
    zip:                                # lists varied together (each group crossed with the grid)
      - {mixture.synthetic: [0.2, 0.4], mixture.web: [0.8, 0.6]}
    seeds: [0, 1]                       # each cell once per seed, set at seed_key

A `mixture.NAME` key sets the share of source NAME in the mixture of `data.mixture` (0 drops
the source); the cell then trains on its own copy of that mixture. Paths (`base`, `root`, and
paths inside configs) are relative to the working directory, as for `phijax train`. A `root` in a
bucket (gs:// or s3://) holds everything of the sweep, cells' run directories included, so
workers on machines that share no file system can share the sweep.
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from phijax.config import Config, check_fields, from_dict, load, one_of, read_yaml, set_dotted, \
    validate
from phijax.errors import ConfigError, UserError
from phijax.paths import AnyPath, as_path
from phijax.sweep.identity import cell_hash, check_unique, identity

MIXTURE = "mixture."
SHORT_NAMES = {"learning_rate": "lr", "batch_size": "batch", "weight_decay": "wd",
               "warmup_steps": "warmup", "num_hidden_layers": "layers", "hidden_size": "hidden",
               "intermediate_size": "ffn", "seq_len": "seq", "microbatches": "micro"}


@dataclass
class SweepSpec:
    name: str
    base: str  # training config YAML
    root: str = "runs/sweeps"
    command: str = one_of("train", "sft", "dpo")
    overrides: dict = field(default_factory=dict)  # dotted key -> value, in every cell
    grid: dict = field(default_factory=dict)  # dotted key -> list of values
    zip: list[dict] = field(default_factory=list)  # groups of keys whose lists vary together
    seeds: list[int] = field(default_factory=list)
    seed_key: str = "train.seed"
    metrics: list[str] = field(default_factory=lambda: ["loss", "eval_loss"])  # `status` columns


@dataclass
class Cell:
    label: str  # readable: the grid, zip and seed values of this cell
    values: dict  # dotted key -> this cell's value of each grid, zip and seed key
    config: Config  # resolved and checked; run.dir is the cell's directory
    mixture: Optional[dict]  # the mixture mapping, when the sweep sets mixture shares
    identity: dict
    hash: str
    dir: AnyPath  # a local Path, or an epath.Path when the sweep's root is a bucket

    @property
    def name(self) -> str:
        return self.dir.name


def load_sweep(path: str | Path) -> SweepSpec:
    """The sweep file at `path`, checked; every error is one line naming the file."""
    raw = read_yaml(path, "sweep file")
    try:
        spec = from_dict(SweepSpec, raw)
        check_fields(spec)
        _check_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"sweep {path}: {e}") from None
    return spec


def _check_spec(spec: SweepSpec) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise ConfigError(f"name {spec.name!r}: use letters, digits, '.', '_' and '-'")
    groups = [("grid", spec.grid)] + [(f"zip[{i}]", g) for i, g in enumerate(spec.zip)]
    for where, group in groups:
        for key, values in group.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{key}: expected a non-empty list of values")
    for i, group in enumerate(spec.zip):
        lengths = {key: len(values) for key, values in group.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"zip[{i}]: its lists differ in length "
                              f"({', '.join(f'{k} {n}' for k, n in lengths.items())})")
    keys = [("overrides", k) for k in spec.overrides] + \
        [(where, k) for where, group in groups for k in group] + \
        ([("seeds", spec.seed_key)] if spec.seeds else [])
    seen: dict[str, str] = {}
    for where, key in keys:
        if key == "run.dir":
            raise ConfigError(f"{where}.{key}: the sweep sets run.dir to each cell's directory")
        if key == "data.mixture" and where != "overrides":
            raise ConfigError(f"{where}.{key}: sweep over {MIXTURE}SOURCE shares instead, or "
                              f"set data.mixture in overrides")
        if key in seen:
            raise ConfigError(f"{key} is set in both {seen[key]} and {where}")
        seen[key] = where


def combinations(spec: SweepSpec) -> list[dict]:
    """Each cell's values of the grid, zip and seed keys, in file order (the grid's first key
    varies slowest, seeds fastest)."""
    axes = [[{key: v} for v in values] for key, values in spec.grid.items()]
    axes += [[dict(zip(group, row)) for row in zip(*group.values())] for group in spec.zip]
    if spec.seeds:
        axes.append([{spec.seed_key: s} for s in spec.seeds])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def _format(value: Any) -> str:
    if isinstance(value, float):  # the shorter of 0.001 and 1e-3
        mantissa, exponent = f"{value:.3e}".split("e")
        scientific = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return min(f"{value:.4g}", scientific, key=len)
    return str(value)


def label_of(values: dict) -> str:
    """`lr=3e-3,batch=8`: each key's last part (shortened; the whole key where two would read
    alike), then its value."""
    short = {key: SHORT_NAMES.get(key.split(".")[-1], key.split(".")[-1]) for key in values}
    names = list(short.values())
    parts = [f"{short[k] if names.count(short[k]) == 1 else k}={_format(v)}"
             for k, v in values.items()]
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:80]
    return text or "cell"


def _cell_mixture(raw: dict, shares: dict) -> Optional[dict]:
    """The mixture of `data.mixture` with `shares` (source name -> share; 0 drops it)."""
    path = (raw.get("data") or {}).get("mixture")
    if not path:
        if shares:
            raise ConfigError(f"{MIXTURE}{next(iter(shares))} needs data.mixture in the base "
                              f"config or the overrides")
        return None
    mixture = read_yaml(path, "mixture file")
    sources = mixture.get("sources") if isinstance(mixture.get("sources"), list) else []
    names = [s.get("name") for s in sources if isinstance(s, dict)]
    for name, share in shares.items():
        if name not in names:
            raise ConfigError(f"{MIXTURE}{name}: mixture {path} has no source {name} (it has "
                              f"{', '.join(map(str, names))})")
    if shares:
        mixture = copy.deepcopy(mixture)
        mixture["sources"] = [dict(s, share=shares.get(s["name"], s.get("share")))
                              for s in sources if shares.get(s["name"], 1) != 0]
    return mixture


def resolve_cell(spec: SweepSpec, base: dict, values: dict) -> Cell:
    """One cell: the base config with the overrides and `values` set, loaded and checked like
    `phijax train` loads a config; its identity, hash and directory."""
    label = label_of(values)
    settings = {**spec.overrides, **values}
    raw = copy.deepcopy(base)
    shares = {}
    try:
        for key, value in settings.items():
            if key.startswith(MIXTURE):
                shares[key[len(MIXTURE):]] = value
            else:
                set_dotted(raw, key, value)
        mixture = _cell_mixture(raw, shares)
        cfg = load(Config, raw=raw)
        validate(cfg)
        ident = identity(cfg, mixture, spec.command)
    except UserError as e:  # ConfigError, or DataError: a missing store or tokenizer
        raise type(e)(f"cell {label}: {e}") from None
    digest_ = cell_hash(ident)
    cell_dir = as_path(spec.root) / spec.name / f"{label}-{digest_}"
    cfg.run.dir = str(cell_dir)
    if mixture is not None and shares:
        cfg.data.mixture = str(cell_dir / "mixture.yaml")
    return Cell(label, values, cfg, mixture if shares else None, ident, digest_, cell_dir)


def expand(spec: SweepSpec, path: str | Path = "") -> list[Cell]:
    """Every cell of the sweep, each config loaded and checked before anything runs; a
    ConfigError naming the sweep file and the cell otherwise."""
    try:
        base = read_yaml(spec.base, "base config")
        cells = [resolve_cell(spec, base, values) for values in combinations(spec)]
        check_unique(cells)
    except UserError as e:
        raise type(e)(f"sweep {path or spec.name}: {e}") from None
    return cells
