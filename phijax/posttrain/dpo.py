"""`phijax dpo`: Direct Preference Optimization on pairs of token ids.

Pairs file (`dpo.pairs`, JSONL; what `tools.pts` and `tools.judge` write), one pair per line:

    {"id": ..., "prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...], ...provenance}

Completions are used exactly as given: a single-token completion (a PTS pair) is one token, with
no EOS appended. Each pair becomes two rows, prompt + chosen and prompt + rejected, of
`data.seq_len + 1` tokens; the loss weights select the completion's tokens only.

Reference log-probs, log p_ref(completion | prompt) summed over the completion, are computed
once, in a separate pass with the reference checkpoint (`dpo.reference`, default
`run.init_from`), and stored beside the pairs as `PAIRS.ref.npz` (in the bucket, for pairs
read from a gs:// or s3:// URL), keyed by the pairs' hash, the
reference checkpoint and step and `data.seq_len`. Training then holds one model, the policy.

With m = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), the loss per pair is

    sigmoid (DPO):  -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)   (eps: label_smoothing)
    ipo:            (m - 1 / (2 beta))^2

plus, with `dpo.rpo_alpha` > 0, alpha * (-log pi(c)) / |c| (RPO: the negative log-likelihood of
the chosen completion per token, which keeps DPO from lowering chosen and rejected together).

Logged per step (and as eval_* on held-out pairs): loss, reward_margin (beta m), accuracy
(m > 0), chosen_logp and rejected_logp (the policy's).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from phijax import paths
from phijax.config import Config, DPOConfig
from phijax.data.tokenizer import find_tokenizer
from phijax.errors import ConfigError, DataError
from phijax.files import read_jsonl
from phijax.hashing import file_sha256
from phijax.model import abstract_model
from phijax.sharding import batch_sharding
from phijax.train.tasks import Task
from phijax.train.step import BATCH_KEYS, sequence_logprobs

log = logging.getLogger("phijax")
FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
# A batch of pairs: the LM keys (pairs, 2, seq_len), chosen row then rejected row; the
# reference log-probs (pairs, 2); each pair's weight (pairs,).
BATCH_DIMS = {**{k: 3 for k in BATCH_KEYS}, "ref_logps": 2, "weights": 1}


# ---------------------------------------------------------------- the loss

def dpo_losses(policy, reference, cfg: DPOConfig, chosen_tokens=None):
    """Per pair: (loss, m). `policy` and `reference` are (pairs, 2) log-probs: chosen, rejected;
    `chosen_tokens` (pairs,) the chosen completions' lengths (needed when rpo_alpha > 0)."""
    m = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    if cfg.loss == "ipo":
        loss = jnp.square(m - 1.0 / (2.0 * cfg.beta))
    else:
        eps = cfg.label_smoothing
        loss = -(1.0 - eps) * jax.nn.log_sigmoid(cfg.beta * m) \
            - eps * jax.nn.log_sigmoid(-cfg.beta * m)
    if cfg.rpo_alpha:
        loss = loss - cfg.rpo_alpha * policy[:, 0] / jnp.maximum(chosen_tokens, 1)
    return loss, m


def dpo_objective(cfg: DPOConfig):
    """Sums over the batch's pairs, weighted by `weights` (0 for padding pairs)."""
    def objective(graphdef, params, batch):
        rows = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in BATCH_KEYS}
        logp = sequence_logprobs(graphdef, params, rows).reshape(-1, 2)
        loss, m = dpo_losses(logp, batch["ref_logps"], cfg,
                             jnp.sum(batch["loss_weights"][:, 0], axis=-1))
        w = batch["weights"]
        sums = {"loss": jnp.sum(loss * w), "reward_margin": jnp.sum(cfg.beta * m * w),
                "accuracy": jnp.sum((m > 0) * w), "chosen_logp": jnp.sum(logp[:, 0] * w),
                "rejected_logp": jnp.sum(logp[:, 1] * w)}
        return sums["loss"], (sums, jnp.sum(w))
    return objective


# ---------------------------------------------------------------- pairs

@dataclass
class Pairs:
    path: str  # the file as given (made absolute), a local path or a gs:// / s3:// URL
    ids: list
    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    digest: str  # sha256 of the file

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, i: int, seq_len: int) -> dict:
        """Pair i as two rows (chosen, rejected): each batch key shaped (2, seq_len)."""
        out = {k: np.zeros((2, seq_len), np.int32) for k in BATCH_KEYS}
        out["loss_weights"] = np.zeros((2, seq_len), np.float32)
        for r, completion in enumerate((self.chosen[i], self.rejected[i])):
            row = np.concatenate([self.prompt[i], completion])
            n = row.size - 1
            out["tokens"][r, :n], out["targets"][r, :n] = row[:-1], row[1:]
            out["positions"][r] = np.arange(seq_len)
            out["segment_ids"][r, n:] = 1  # padding: a segment of its own
            out["loss_weights"][r, self.prompt[i].size - 1:n] = 1.0  # targets in the completion
        return out


def load_pairs(path: str | Path, vocab_size: int, seq_len: int) -> Pairs:
    """Read and check every pair; errors name the file and line."""
    path = paths.absolute(path)
    if not paths.exists(path):
        raise ConfigError(f"dpo.pairs: {path} does not exist")
    local = paths.local_copy(path) if paths.is_url(path) else path
    pairs = Pairs(str(path), [], [], [], [], file_sha256(local))
    for number, record in read_jsonl(local):
        arrays = [_token_ids(record, field, vocab_size, f"{path}:{number}") for field in FIELDS]
        longest = arrays[0].size + max(arrays[1].size, arrays[2].size)
        if longest > seq_len + 1:
            raise DataError(f"{path}:{number}: prompt + completion is {longest} tokens, over "
                              f"data.seq_len + 1 = {seq_len + 1}")
        pairs.ids.append(record.get("id", number))
        pairs.prompt.append(arrays[0])
        pairs.chosen.append(arrays[1])
        pairs.rejected.append(arrays[2])
    if not pairs.ids:
        raise DataError(f"dpo.pairs: {path} holds no pairs")
    return pairs


def _token_ids(record: dict, field: str, vocab_size: int, where: str) -> np.ndarray:
    ids = record.get(field)
    if not isinstance(ids, list) or not ids or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise DataError(f"{where}: {field} must be a non-empty list of token ids")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise DataError(f"{where}: {field} has ids outside [0, {vocab_size})")
    return np.asarray(ids, np.int32)


def _stack(pairs: Pairs, indices, seq_len: int, weights=None) -> dict:
    rows = [pairs.rows(int(i), seq_len) for i in indices]
    batch = {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}
    batch["weights"] = np.ones(len(rows), np.float32) if weights is None else weights
    return batch


# ---------------------------------------------------------------- reference log-probs

def reference_pass(cfg: Config, mesh):
    """The compiled pass of the reference model: (params, rows) -> per row (b,) the summed
    log-probs of its completion (rows as in `BATCH_KEYS`, (b, seq_len) each)."""
    graphdef = nnx.graphdef(abstract_model(cfg.model))
    return jax.jit(lambda p, b: sequence_logprobs(graphdef, p, b),
                   out_shardings=batch_sharding(mesh, 1))


def reference_logps(cfg: Config, pairs: Pairs, mesh) -> np.ndarray:
    """(pairs, 2) reference log-probs of chosen and rejected, from PAIRS.ref.npz when it matches
    these pairs and this reference; otherwise computed in one pass and stored there."""
    from phijax.weights import latest_step, load_params
    reference = paths.absolute(cfg.dpo.reference or cfg.run.init_from)
    step = latest_step(reference)
    key = json.dumps({"pairs_sha256": pairs.digest, "reference": str(reference), "step": step,
                      "seq_len": cfg.data.seq_len, "dtype": cfg.model.dtype}, sort_keys=True)
    path = f"{pairs.path}.ref.npz"
    if paths.exists(path):
        with np.load(io.BytesIO(paths.read_bytes(path))) as stored:
            if str(stored["key"]) == key:
                log.info("reference log-probs: %s (stored; not recomputed)", path)
                return stored["logps"]
    log.info("reference log-probs: computing for %d pairs with %s step %d", len(pairs),
             reference, step)
    _, params = load_params(reference, mesh, step)
    sharding = batch_sharding(mesh, 2)
    fn = reference_pass(cfg, mesh)
    b, pc, pi = cfg.train.batch_size, jax.process_count(), jax.process_index()
    out, start = [], time.perf_counter()
    for first in range(0, len(pairs), b):
        indices = np.arange(first, first + b) % len(pairs)  # the last batch wraps; cut below
        batch = _stack(pairs, indices, cfg.data.seq_len)
        rows = {k: batch[k].reshape(-1, cfg.data.seq_len) for k in BATCH_KEYS}
        local = {k: np.array_split(v, pc)[pi] for k, v in rows.items()}
        with jax.set_mesh(mesh):
            logp = fn(params, {k: jax.make_array_from_process_local_data(sharding, v)
                               for k, v in local.items()})
        logp = multihost_utils.process_allgather(logp, tiled=True) if pc > 1 else jax.device_get(logp)
        out.append(np.asarray(logp).reshape(-1, 2)[: len(pairs) - first])
        done = min(first + b, len(pairs))
        if done == len(pairs) or len(out) % 20 == 0:
            rate = done / (time.perf_counter() - start)
            log.info("reference log-probs: %d/%d pairs, %.0f pairs/s, eta %.0fs", done,
                     len(pairs), rate, (len(pairs) - done) / rate)
    del params
    logps = np.concatenate(out).astype(np.float32)
    if pi == 0:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), logps=logps)
        paths.write_bytes(path, buffer.getvalue())
    return logps


# ---------------------------------------------------------------- the task

def split_pairs(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) pair indices: a seeded eval_fraction of the pairs is held out."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_eval = int(n * eval_fraction)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def dpo_batches(pairs: Pairs, ref: np.ndarray, indices: np.ndarray, seq_len: int,
                batch_size: int, seed: int, start: int, stop: int, pi: int = 0, pc: int = 1,
                prefetch: int = 2):
    """This process's share of the batches for steps [start, stop): every pair of `indices`
    once per epoch, in a fresh seeded order each epoch; batch `step` depends on (seed, step)."""
    local = batch_size // pc
    order = functools.lru_cache(maxsize=4)(
        lambda epoch: indices[np.random.default_rng([seed, epoch]).permutation(indices.size)])

    def batch_at(step: int) -> dict:
        positions = step * batch_size + pi * local + np.arange(local)
        epochs, within = np.divmod(positions, indices.size)
        chosen = np.array([order(e)[w] for e, w in zip(epochs.tolist(), within.tolist())])
        batch = _stack(pairs, chosen, seq_len)
        batch["ref_logps"] = ref[chosen]
        return batch

    steps = grain.MapDataset.range(start, stop).map(batch_at)
    if prefetch <= 0:
        return iter(steps)
    return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)))


def _eval_batches(pairs, ref, indices, seq_len, batch_size, n_batches, pi, pc) -> list[dict]:
    out, local = [], batch_size // pc
    for first in range(0, min(indices.size, batch_size * n_batches), batch_size):
        chosen = indices[first:first + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[:chosen.size] = 1.0
        chosen = np.resize(chosen, batch_size)  # pad with repeats of weight 0
        batch = _stack(pairs, chosen, seq_len, weights)
        batch["ref_logps"] = ref[chosen]
        out.append({k: v[pi * local:(pi + 1) * local] for k, v in batch.items()})
    return out


def dpo_task(cfg: Config, mesh) -> Task:
    if not cfg.run.init_from:
        raise ConfigError("run.init_from: dpo trains a checkpoint; give its run directory")
    if not cfg.dpo.pairs:
        raise ConfigError("dpo.pairs: give the pairs JSONL (prompt_ids, chosen_ids, rejected_ids)")
    d, t = cfg.data, cfg.train
    pairs = load_pairs(cfg.dpo.pairs, cfg.model.vocab_size, d.seq_len)
    train_idx, eval_idx = split_pairs(len(pairs), d.eval_fraction, d.seed)
    if train_idx.size == 0:
        raise ConfigError(f"data.eval_fraction {d.eval_fraction} leaves no training pair")
    ref = reference_logps(cfg, pairs, mesh)
    pi, pc = jax.process_index(), jax.process_count()
    evals = _eval_batches(pairs, ref, eval_idx, d.seq_len, t.batch_size, t.eval_batches, pi, pc)
    log.info("dpo: %d training pairs, %d held out; %s loss, beta %g", train_idx.size,
             eval_idx.size, cfg.dpo.loss, cfg.dpo.beta)

    def data(start: int):
        it = dpo_batches(pairs, ref, train_idx, d.seq_len, t.batch_size, d.seed, start, t.steps,
                         pi, pc, d.prefetch)
        epochs = lambda step: {"epochs/pairs": step * t.batch_size / train_idx.size}
        return it, evals, epochs

    return Task(data=data, tokens_per_step=2 * t.batch_size * d.seq_len,
                objective=dpo_objective(cfg.dpo), batch_dims=BATCH_DIMS,
                tokenizer=find_tokenizer(cfg.run.init_from))
