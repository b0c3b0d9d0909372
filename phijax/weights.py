"""Model weights of a run directory: what `sample`, `serve` and `convert` read and write.

A checkpoint (CKPT) is a run directory: `config.yaml` (the model section is what matters here),
its tokenizer when the run trained on text or was converted with one (`tokenizer.model`, or
`tokenizer.json` + `tokenizer_config.json`; see phijax.data.tokenizer), and Orbax steps under
`checkpoints/`. Only the parameters are restored (partial restore: the optimizer moments are
never read), as float32, sharded on `mesh` by the model's logical axis rules.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from phijax.config import Config, from_dict, to_dict
from phijax.errors import ConfigError, DataError
from phijax.files import atomic_write
from phijax.model import abstract_model
from phijax.sharding import named, param_specs


def load_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if Path(run_dir).is_file():
        raise ConfigError(f"checkpoint {run_dir} is a file; give a run directory (config.yaml, "
                          f"checkpoints/)")
    if not path.is_file():
        raise ConfigError(f"checkpoint {run_dir}: no config.yaml (give a run directory)")
    return from_dict(Config, yaml.safe_load(path.read_text()) or {}, "")


def abstract_params(cfg: Config, mesh: jax.sharding.Mesh | None = None):
    """Shape/dtype (and sharding, given a mesh) of every parameter, as a pure dict."""
    state = nnx.state(abstract_model(cfg.model))
    abstract = nnx.to_pure_dict(state)
    if mesh is None:
        return abstract
    shardings = named(param_specs(state, mesh), mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def latest_step(run_dir: str | Path) -> int:
    steps = [int(p.name) for p in (Path(run_dir) / "checkpoints").glob("*") if p.name.isdigit()]
    if not steps:
        raise ConfigError(f"checkpoint {run_dir}: no saved step under checkpoints/")
    return max(steps)


def load_params(run_dir: str | Path, mesh: jax.sharding.Mesh, step: int | None = None):
    """(config, params) of a run directory's latest (or given) step."""
    run_dir = Path(run_dir).absolute()
    cfg = load_config(run_dir)
    step = latest_step(run_dir) if step is None else step
    target = abstract_params(cfg, mesh)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
    absl = logging.getLogger("absl")
    level, _ = absl.level, absl.setLevel(logging.ERROR)  # "directory is read only": we asked
    with ocp.CheckpointManager(run_dir / "checkpoints",
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True, create=False, save_interval_steps=0)) as manager:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args},
            partial_restore=True)))
    absl.setLevel(level)
    return cfg, out.state["params"]


def save_params(run_dir: str | Path, cfg: Config, params, step: int = 0) -> Path:
    """Write a run directory holding just `params` at `step` (e.g. converted weights)."""
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}),
            data=ocp.args.JsonSave({"step": step})))
        manager.wait_until_finished()
    return run_dir


def load_checkpoint(run_dir: str | Path, mesh: jax.sharding.Mesh | None = None,
                    need_tokenizer: bool = True):
    """(config, params, tokenizer, mesh) of a run directory's latest step, on `mesh` (default:
    the run's own mesh when this machine has its devices, else one device). The tokenizer is
    the run directory's own (`find_tokenizer`); a run directory without one is a DataError, or
    gives None when not `need_tokenizer` (prompts given as token ids)."""
    from phijax.config import MeshConfig
    from phijax.data.tokenizer import find_tokenizer, load_tokenizer
    from phijax.sharding import make_mesh

    run_dir = Path(run_dir)
    saved = load_config(run_dir)
    found = find_tokenizer(run_dir)
    if found is None and need_tokenizer:
        raise DataError(f"checkpoint {run_dir}: no tokenizer.model or tokenizer.json (runs "
                        f"trained on text have one; give prompts as token ids)")
    tokenizer = None if found is None else load_tokenizer(found)
    if mesh is None:
        shape = saved.mesh
        mesh = make_mesh(shape) if math.prod(shape.shape) == jax.device_count() else \
            make_mesh(MeshConfig(), jax.devices()[:1])
    cfg, params = load_params(run_dir, mesh)
    return cfg, params, tokenizer, mesh
