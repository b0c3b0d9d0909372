"""The pure train and eval steps, and the sharded train state they act on.

state = {"params": pure dict, "opt_state": optax state, "step": int32 scalar (steps run),
         "skipped_steps": int32 scalar (steps whose update was not applied: not finite)}
batch = {"tokens", "targets", "positions", "segment_ids": int32, "loss_weights": float32}, each (b, s)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phijax.config import Config
from phijax.model import abstract_model, init_model
from phijax.sharding import (batch_sharding, describe_replicated, named, param_specs,
                             replicated_params)
from phijax.train.optimizer import learning_rate_schedule, make_optimizer

log = logging.getLogger("phijax")
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_weights")


def log_partition(h, w_out, chunk: int | None):
    """logsumexp of the logits h @ w_out at every position: (b, s) float32 from h (b, s, hidden).

    With `chunk` < s the logits are computed `chunk` positions at a time, a (b, chunk, vocab)
    float32 array each, and recomputed in the backward pass instead of saved: the whole
    (b, s, vocab) array never exists. The last chunk is padded (and the padding cut off)."""
    b, s, e = h.shape

    def logz_of(part, w):
        logits = jnp.dot(part.reshape(-1, e), w, preferred_element_type=jnp.float32)
        return jax.nn.logsumexp(logits, axis=-1).reshape(part.shape[:-1])

    if chunk is None or chunk >= s:
        return logz_of(h, w_out)
    n = -(-s // chunk)
    parts = jnp.pad(h, ((0, 0), (0, n * chunk - s), (0, 0))).reshape(b, n, chunk, e)
    # Chunks along the sequence keep each one's rows on the devices that hold them.
    logz = jax.lax.map(lambda part: jax.checkpoint(logz_of)(part, w_out), parts.swapaxes(0, 1))
    return logz.swapaxes(0, 1).reshape(b, n * chunk)[:, :s]


def _logz_and_target_logits(graphdef, params, batch):
    """Per token (flattened): log-partition and target logit, both float32."""
    model = nnx.merge(graphdef, params)
    h = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    w_out = model.output_weights().astype(h.dtype)  # (hidden, vocab)
    logz = log_partition(h, w_out, model.cfg.loss_chunk).reshape(-1)
    # The target logit straight from h and the target's output column: O(tokens * hidden),
    # where picking it out of the logits would add full (tokens, vocab) passes to both directions.
    h = h.reshape(-1, h.shape[-1])  # (tokens, hidden)
    targets = batch["targets"].reshape(-1)
    target_logit = jnp.einsum("te,et->t", h, jnp.take(w_out, targets, axis=1),
                              preferred_element_type=jnp.float32)
    return logz, target_logit


def sequence_logprobs(graphdef, params, batch):
    """Per row (b,): the sum of log p(target) over the tokens the loss weights select."""
    logz, target_logit = _logz_and_target_logits(graphdef, params, batch)
    w = batch["loss_weights"]
    return jnp.sum((target_logit - logz).reshape(w.shape) * w, axis=-1)


def lm_objective(z_loss: float):
    """Next-token cross-entropy: (objective, ({"loss": nll sum}, weight)), summed over tokens."""
    def objective(graphdef, params, batch):
        logz, target_logit = _logz_and_target_logits(graphdef, params, batch)
        w = batch["loss_weights"].reshape(-1)
        nll = jnp.sum((logz - target_logit) * w)
        total = nll + z_loss * jnp.sum(jnp.square(logz) * w) if z_loss else nll
        return total, ({"loss": nll}, jnp.sum(w))
    return objective


def _split_microbatches(batch, n: int):
    # (b, s) -> (n, b/n, s), taking rows n apart so each device's rows stay on that device.
    return {k: jnp.moveaxis(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 1, 0)
            for k, v in batch.items()}


def _update_if_finite(optimizer, finite, params, opt_state, grads):
    """(params, optimizer state) after the update when `finite`, else as they were. One
    lax.cond around the whole update: the update and apply_updates fuse as in an unguarded step
    (optax.apply_if_finite conds the inner update alone and then adds zero updates: ~5% more
    memory traffic per step in XLA's cost analysis), and the test is the logged gradient norm."""
    def apply(operands):
        p, o, g = operands
        updates, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, updates), o
    return jax.lax.cond(finite, apply, lambda operands: operands[:2], (params, opt_state, grads))


def make_train_step(cfg: Config, graphdef, optimizer: optax.GradientTransformation, objective):
    """`objective(graphdef, params, batch) -> (total, (sums, weight))` is a sum over the batch's
    tokens (or pairs); gradients and the logged `sums` are divided by the summed weight. A step
    whose loss or gradient norm is not finite leaves params and optimizer state as they were
    and adds one to the state's `skipped_steps`."""
    n_micro = cfg.train.microbatches
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    grad_fn = jax.grad(lambda p, b: objective(graphdef, p, b), has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        if n_micro == 1:
            grads, (sums, weight) = grad_fn(params, batch)
        else:
            def accumulate(carry, micro):
                return jax.tree.map(jnp.add, carry, grad_fn(params, micro)), None
            micros = _split_microbatches(batch, n_micro)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
                grad_fn, params, jax.tree.map(lambda v: v[0], micros)))
            (grads, (sums, weight)), _ = jax.lax.scan(accumulate, zeros, micros)
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm)  # NaN or Inf in any gradient makes the norm so too
        for v in jax.tree.leaves(sums):
            finite &= jnp.all(jnp.isfinite(v))
        params, opt_state = _update_if_finite(optimizer, finite, params, state["opt_state"],
                                              grads)
        skipped = state["skipped_steps"] + jnp.logical_not(finite).astype(jnp.int32)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "skipped_steps": skipped}
        metrics = {**{k: v / weight for k, v in sums.items()}, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "skipped_steps": skipped}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, objective):
    def eval_step(params, batch):
        _, (sums, weight) = objective(graphdef, params, batch)
        return sums, weight
    return eval_step


@dataclass
class Trainer:
    """The compiled pieces of one run: shardings, init, train and eval steps."""
    graphdef: Any
    state_shardings: Any
    batch_shardings: dict
    init: Callable
    init_from: Callable  # params -> a fresh state around them (fine-tuning)
    train_step: Callable
    eval_step: Callable
    abstract_state: Any


def _initializers(cfg: Config, optimizer: optax.GradientTransformation):
    """(params -> a fresh state around them, () -> a fresh state from the seed)."""
    def init_from(params):
        return {"params": params, "opt_state": optimizer.init(params),
                "step": jnp.zeros((), jnp.int32), "skipped_steps": jnp.zeros((), jnp.int32)}

    def init():
        return init_from(nnx.to_pure_dict(nnx.state(init_model(cfg.model, cfg.train.seed))))

    return init_from, init


def state_shapes(cfg: Config):
    """Shape and dtype of every leaf of `cfg`'s train state (traced, nothing computed)."""
    return jax.eval_shape(_initializers(cfg, make_optimizer(cfg.optimizer, cfg.train.steps))[1])


def build_trainer(cfg: Config, mesh: Mesh, objective=None, batch_dims: dict | None = None) -> Trainer:
    """`objective` defaults to the LM loss; `batch_dims` maps batch keys to their rank (default:
    the LM batch, all (b, s)). Every batch array is split over the data axes on its first dim."""
    graphdef, abstract_vars = nnx.split(abstract_model(cfg.model))
    params_sh = named(param_specs(abstract_vars, mesh), mesh)
    if unsplit := replicated_params(abstract_vars, mesh):  # said once, at start-up
        log.warning(describe_replicated(unsplit, mesh))
    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)

    objective = objective or lm_objective(cfg.optimizer.z_loss)
    batch_dims = batch_dims or {k: 2 for k in BATCH_KEYS}
    init_from, init = _initializers(cfg, optimizer)
    abstract_state = jax.eval_shape(init)
    replicated = NamedSharding(mesh, P())
    # Optimizer moments mirror the params they belong to; scalars are replicated.
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt_state"],
                                   params_sh, transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    state_sh = {"params": params_sh, "opt_state": opt_sh, "step": replicated,
                "skipped_steps": replicated}
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
    batch_sh = {k: batch_sharding(mesh, ndim) for k, ndim in batch_dims.items()}
    train_step = jax.jit(make_train_step(cfg, graphdef, optimizer, objective),
                         in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                         donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef, objective), in_shardings=(params_sh, batch_sh),
                        out_shardings=replicated)
    return Trainer(graphdef=graphdef, state_shardings=state_sh, batch_shardings=batch_sh,
                   init=jax.jit(init, out_shardings=state_sh),
                   init_from=jax.jit(init_from, in_shardings=(params_sh,), out_shardings=state_sh,
                                     donate_argnums=0),
                   train_step=train_step,
                   eval_step=eval_step, abstract_state=abstract_state)
