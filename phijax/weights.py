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

from phijax import paths
from phijax.config import Config, from_dict, to_dict
from phijax.errors import ConfigError, DataError
from phijax.model import abstract_model
from phijax.sharding import named, param_specs


def load_config(run_dir: str | Path) -> Config:
    path = paths.as_path(run_dir) / "config.yaml"
    if not paths.is_url(run_dir) and Path(run_dir).is_file():
        raise ConfigError(f"checkpoint {run_dir} is a file; give a run directory (config.yaml, "
                          f"checkpoints/)")
    if not paths.exists(path):
        raise ConfigError(f"checkpoint {run_dir}: no config.yaml (give a run directory)")
    return from_dict(Config, yaml.safe_load(paths.read_text(path)) or {}, "")


def checkpoint_manager(directory: str | Path, **options) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over `directory`, a local path or a gs:// or s3:// URL, with
    `options` (CheckpointManagerOptions' fields). Orbax writes gs:// through TensorStore's gcs
    driver itself; for s3:// the TensorStore specs it builds are pointed at the s3 driver (see
    `_route_s3_to_tensorstore`) and a step is finalized by a commit file rather than a rename
    (which a bucket does not have), as Orbax does on GCS."""
    directory = paths.absolute(directory)
    if str(directory).startswith("s3://"):
        _route_s3_to_tensorstore()
        options.setdefault("atomicity_options", ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE))
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options))


def _route_s3_to_tensorstore() -> None:
    """Orbax (0.12) sends only gs:// paths to TensorStore's cloud drivers; an s3:// path would
    go to the file driver (a local `s3:` folder). Wrap its one spec builder: an s3:// directory
    gets the spec of the same path on gs://, with each gcs kvstore swapped for the s3 one of
    `paths.kvstore` (endpoint, region and credentials from the environment)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    build = ts_utils.build_kvstore_tspec
    if getattr(build, "phijax_s3", False):
        return

    def swap(spec):
        if isinstance(spec, dict) and spec.get("driver") == "gcs":
            return paths.kvstore(f"s3://{spec['bucket']}/{spec['path']}")
        if isinstance(spec, dict):
            return {k: swap(v) for k, v in spec.items()}
        return [swap(v) for v in spec] if isinstance(spec, list) else spec

    def build_with_s3(directory, *args, **kwargs):
        if str(directory).startswith("s3://"):
            return swap(build("gs://" + str(directory)[len("s3://"):], *args, **kwargs))
        return build(directory, *args, **kwargs)

    build_with_s3.phijax_s3 = True
    ts_utils.build_kvstore_tspec = build_with_s3


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
    steps = [int(name) for name in paths.listdir(paths.as_path(run_dir) / "checkpoints")
             if name.isdigit()]
    if not steps:
        raise ConfigError(f"checkpoint {run_dir}: no saved step under checkpoints/")
    return max(steps)


def load_params(run_dir: str | Path, mesh: jax.sharding.Mesh, step: int | None = None):
    """(config, params) of a run directory's latest (or given) step."""
    run_dir = paths.absolute(run_dir)
    cfg = load_config(run_dir)
    step = latest_step(run_dir) if step is None else step
    target = abstract_params(cfg, mesh)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
    absl = logging.getLogger("absl")
    level, _ = absl.level, absl.setLevel(logging.ERROR)  # "directory is read only": we asked
    with checkpoint_manager(run_dir / "checkpoints", read_only=True, create=False,
                            save_interval_steps=0) as manager:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args},
            partial_restore=True)))
    absl.setLevel(level)
    return cfg, out.state["params"]


def save_params(run_dir: str | Path, cfg: Config, params, step: int = 0) -> Path:
    """Write a run directory holding just `params` at `step` (e.g. converted weights)."""
    run_dir = paths.absolute(run_dir)
    if not paths.is_url(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    paths.write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    with checkpoint_manager(run_dir / "checkpoints") as manager:
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

    run_dir = paths.as_path(run_dir)
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
