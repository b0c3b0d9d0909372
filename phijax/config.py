"""Typed configuration: dataclasses, one YAML loader with dotted `key=value` overrides, checks.

Every config in phijax and its tools (training, mixtures, pipelines and their stages, PTS, the
judge, evaluation, experiments) is a dataclass loaded by `load` (or `from_dict`): unknown keys,
wrong types, missing required keys and out-of-range values each fail with one line naming the
key, before anything is compiled or sent over the network. A field's range or choices are
declared where the field is (`positive`, `ranged`, `one_of`) and checked by `check_fields`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from phijax.errors import ConfigError  # noqa: F401 - the error every loader raises


# ---------------------------------------------------------------- declaring checks

def ranged(default: Any = dataclasses.MISSING, *, gt=None, ge=None, lt=None, le=None) -> Any:
    """A dataclass field whose value (when not None) must lie in the given bounds."""
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    return field(default=default, metadata={"bounds": bounds})


def positive(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that must be > 0 (when not None)."""
    return ranged(default, gt=0)


def one_of(*choices: Any) -> Any:
    """A dataclass field whose value must be one of `choices`; the first is the default."""
    return field(default=choices[0], metadata={"choices": choices})


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds_error(key: str, value, bounds: dict) -> str | None:
    lo = ("gt", bounds["gt"]) if "gt" in bounds else ("ge", bounds["ge"]) if "ge" in bounds else None
    hi = ("lt", bounds["lt"]) if "lt" in bounds else ("le", bounds["le"]) if "le" in bounds else None
    tests = {"gt": lambda b: value > b, "ge": lambda b: value >= b,
             "lt": lambda b: value < b, "le": lambda b: value <= b}
    if all(tests[op](b) for op, b in filter(None, (lo, hi))):
        return None
    if lo and hi:
        text = f"in {'(' if lo[0] == 'gt' else '['}{_num(lo[1])}, {_num(hi[1])}{')' if hi[0] == 'lt' else ']'}"
    elif lo == ("gt", 0):
        text = "positive"
    else:
        op, b = lo or hi
        text = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[op] + f" {_num(b)}"
    return f"{key} must be {text}, got {value}"


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every declared range and choice of a dataclass instance, recursively."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        bounds = f.metadata.get("bounds")
        if bounds and value is not None:
            error = _bounds_error(key, value, bounds)
            if error:
                raise ConfigError(error)
        if dataclasses.is_dataclass(value):
            check_fields(value, key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_fields(item, f"{key}[{i}]")


# ---------------------------------------------------------------- loading

_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "a mapping"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _NAMES.get(origin or tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:
            return _coerce(value, sections[0], key)  # its own error names the bad key inside
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, key)
    if origin is list or tp is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and \
                not dataclasses.is_dataclass(inner):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 3e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a mapping, every value coerced to its field's type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {full}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: required")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """raw[a][b]... = value for `a.b...`; a number part indexes a list (`stages.0.n`)."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"override {dotted}: {part} is not an index of "
                                  f"{'.'.join(parts[:i])} (0..{len(node) - 1})")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's booleans, true and false only: YAML 1.1 also reads on/off/yes/no as
    booleans, and `run.distributed: on` would not be the choice `on`."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key=value` strings -> (key, value), values parsed as YAML (`3e-4`, `[a, b]`, `true`)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=20")
        key, text = item.split("=", 1)
        try:
            value = parse_yaml(text) if text else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """The mapping in a YAML file or object (a gs:// or s3:// URL; empty: {}); one-line errors
    naming the file."""
    if "://" in str(path):
        from phijax.paths import as_path
        path = as_path(path)
    else:
        path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys, got {type(raw).__name__}")
    return raw


def load(cls: type, path: str | Path | None = None, overrides: list[str] = (), *,
         raw: Optional[dict] = None, what: str = "config file") -> Any:
    """Dataclass `cls` from a YAML file (and/or a `raw` mapping) plus dotted overrides, checked."""
    raw = copy.deepcopy(raw) if raw is not None else read_yaml(path, what) if path else {}
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    obj = from_dict(cls, raw, "")
    check_fields(obj)
    return obj


# ---------------------------------------------------------------- the training config

@dataclass
class ModelConfig:
    # Field names follow Hugging Face `Phi3Config`.
    vocab_size: int = positive(512)
    hidden_size: int = positive(64)
    intermediate_size: int = positive(192)
    num_hidden_layers: int = positive(2)
    num_attention_heads: int = positive(4)
    num_key_value_heads: int = positive(2)
    head_dim: Optional[int] = positive(None)  # default: hidden_size // num_attention_heads
    rope_theta: float = positive(10000.0)
    rms_norm_eps: float = positive(1e-5)
    max_position_embeddings: int = positive(4096)
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = one_of("float32", "bfloat16")  # compute dtype; params are float32
    remat: str = one_of("none", "full", "dots", "dots_no_batch")
    scan_layers: bool = True
    # cudnn: GPU + bfloat16 only; splash: the Pallas TPU kernel, TPU only; xla elsewhere
    attention: str = one_of("xla", "cudnn", "splash")
    splash_interpret: bool = False  # splash in the Pallas interpreter, any backend (slow: tests)
    # Sequence positions whose float32 logits the loss holds at once: (batch, loss_chunk, vocab)
    # instead of (batch, seq_len, vocab), recomputed in the backward pass. null: all at once.
    loss_chunk: Optional[int] = positive(1024)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class MeshConfig:
    data: int = positive(1)
    fsdp: int = positive(1)
    tensor: int = positive(1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclass
class OptimizerConfig:
    learning_rate: float = positive(3e-4)
    warmup_steps: int = ranged(10, ge=0)
    decay_steps: Optional[int] = positive(None)  # default: train.steps - warmup_steps
    end_learning_rate_ratio: float = ranged(0.1, ge=0, le=1)  # floor of the decay, x peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = positive(1e-8)
    weight_decay: float = ranged(0.1, ge=0)
    decay_norms_and_embeddings: bool = False
    grad_clip_norm: float = ranged(1.0, ge=0)
    z_loss: float = ranged(0.0, ge=0)


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=lambda: ["builtin:python-docs"])
    mixture: Optional[str] = None  # mixture YAML (sources with shares); replaces `corpus`
    text_field: str = "text"
    tokenizer: Optional[str] = None  # .model or tokenizer.json; trained from corpus when unset
    tokenizer_vocab_size: int = positive(512)
    tokenizer_multiple: int = positive(128)  # pad the trained vocabulary to a multiple of this
    cache_dir: str = "~/.cache/phijax"
    seq_len: int = positive(64)
    document_mask: bool = True
    packing: str = one_of("windows", "documents")  # documents: whole (SFT)
    eval_fraction: float = ranged(0.02, ge=0, lt=1)
    seed: int = 0
    prefetch: int = 2
    synthetic: bool = False  # random tokens instead of a corpus (benchmarks only)


@dataclass
class TrainConfig:
    steps: int = positive(100)
    batch_size: int = positive(8)  # global batch, in sequences
    microbatches: int = positive(1)
    seed: int = 0
    log_every: int = positive(10)
    eval_every: int = positive(50)
    eval_batches: int = 2
    # Benchmark tasks of `phijax eval` scored at each eval step (phijax.train.eval_tasks): each
    # task's file is eval_paths[task], else eval_data_dir/<its default file>.
    eval_tasks: list[str] = field(default_factory=list)
    eval_data_dir: Optional[str] = None
    eval_paths: dict = field(default_factory=dict)  # task -> data file
    eval_limit: Optional[int] = positive(None)  # the first N items of each task
    eval_max_new_tokens: Optional[int] = positive(None)  # default: each task's own
    peak_flops_per_device: Optional[float] = None  # FLOP/s; measured on CPU when unset
    # A step whose loss or gradient norm is not finite is never applied; `stop` ends the run
    # (exit status 1) with the last good checkpoint intact, `skip` goes on and counts it.
    on_nonfinite: str = one_of("stop", "skip")


@dataclass
class CheckpointConfig:
    every: int = positive(50)
    keep: int = positive(3)
    async_save: bool = True


@dataclass
class DPOConfig:
    pairs: Optional[str] = None  # JSONL: prompt_ids, chosen_ids, rejected_ids (token ids)
    reference: Optional[str] = None  # run directory of the reference model; default run.init_from
    beta: float = positive(0.1)
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)  # conservative DPO: P(label flipped)
    loss: str = one_of("sigmoid", "ipo")
    rpo_alpha: float = ranged(0.0, ge=0)  # + alpha * NLL of chosen per token (RPO)


@dataclass
class RunConfig:
    dir: str = "runs/default"  # a local path, or a gs:// or s3:// URL (see phijax/paths.py)
    # auto: start multi-process JAX where the environment shows several processes (SLURM, Open
    # MPI, TPU slices, Kubernetes indexed Jobs, JAX_COORDINATOR_ADDRESS); on: always; off: never
    distributed: str = one_of("auto", "on", "off")
    distributed_timeout: int = positive(300)  # seconds every process waits for the others at start
    init_from: Optional[str] = None  # run directory whose latest params start a new run (SFT, DPO)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = load(Config, path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config, device_count: Optional[int] = None) -> None:
    """Every field's range, then the checks across fields; `device_count` adds the checks that
    depend on the machine."""
    check_fields(cfg)
    from phijax.paths import as_path
    for key in ("dir", "init_from"):
        try:
            as_path(getattr(cfg.run, key) or ".")
        except ConfigError as e:
            raise ConfigError(f"run.{key}: {e}") from None
    m = cfg.model
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size {m.hidden_size} is not divisible by "
                          f"model.num_attention_heads {m.num_attention_heads}")
    if m.dim_per_head % 2:
        raise ConfigError(f"model.head_dim must be even for RoPE, got {m.dim_per_head}")
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(f"model.num_attention_heads {m.num_attention_heads} is not divisible by "
                          f"model.num_key_value_heads {m.num_key_value_heads}")
    if m.num_attention_heads % cfg.mesh.tensor:
        raise ConfigError(f"model.num_attention_heads {m.num_attention_heads} is not divisible by "
                          f"mesh.tensor {cfg.mesh.tensor}")
    if cfg.data.seq_len > m.max_position_embeddings:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds model.max_position_embeddings "
                          f"{m.max_position_embeddings}")
    t = cfg.train
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by "
                          f"train.microbatches {t.microbatches}")
    dp = cfg.mesh.data * cfg.mesh.fsdp
    if (t.batch_size // t.microbatches) % dp:
        raise ConfigError(f"train.batch_size {t.batch_size} (per microbatch "
                          f"{t.batch_size // t.microbatches}) is not divisible by the data-parallel "
                          f"size mesh.data*mesh.fsdp = {dp}")
    if device_count is not None and math.prod(cfg.mesh.shape) != device_count:
        raise ConfigError(f"mesh data*fsdp*tensor = {'*'.join(map(str, cfg.mesh.shape))} = "
                          f"{math.prod(cfg.mesh.shape)} does not match the {device_count} available devices")
