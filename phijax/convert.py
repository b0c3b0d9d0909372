"""Hugging Face `Phi3ForCausalLM` directories <-> phijax run directories.

`from_hf(HF_DIR, CKPT)` reads config.json and the safetensors (one `model.safetensors`, or shards
listed in `model.safetensors.index.json`) into a run directory; `to_hf(CKPT, HF_DIR)` writes them
back. Both directions go through `TABLE`, one entry per HF tensor name.

Tensors are read with the `safetensors` library one at a time (`safe_open`, numpy arrays; BF16
arrives as ml_dtypes' bfloat16), so reading holds one HF tensor besides the parameters. Writing
serializes one shard at a time: the library writes a file from arrays in memory, so a shard's
tensors (up to `max_shard_gb`) are held together while it is written. Each shard appears whole
or not at all.

The tokenizer travels too. `from_hf` copies the HF directory's tokenizer.json,
tokenizer_config.json (chat template, specials), special_tokens_map.json, chat_template.jinja and
generation_config.json into the run directory, so the checkpoint samples and serves text at once.
`to_hf` writes the run's tokenizer files back: a Hugging Face tokenizer's own files, or a
sentencepiece tokenizer exported as a tokenizer.json that encodes to the same ids (see
phijax/data/tokenizer_sp.py), with a tokenizer_config.json that `AutoTokenizer` loads as it is
(`PreTrainedTokenizerFast`); bos/eos/pad ids go into config.json, generation_config.json (whose
eos_token_id lists every id that ends a reply) and tokenizer_config.json.

`sliding_window` is ignored (phijax attends over the whole document-masked context), with a
warning.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import ml_dtypes  # registers bfloat16 with numpy, which safetensors' numpy reader relies on
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from phijax import paths
from phijax.config import Config, MeshConfig, ModelConfig, from_dict, validate
from phijax.data.tokenizer import (HF_FILE, RUN_FILES, Tokenizer, find_tokenizer, load_tokenizer,
                                   save_tokenizer)
from phijax.errors import ConfigError, DataError
from phijax.files import atomic_write, replacing
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
            raise DataError(f"config.json: {key} = {shown} is not supported "
                             f"(supported: {', '.join(map(repr, allowed))})")
    for key in REQUIRED:
        if key not in hf:
            raise DataError(f"config.json: missing {key}")
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


def hf_config(m: ModelConfig, dtype: str, ids: dict | None = None) -> dict:
    """An HF Phi3 config.json for our model section (written for transformers 4.x and 5.x);
    `ids`: bos_token_id, eos_token_id, pad_token_id (see `special_ids`)."""
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
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(ids or {}),
        "torch_dtype": dtype, "dtype": dtype,
    }


# ---------------------------------------------------------------- safetensors

READ_DTYPES = ("F32", "F16", "BF16", "F64")  # HF tensor dtypes from_hf accepts
WRITE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _open(path: Path, stack: contextlib.ExitStack):
    """A `safe_open` handle on `path`, closed with `stack`; ValueError if it is not
    safetensors."""
    try:
        return stack.enter_context(safe_open(path, framework="numpy"))
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None


def _tensor_files(hf_dir: Path, stack: contextlib.ExitStack) -> dict[str, tuple[Path, object]]:
    """name -> (file, its open handle) over a model's safetensors files."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise DataError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for file in files:
        handle = _open(hf_dir / file, stack)
        for name in handle.keys():
            if name in out:
                raise DataError(f"{hf_dir}: tensor {name} is in both {out[name][0].name} "
                                 f"and {file}")
            out[name] = (hf_dir / file, handle)
    return out


def _check_tensors(hf_dir: Path, files: dict, expected: dict, c: Dims) -> None:
    """Every expected tensor is there with its shape and a readable dtype, and nothing else."""
    for name in files:
        if name not in expected:
            raise DataError(f"{hf_dir}: unexpected tensor {name}")
    for name, (key, _) in expected.items():
        if name not in files:
            raise DataError(f"{hf_dir}: missing tensor {name}")
        info = files[name][1].get_slice(name)
        dtype, shape = info.get_dtype(), list(info.get_shape())
        if tuple(shape) != TABLE[key][1](c) or dtype not in READ_DTYPES:
            raise DataError(f"{hf_dir}: tensor {name} is {dtype} {shape}, "
                             f"expected {list(TABLE[key][1](c))} ({', '.join(READ_DTYPES)})")


def _read(path: Path, handle, name: str) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path}: tensor {name}: {e}") from None


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """One safetensors file of `arrays` (all held in memory), appearing whole or not at all."""
    with replacing(path) as tmp:
        save_file(arrays, tmp, metadata={"format": "pt"})


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- tokenizer files

GENERATION_CONFIG = "generation_config.json"


def _source_tokenizer(hf_dir: Path, m: ModelConfig) -> Tokenizer | None:
    """The tokenizer of an HF directory (its tokenizer.json), or None with a warning."""
    if not (hf_dir / HF_FILE).is_file():
        warnings.warn(f"{hf_dir}: no {HF_FILE}, so the checkpoint has no tokenizer (sample it "
                      f"with --prompt-ids)", stacklevel=3)
        return None
    tokenizer = load_tokenizer(hf_dir / HF_FILE)
    if tokenizer.vocab_size > m.vocab_size:
        raise DataError(f"{hf_dir / HF_FILE}: {tokenizer.vocab_size} tokens, more than "
                        f"config.json's vocab_size {m.vocab_size}")
    return tokenizer


def special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    """bos_token_id, eos_token_id, pad_token_id of the tokens `tokenizer` exports as bos, eos
    and pad (all None without a tokenizer)."""
    names = tokenizer.hf_specials() if tokenizer else {}
    return {f"{k}_id": tokenizer.piece_id(names[k]) if names.get(k) else None
            for k in ("bos_token", "eos_token", "pad_token")}


def _generation_config(ckpt: Path, tokenizer: Tokenizer | None) -> dict | None:
    """The run's generation_config.json (from_hf copied it), with the tokenizer's ids where it
    has none: eos_token_id lists the exported eos and every stop id."""
    path = ckpt / GENERATION_CONFIG
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    if tokenizer is None:
        return config
    config = config or {}
    ids = special_ids(tokenizer)
    ids["eos_token_id"] = list(dict.fromkeys(
        i for i in (ids["eos_token_id"], *tokenizer.stop_ids) if i is not None))
    for key, value in ids.items():
        if config.get(key) is None:
            config[key] = value
    return config


def _run_tokenizer(ckpt: Path, hf_dir: Path) -> Tokenizer | None:
    """The run directory's tokenizer, or None with a warning."""
    found = find_tokenizer(ckpt)
    if found is None:
        warnings.warn(f"checkpoint {ckpt}: no tokenizer, so {hf_dir} gets none", stacklevel=3)
    return load_tokenizer(found) if found else None


def _write_tokenizer(tokenizer: Tokenizer | None, ckpt: Path, hf_dir: Path, m: ModelConfig,
                     dtype: str) -> None:
    """The tokenizer's files, config.json and generation_config.json into `hf_dir`; an
    earlier conversion's tokenizer files that these do not replace are removed."""
    files = tokenizer.hf_files() if tokenizer else {}
    generation = _generation_config(ckpt, tokenizer)
    if generation is not None:
        files[GENERATION_CONFIG] = (json.dumps(generation, indent=2) + "\n").encode()
    for name, data in files.items():
        atomic_write(hf_dir / name, data)
    for name in (*RUN_FILES, GENERATION_CONFIG):
        if name not in files:
            (hf_dir / name).unlink(missing_ok=True)
    _write_json(hf_dir / "config.json", hf_config(m, dtype, special_ids(tokenizer)))


# ---------------------------------------------------------------- conversions

def from_hf(hf_dir: str | Path, ckpt: str | Path) -> Path:
    """Convert an HF Phi3ForCausalLM directory into a run directory `ckpt` (float32 params),
    with its tokenizer and generation_config.json."""
    if paths.is_url(hf_dir):
        if not paths.exists(f"{str(hf_dir).rstrip('/')}/config.json"):
            raise ConfigError(f"{hf_dir}: no config.json (give a Hugging Face model directory)")
        hf_dir = paths.download_tree(hf_dir)
    hf_dir, ckpt = Path(hf_dir), paths.absolute(ckpt)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir}: no config.json (give a Hugging Face model directory)")
    cfg = Config(model=model_config(json.loads((hf_dir / "config.json").read_text())))
    validate(cfg)
    if any((ckpt / "checkpoints").glob("*")):
        raise ConfigError(f"{ckpt}: already holds checkpoints; give a new directory")
    tokenizer = _source_tokenizer(hf_dir, cfg.model)
    c = dims(cfg.model)
    expected = hf_names(c, cfg.model.tie_word_embeddings)
    params = jax.tree.map(lambda a: np.empty(a.shape, np.float32), abstract_params(cfg))
    with contextlib.ExitStack() as stack:
        files = _tensor_files(hf_dir, stack)
        if cfg.model.tie_word_embeddings:
            files.pop("lm_head.weight", None)  # HF ties it to the embedding on load, too
        _check_tensors(hf_dir, files, expected, c)
        for name, (key, i) in expected.items():
            leaf_paths, _, to_ours, _ = TABLE[key]
            w = _read(*files[name], name).astype(np.float32, copy=False)
            for path, value in zip(leaf_paths, to_ours(w, c), strict=True):
                _leaf(params, path)[... if i is None else i] = value
    save_params(ckpt, cfg, params)
    if tokenizer is not None:
        save_tokenizer(tokenizer, ckpt)
    if (hf_dir / GENERATION_CONFIG).is_file():
        paths.write_bytes(ckpt / GENERATION_CONFIG, (hf_dir / GENERATION_CONFIG).read_bytes())
    return ckpt


def _shards(names: dict, c: Dims, itemsize: int, limit: float) -> dict[str, dict[str, tuple]]:
    """file name -> {tensor name: shape}: greedy in module order, each under `limit` bytes
    unless one tensor alone is larger."""
    shards, size = [{}], 0
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
    return dict(zip(files, shards))


def _remove_stale(hf_dir: Path, keep: set[str]) -> None:
    """Remove an earlier conversion's weight files, which HF would load instead of ours."""
    for p in hf_dir.glob("model*.safetensors*"):
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", p.name) \
                and p.name not in keep:
            p.unlink()


def to_hf(ckpt: str | Path, hf_dir: str | Path, dtype: str = "float32",
          max_shard_gb: float = 5.0) -> Path:
    """Write run directory `ckpt`'s latest params as an HF Phi3ForCausalLM directory, one
    shard in memory at a time, with its tokenizer files."""
    if dtype not in WRITE_DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(WRITE_DTYPES)}")
    if paths.is_url(hf_dir):  # written here, then uploaded
        paths.check_writable(hf_dir, "convert to-hf:")
        local = to_hf(ckpt, tempfile.mkdtemp(prefix="phijax-hf-"), dtype, max_shard_gb)
        fresh = {p.name for p in local.iterdir()}
        for name in paths.listdir(hf_dir):  # an earlier conversion's files that these replace
            if name not in fresh and (name in (*RUN_FILES, GENERATION_CONFIG) or re.fullmatch(
                    r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name)):
                paths.remove(f"{str(hf_dir).rstrip('/')}/{name}")
        paths.upload_tree(local, hf_dir)
        return hf_dir
    hf_dir, np_dtype = Path(hf_dir), np.dtype(WRITE_DTYPES[dtype])
    ckpt = paths.as_path(ckpt)
    tokenizer = _run_tokenizer(ckpt, hf_dir)
    cfg, params = load_params(ckpt, make_mesh(MeshConfig(), jax.devices("cpu")[:1]))
    c = dims(cfg.model)
    names = hf_names(c, cfg.model.tie_word_embeddings)
    shards = _shards(names, c, np_dtype.itemsize, max_shard_gb * 1e9)
    shapes_of = {name: shape for shapes in shards.values() for name, shape in shapes.items()}

    def tensor(name):
        key, i = names[name]
        leaf_paths, _, _, to_hf_fn = TABLE[key]
        leaves = (_leaf(params, p) if i is None else _leaf(params, p)[i] for p in leaf_paths)
        array = np.ascontiguousarray(to_hf_fn(tuple(np.asarray(a) for a in leaves), c),
                                     dtype=np_dtype)
        assert array.shape == shapes_of[name], (name, array.shape, shapes_of[name])
        return array

    hf_dir.mkdir(parents=True, exist_ok=True)
    for file, shapes in shards.items():
        _write_shard(hf_dir / file, {name: tensor(name) for name in shapes})
    keep = set(shards)
    if len(shards) > 1:
        keep.add("model.safetensors.index.json")
        total = sum(math.prod(s) * np_dtype.itemsize for s in shapes_of.values())
        _write_json(hf_dir / "model.safetensors.index.json", {
            "metadata": {"total_size": total},
            "weight_map": {name: file for file, shapes in shards.items() for name in shapes}})
    _remove_stale(hf_dir, keep)
    _write_tokenizer(tokenizer, ckpt, hf_dir, cfg.model, dtype)
    return hf_dir
