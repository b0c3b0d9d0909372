"""Typed run configuration: dataclasses, YAML loading, dotted CLI overrides, validation.

Every check here runs before anything is compiled and fails with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key."""


@dataclass
class ModelConfig:
    # Field names follow Hugging Face `Phi3Config`.
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # default: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: str = "none"  # none | full | dots | dots_no_batch
    scan_layers: bool = True
    attention: str = "xla"  # xla | cudnn (GPU + bfloat16 only; xla elsewhere)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclass
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    decay_steps: Optional[int] = None  # default: train.steps - warmup_steps
    end_learning_rate_ratio: float = 0.1  # floor of the linear decay, as a fraction of peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    grad_clip_norm: float = 1.0
    z_loss: float = 0.0


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=lambda: ["builtin:python-docs"])
    mixture: Optional[str] = None  # mixture YAML (sources with shares); replaces `corpus`
    text_field: str = "text"
    tokenizer: Optional[str] = None  # sentencepiece .model; trained from corpus when unset
    tokenizer_vocab_size: int = 512
    tokenizer_multiple: int = 128  # pad the trained vocabulary to a multiple of this
    cache_dir: str = "~/.cache/phijax"
    seq_len: int = 64
    document_mask: bool = True
    packing: str = "windows"  # windows: fixed cuts of the token stream; documents: whole (SFT)
    eval_fraction: float = 0.02
    seed: int = 0
    prefetch: int = 2
    synthetic: bool = False  # random tokens instead of a corpus (benchmarks only)


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global batch, in sequences
    microbatches: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 2
    peak_flops_per_device: Optional[float] = None  # FLOP/s; measured on CPU when unset


@dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 3
    async_save: bool = True


@dataclass
class DPOConfig:
    pairs: Optional[str] = None  # JSONL: prompt_ids, chosen_ids, rejected_ids (token ids)
    reference: Optional[str] = None  # run directory of the reference model; default run.init_from
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: the chance a label is flipped
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    rpo_alpha: float = 0.0  # + alpha * NLL of chosen per token (RPO: holds chosen log-probs up)


@dataclass
class RunConfig:
    dir: str = "runs/default"
    distributed: str = "auto"  # auto | on | off
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


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention": ("xla", "cudnn"),
    "run.distributed": ("auto", "on", "off"),
    "data.packing": ("windows", "documents"),
    "dpo.loss": ("sigmoid", "ipo"),
}


# ---------------------------------------------------------------- loading

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
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
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {full}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=20")
        key, text = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(text) if text else ""))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"config file {path}: invalid YAML: {first}") from None
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    cfg = from_dict(Config, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- validation

def validate(cfg: Config, device_count: Optional[int] = None) -> None:
    """Static checks; `device_count` adds the checks that depend on the machine."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    positive = {
        "model": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "rope_theta", "rms_norm_eps"],
        "mesh": ["data", "fsdp", "tensor"],
        "train": ["steps", "batch_size", "microbatches", "log_every", "eval_every"],
        "data": ["seq_len", "tokenizer_vocab_size", "tokenizer_multiple"],
        "checkpoint": ["every", "keep"],
        "optimizer": ["learning_rate", "eps"],
    }
    for section, names in positive.items():
        for name in names:
            value = getattr(getattr(cfg, section), name)
            if value <= 0:
                raise ConfigError(f"{section}.{name} must be positive, got {value}")
    m = cfg.model
    if m.head_dim is not None and m.head_dim <= 0:
        raise ConfigError(f"model.head_dim must be positive, got {m.head_dim}")
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
    o = cfg.optimizer
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip_norm < 0 or o.z_loss < 0:
        raise ConfigError("optimizer.warmup_steps, weight_decay, grad_clip_norm and z_loss must be >= 0")
    if not 0.0 <= o.end_learning_rate_ratio <= 1.0:
        raise ConfigError(f"optimizer.end_learning_rate_ratio must be in [0, 1], got {o.end_learning_rate_ratio}")
    if cfg.dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be positive, got {cfg.dpo.beta}")
    if cfg.dpo.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha must be >= 0, got {cfg.dpo.rpo_alpha}")
    if not 0.0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {cfg.dpo.label_smoothing}")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
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
