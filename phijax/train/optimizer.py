"""optax AdamW with the paper's schedule: linear warm-up, then linear decay to a floor."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from phijax.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int):
    peak = cfg.learning_rate
    floor = peak * cfg.end_learning_rate_ratio
    warmup = cfg.warmup_steps
    decay = cfg.decay_steps or max(total_steps - warmup, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * (count + 1.0) / max(warmup, 1)
        frac = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        return jnp.where(count < warmup, warm, peak + (floor - peak) * frac)

    return schedule


def decay_mask(params: dict, decay_norms_and_embeddings: bool) -> dict:
    """True where weight decay applies: matrices, but not norms or the input embedding."""
    def keep(path, leaf):
        names = [getattr(k, "key", "") for k in path]
        exempt = names[0] == "embed" or names[-1] == "scale"
        return decay_norms_and_embeddings or not exempt
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    chain = []
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=lambda p: decay_mask(p, cfg.decay_norms_and_embeddings)))
    return optax.chain(*chain)
