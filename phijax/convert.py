"""Hugging Face `Phi3ForCausalLM` directories <-> phijax run directories, one tensor at a time.

`from_hf(HF_DIR, CKPT)` reads config.json and the safetensors (one `model.safetensors`, or shards
listed in `model.safetensors.index.json`) into a run directory; `to_hf(CKPT, HF_DIR)` writes them
back. Both directions go through `TABLE`, one entry per HF tensor name.

Tensors are read and written with the small safetensors reader/writer below (8-byte little-endian
header length, a JSON header, then raw little-endian data): safetensors' numpy API has no
bfloat16, which ml_dtypes provides. Only one HF tensor is ever held besides the parameters.

Not converted: the tokenizer (HF tokenizer.json vs our sentencepiece model). `sliding_window` is
ignored (phijax attends over the whole document-masked context), with a warning.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np

from phijax.config import Config, MeshConfig, ModelConfig, from_dict, validate
from phijax.sharding import make_mesh
from phijax.weights import abstract_params, load_params, save_params


class Dims(NamedTuple):
    V: int  # vocab
    E: int  # hidden
    F: int  # mlp
    L: int  # layers
    H: int  # query heads
    kv: int  # KV heads
    g: int  # query heads per KV head
    d: int  # head dim


def dims(m: ModelConfig) -> Dims:
    kv = m.num_key_value_heads
    return Dims(m.vocab_size, m.hidden_size, m.intermediate_size, m.num_hidden_layers,
                m.num_attention_heads, kv, m.num_attention_heads // kv, m.dim_per_head)


# ---------------------------------------------------------------- layouts
# to_ours(w, c): one HF (out, in) array -> our arrays (one layer's slice for per-layer tensors);
# to_hf(arrays, c): the inverse.

def _same(w, c):
    return (w,)


def _same_inv(a, c):
    return a[0]


def _t(w, c):
    return (w.T,)


def _t_inv(a, c):
    return a[0].T


def _qkv(w, c):
    # [q heads | k heads | v heads] rows -> (E, kv, g + 2, d); query head h is in group h // g.
    q, kd = c.H * c.d, c.kv * c.d
    parts = [w[:q].reshape(c.kv, c.g, c.d, c.E),
             w[q:q + kd].reshape(c.kv, 1, c.d, c.E), w[q + kd:].reshape(c.kv, 1, c.d, c.E)]
    return (np.concatenate(parts, axis=1).transpose(3, 0, 1, 2),)


def _qkv_inv(a, c):
    t = a[0].transpose(1, 2, 3, 0)  # (kv, g + 2, d, E)
    return np.concatenate([t[:, :c.g].reshape(-1, c.E), t[:, c.g].reshape(-1, c.E),
                           t[:, c.g + 1].reshape(-1, c.E)])


def _o(w, c):
    return (w.T.reshape(c.kv, c.g, c.d, c.E),)  # input index h * d + j, h = k * g + i


def _o_inv(a, c):
    return a[0].reshape(-1, c.E).T


def _gate_up(w, c):
    return (w[:c.F].T, w[c.F:].T)


def _gate_up_inv(a, c):
    return np.concatenate([a[0].T, a[1].T])


# HF name ({i}: layer) -> (our leaves, HF shape, to_ours, to_hf), in HF's module order.
TABLE = {
    "model.embed_tokens.weight": (("embed",), lambda c: (c.V, c.E), _same, _same_inv),
    "model.layers.{i}.input_layernorm.weight":
        (("layers.attn_norm.scale",), lambda c: (c.E,), _same, _same_inv),
    "model.layers.{i}.self_attn.qkv_proj.weight":
        (("layers.attn.qkv",), lambda c: ((c.H + 2 * c.kv) * c.d, c.E), _qkv, _qkv_inv),
    "model.layers.{i}.self_attn.o_proj.weight":
        (("layers.attn.o",), lambda c: (c.E, c.H * c.d), _o, _o_inv),
    "model.layers.{i}.post_attention_layernorm.weight":
        (("layers.mlp_norm.scale",), lambda c: (c.E,), _same, _same_inv),
    "model.layers.{i}.mlp.gate_up_proj.weight":
        (("layers.mlp.gate", "layers.mlp.up"), lambda c: (2 * c.F, c.E), _gate_up, _gate_up_inv),
    "model.layers.{i}.mlp.down_proj.weight":
        (("layers.mlp.down",), lambda c: (c.E, c.F), _t, _t_inv),
    "model.norm.weight": (("final_norm.scale",), lambda c: (c.E,), _same, _same_inv),
    "lm_head.weight": (("lm_head",), lambda c: (c.V, c.E), _t, _t_inv),
}


def hf_names(c: Dims, tied: bool) -> dict[str, tuple[str, int | None]]:
    """Every HF tensor name of a model -> (its TABLE key, layer index or None), in HF's order."""
    top = [k for k in TABLE if "{i}" not in k and not (tied and k == "lm_head.weight")]
    out = {top[0]: (top[0], None)}  # the embedding
    out.update((k.format(i=i), (k, i)) for i in range(c.L) for k in TABLE if "{i}" in k)
    out.update((k, (k, None)) for k in top[1:])
    return out


def _leaf(params, path: str):
    for k in path.split("."):
        params = params[k]
    return params


# ---------------------------------------------------------------- config

# key (rope_parameters.* flattened), default when absent, supported values
SUPPORTED = [
    ("model_type", None, ("phi3",)),
    ("hidden_act", "silu", ("silu",)),
    ("rope_scaling", None, (None,)),
    ("partial_rotary_factor", 1.0, (1.0,)),
    ("rope_parameters.rope_type", "default", ("default",)),
    ("rope_parameters.type", "default", ("default",)),
    ("rope_parameters.partial_rotary_factor", 1.0, (1.0,)),
    ("attention_bias", False, (False,)),
    ("mlp_bias", False, (False,)),
    ("quantization_config", None, (None,)),
]
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")


def model_config(hf: dict) -> ModelConfig:
    """Our model section from an HF Phi3 config.json; ValueError naming an unsupported key."""
    rope = hf.get("rope_parameters") or {}
    flat = {**hf, **{f"rope_parameters.{k}": v for k, v in rope.items()}}
    for key, default, allowed in SUPPORTED:
        value = flat.get(key, default)
        if value not in allowed:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ValueError(f"config.json: {key} = {shown} is not supported "
                             f"(supported: {', '.join(map(repr, allowed))})")
    for key in REQUIRED:
        if key not in hf:
            raise ValueError(f"config.json: missing {key}")
    heads = hf["num_attention_heads"]
    raw = {key: hf[key] for key in REQUIRED}
    raw.update(
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        initializer_range=hf.get("initializer_range", 0.02))
    m = from_dict(ModelConfig, raw, "model")
    window = hf.get("sliding_window")
    if window is not None and window < m.max_position_embeddings:
        warnings.warn(f"config.json: sliding_window {window} is ignored (phijax attends over "
                      "the whole context)", stacklevel=3)
    return m


def hf_config(m: ModelConfig, dtype: str) -> dict:
    """An HF Phi3 config.json for our model section (written for transformers 4.x and 5.x)."""
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_hidden_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads, "head_dim": m.dim_per_head,
        "hidden_act": "silu", "max_position_embeddings": m.max_position_embeddings,
        "original_max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.initializer_range, "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta,
                            "partial_rotary_factor": 1.0},
        "partial_rotary_factor": 1.0, "sliding_window": None,
        "tie_word_embeddings": m.tie_word_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "torch_dtype": dtype, "dtype": dtype,
    }


# ---------------------------------------------------------------- safetensors

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
WRITE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def read_tensor(path: Path, start: int, name: str, info: dict) -> np.ndarray:
    dtype = np.dtype(DTYPES[info["dtype"]])
    count = math.prod(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != count * dtype.itemsize:
        raise ValueError(f"{path}: tensor {name} has {end - begin} bytes, expected "
                         f"{count * dtype.itemsize}")
    return np.fromfile(path, dtype=dtype, count=count, offset=start + begin) \
        .reshape(info["shape"])


def write_safetensors(path: Path, shapes: dict[str, tuple], arrays, dtype: str) -> None:
    """Write tensors `shapes` (name -> shape), taken one at a time from the iterable `arrays`,
    converted to `dtype`; atomically (a temporary file, then a rename)."""
    np_dtype = np.dtype(DTYPES[dtype])
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * np_dtype.itemsize
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for (name, shape), array in zip(shapes.items(), arrays, strict=True):
            array = np.ascontiguousarray(array, dtype=np_dtype)
            assert array.shape == tuple(shape), (name, array.shape, shape)
            array.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _tensor_files(hf_dir: Path) -> dict[str, tuple[Path, int, dict]]:
    """name -> (file, data offset, header entry) over a model's safetensors files."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for file in files:
        start, header = read_header(hf_dir / file)
        for name, info in header.items():
            if name in out:
                raise ValueError(f"{hf_dir}: tensor {name} is in both {out[name][0].name} "
                                 f"and {file}")
            out[name] = (hf_dir / file, start, info)
    return out


# ---------------------------------------------------------------- conversions

def from_hf(hf_dir: str | Path, ckpt: str | Path) -> Path:
    """Convert an HF Phi3ForCausalLM directory into a run directory `ckpt` (float32 params)."""
    hf_dir, ckpt = Path(hf_dir), Path(ckpt)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir}: no config.json (give a Hugging Face model directory)")
    cfg = Config(model=model_config(json.loads((hf_dir / "config.json").read_text())))
    validate(cfg)
    if any((ckpt / "checkpoints").glob("*")):
        raise ValueError(f"{ckpt}: already holds checkpoints; give a new directory")
    c = dims(cfg.model)
    files = _tensor_files(hf_dir)
    if cfg.model.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # HF ties it to the embedding on load, too
    expected = hf_names(c, cfg.model.tie_word_embeddings)
    for name in files:
        if name not in expected:
            raise ValueError(f"{hf_dir}: unexpected tensor {name}")
    for name, (key, _) in expected.items():
        if name not in files:
            raise ValueError(f"{hf_dir}: missing tensor {name}")
        info = files[name][2]
        if tuple(info["shape"]) != TABLE[key][1](c) or info["dtype"] not in DTYPES:
            raise ValueError(f"{hf_dir}: tensor {name} is {info['dtype']} {info['shape']}, "
                             f"expected {list(TABLE[key][1](c))} ({', '.join(DTYPES)})")

    params = jax.tree.map(lambda a: np.empty(a.shape, np.float32), abstract_params(cfg))
    for name, (key, i) in expected.items():
        paths, _, to_ours, _ = TABLE[key]
        w = read_tensor(files[name][0], files[name][1], name, files[name][2])
        for path, value in zip(paths, to_ours(w.astype(np.float32, copy=False), c), strict=True):
            _leaf(params, path)[... if i is None else i] = value
    return save_params(ckpt, cfg, params)


def to_hf(ckpt: str | Path, hf_dir: str | Path, dtype: str = "float32",
          max_shard_gb: float = 5.0) -> Path:
    """Write run directory `ckpt`'s latest params as an HF Phi3ForCausalLM directory."""
    if dtype not in WRITE:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(WRITE)}")
    hf_dir = Path(hf_dir)
    cfg, params = load_params(ckpt, make_mesh(MeshConfig(), jax.devices("cpu")[:1]))
    c = dims(cfg.model)
    names = hf_names(c, cfg.model.tie_word_embeddings)
    itemsize = np.dtype(DTYPES[WRITE[dtype]]).itemsize

    shards, size, limit = [{}], 0, max_shard_gb * 1e9  # greedy, in module order
    for name, (key, _) in names.items():
        shape = TABLE[key][1](c)
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else \
        [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    def tensor(name):
        key, i = names[name]
        paths, _, _, to_hf_fn = TABLE[key]
        leaves = (_leaf(params, p) if i is None else _leaf(params, p)[i] for p in paths)
        return to_hf_fn(tuple(np.asarray(a) for a in leaves), c)

    hf_dir.mkdir(parents=True, exist_ok=True)
    for file, shapes in zip(files, shards):
        write_safetensors(hf_dir / file, shapes, map(tensor, shapes), WRITE[dtype])
    index = hf_dir / "model.safetensors.index.json"
    if n > 1:
        total = sum(math.prod(s) * itemsize for shapes in shards for s in shapes.values())
        _write_json(index, {"metadata": {"total_size": total},
                            "weight_map": {name: file for file, shapes in zip(files, shards)
                                           for name in shapes}})
    stale = [p for p in hf_dir.glob("model*.safetensors*")
             if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", p.name)
             and p.name not in files and not (n > 1 and p == index)]
    for p in stale:  # an earlier conversion's files, which HF would load instead of ours
        p.unlink()
    _write_json(hf_dir / "config.json", hf_config(cfg.model, dtype))
    return hf_dir
