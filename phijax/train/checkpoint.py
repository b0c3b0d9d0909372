"""Orbax checkpoints: async saves, keep-N, atomic finalize, data state saved beside the model.

Restores go through an abstract target whose shardings come from the current mesh, so a run
saved on 8 devices resumes on 1 and back. A checkpoint that cannot be read is set aside and the
one before it resumed; a run directory whose checkpoints hold another model's state is refused
before anything is written or compiled.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from phijax import paths
from phijax.config import CheckpointConfig, Config, from_dict, to_dict
from phijax.errors import ConfigError, DataError
from phijax.weights import checkpoint_manager

log = logging.getLogger("phijax")


def _brief(e: BaseException, limit: int = 160) -> str:
    """The exception as one short line (orbax's and tensorstore's run to pages)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _DropUnretrievedReadFailures(logging.Filter):
    """asyncio's "exception was never retrieved" reports of tensorstore reads (their errors
    carry the tensorstore spec)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and "exception was never retrieved" in record.getMessage()
                    and "tensorstore_spec=" in str(exc))


def _quiet_failed_reads() -> Callable[[], None]:
    """When one read of a restore fails, orbax stops waiting for the others and closes its event
    loop while tensorstore's other reads still complete, then and later: their callbacks report
    "Event loop is closed" tracebacks as unraisable exceptions, and asyncio logs the reads that
    failed too as exceptions never retrieved. Those say nothing the one failure does not: from
    here on, drop them, and only them. Returns what undoes this (for a restore that read)."""
    previous = sys.unraisablehook
    asyncio_log = logging.getLogger("asyncio")
    if getattr(previous, "drops_loop_closed", False):
        return lambda: None

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_loop_closed = True
    sys.unraisablehook = hook
    drop = _DropUnretrievedReadFailures()
    asyncio_log.addFilter(drop)

    def undo() -> None:
        sys.unraisablehook = previous
        asyncio_log.removeFilter(drop)
    return undo


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = paths.absolute(directory)
        self.manager = checkpoint_manager(self.directory, max_to_keep=cfg.keep, create=True,
                                          enable_async_checkpointing=cfg.async_save)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, out.data

    def restore_latest(self, abstract_state) -> tuple[int, dict, dict] | None:
        """(step, state, data state) of the newest checkpoint that reads back, None when there
        is none. Newer ones that do not read (truncated, half deleted) are moved aside to
        `<step>.corrupt` with one warning naming them and the step resumed instead; DataError
        when no checkpoint reads."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            unquiet = _quiet_failed_reads()
            try:  # orbax and tensorstore raise ValueError, OSError, KeyError... for a bad file
                state, data = self.restore(step, abstract_state)
            except Exception as e:
                failed.append((step, e))
                continue
            if not failed:  # nothing failed: nothing to quiet
                unquiet()
            if failed:
                log.warning("%s; resuming from step %d (moved aside to %s)",
                            "; ".join(f"checkpoint {s} cannot be read ({_brief(e)})"
                                      for s, e in failed), step,
                            ", ".join(self._set_aside(s) for s, _ in failed))
                self.manager.reload()
            return step, state, data
        if failed:
            step, e = failed[0]
            raise DataError(f"{self.directory}: no checkpoint can be read (steps "
                            f"{', '.join(str(s) for s, _ in failed)}; step {step}: {_brief(e)})")
        return None

    def _set_aside(self, step: int) -> str:
        """Rename checkpoint `step` to the first free `<step>.corrupt[-n]`: kept for a look,
        out of the way of the save of that step to come."""
        target, n = self.directory / f"{step}.corrupt", 1
        while paths.exists(target):
            n += 1
            target = self.directory / f"{step}.corrupt-{n}"
        several = jax.process_count() > 1
        if several:  # every process has named the target before it exists
            multihost_utils.sync_global_devices(f"phijax: setting checkpoint {step} aside")
        if jax.process_index() == 0:
            paths.move_tree(self.directory / str(step), target)
        if several:
            multihost_utils.sync_global_devices(f"phijax: checkpoint {step} set aside")
        return f"{self.directory.name}/{target.name}"

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _flat(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_shapes(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape and x.dtype == y.dtype for x, y in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))


def check_resume(cfg: Config, run_dir: Path) -> None:
    """A run directory with checkpoints resumes only into a train state of the same shapes:
    ConfigError naming the model and optimizer keys that differ from its config.yaml otherwise,
    before anything is written or compiled."""
    from phijax.train.step import state_shapes

    saved_path = run_dir / "config.yaml"
    if not any(name.isdigit() for name in paths.listdir(run_dir / "checkpoints")) or \
            not paths.exists(saved_path):
        return
    try:
        saved = from_dict(Config, yaml.safe_load(paths.read_text(saved_path)) or {}, "")
    except (ConfigError, yaml.YAMLError):  # written by another version: the restore will tell
        return
    before, now = _flat(to_dict(saved)), _flat(to_dict(cfg))
    changed = [f"{k} {before.get(k)} -> {now.get(k)}" for k in sorted(before.keys() | now.keys())
               if k.split(".")[0] in ("model", "optimizer") and before.get(k) != now.get(k)]
    if changed and not _same_shapes(state_shapes(saved), state_shapes(cfg)):
        raise ConfigError(f"run.dir {run_dir} holds checkpoints of another model or optimizer "
                          f"state: {', '.join(changed)} (saved -> now); resume with the saved "
                          f"values or give a new run.dir")
