"""Orbax checkpoints: async saves, keep-N, atomic finalize, data state saved beside the model.

Restores go through an abstract target whose shardings come from the current mesh, so a run
saved on 8 devices resumes on 1 and back.
"""
from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from phijax.config import CheckpointConfig


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, out.data

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
