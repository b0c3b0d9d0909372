"""`phijax sft`: fine-tune a checkpoint on chat JSONL (`messages`).

SFT is the training loop with three requirements checked before anything compiles: it starts
from `run.init_from` (a run directory, whose tokenizer it reuses), conversations are packed
whole (`data.packing: documents`), and every training document is a chat, so the loss is on
assistant tokens only (the store's loss mask).
"""
from __future__ import annotations

from phijax.config import Config
from phijax.errors import ConfigError
from phijax.train.tasks import lm_task


def check_sft(cfg: Config) -> None:
    if not cfg.run.init_from:
        raise ConfigError("run.init_from: sft fine-tunes a checkpoint; give its run directory")
    if cfg.data.packing != "documents":
        raise ConfigError(f"data.packing is {cfg.data.packing!r}; sft needs 'documents' "
                          f"(conversations are never split)")


def sft_task(cfg: Config, mesh):
    return lm_task(cfg, mesh, chats_only=True)
