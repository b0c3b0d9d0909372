"""`phijax train`: the training loop with logging, eval, checkpoints and SIGTERM handling."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from phijax.config import Config, to_dict, validate
from phijax.errors import ConfigError
from phijax.data.loader import (PackedDocuments, Windows, batches, split_documents, split_windows,
                                synthetic_batches)
from phijax.data.mixture import BlockMixer
from phijax.files import atomic_write, read_jsonl, write_jsonl
from phijax.sharding import make_mesh
from phijax.train.checkpoint import Checkpointer
from phijax.train.metrics import MetricsWriter, device_peak, flops_per_token
from phijax.train.step import build_trainer

log = logging.getLogger("phijax")


def maybe_initialize_distributed(mode: str) -> None:
    """Multi-process JAX when asked (`on`: a cluster JAX detects, SLURM, TPU pods...), or when the
    environment names a coordinator: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
    env = os.environ
    coordinator = env.get("JAX_COORDINATOR_ADDRESS")
    if mode == "off" or (mode == "auto" and not coordinator):
        return
    kwargs = {}
    if coordinator:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        kwargs = {"coordinator_address": coordinator, "num_processes": int(env["JAX_NUM_PROCESSES"]),
                  "process_id": int(env["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**kwargs)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop records past the checkpoint we resume from, so steps are never logged twice."""
    if path.exists():
        write_jsonl(path, [m for _, m in read_jsonl(path) if m["step"] <= last_step])


class _StopFlag:
    def __init__(self):
        self.stop = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.stop = True


def _data(cfg: Config, prepared, start: int):
    """(train iterator from `start`, fixed eval batches, step -> realized epochs per source)."""
    d, t = cfg.data, cfg.train
    pi, pc = jax.process_index(), jax.process_count()
    if d.synthetic:
        return (synthetic_batches(cfg.model.vocab_size, t.batch_size // pc, d.seq_len,
                                  d.seed + pi, start, t.steps), [], lambda step: {})
    tokenizer, mixture, stores = prepared
    shares = [s.share for s in mixture.sources]
    if d.packing == "documents":
        ranges = [split_documents(store, d.eval_fraction) for store in stores]
        make = lambda st, r: PackedDocuments(st, d.seq_len, *r, pad_id=tokenizer.pad_id)
    else:
        ranges = [split_windows(store, d.seq_len, d.eval_fraction) for store in stores]
        make = lambda st, r: Windows(st, d.seq_len, *r, document_mask=d.document_mask)
    train = [make(st, r["train"]) for st, r in zip(stores, ranges)]
    for source, rows in zip(mixture.sources, train):
        if getattr(rows, "truncated", 0):
            log.warning("source %s: %d documents are longer than data.seq_len + 1 and are cut",
                        source.name, rows.truncated)
    mixer = BlockMixer(shares, d.seed)
    it = batches(train, mixer, t.batch_size, d.seed, start, t.steps, pi, pc, prefetch=d.prefetch)
    evals = []
    if all(r["eval"][1] > r["eval"][0] for r in ranges):
        held = [make(st, r["eval"]) for st, r in zip(stores, ranges)]
        evals = list(batches(held, mixer, t.batch_size, d.seed, 0, t.eval_batches, pi, pc,
                             prefetch=0))
    sizes = np.array([len(w) for w in train])

    def epochs_at(step: int) -> dict:
        seen = mixer.consumed(step * t.batch_size) / sizes
        return {f"epochs/{s.name}": float(e) for s, e in zip(mixture.sources, seen)}

    return it, evals, epochs_at


@dataclass
class Task:
    """What a run trains on. `phijax train` and `sft` use `lm_task`; `phijax dpo` uses
    `phijax.posttrain.dpo.dpo_task`. `data(start)` gives (batches from step `start`, fixed eval
    batches, step -> extra metrics such as realized epochs)."""
    data: Callable
    tokens_per_step: int
    objective: Optional[Callable] = None  # None: next-token cross-entropy
    batch_dims: Optional[dict] = None  # batch key -> rank; None: the LM batch
    tokenizer: Optional[Path] = None  # copied into the run directory


def lm_task(cfg: Config, mesh, chats_only: bool = False) -> Task:
    """Language modelling on the configured corpus or mixture (tokenized and cached once);
    `chats_only` (SFT) rejects a source with any non-chat document."""
    prepared = None
    if not cfg.data.synthetic:
        from phijax.data.prepare import prepare
        if jax.process_index() == 0:  # builds the cache once; the others then read it
            prepared = prepare(cfg.data)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("phijax: data prepared")
        prepared = prepared or prepare(cfg.data)
        if prepared[0].vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {prepared[0].vocab_size} pieces")
        for source, store in zip(prepared[1].sources, prepared[2]):
            m = store.manifest
            if chats_only and m["chat_documents"] != m["documents"]:
                raise ConfigError(f"source {source.name}: {m['documents'] - m['chat_documents']} "
                                  f"of {m['documents']} documents are not chats (messages)")
    return Task(data=lambda start: _data(cfg, prepared, start),
                tokens_per_step=cfg.train.batch_size * cfg.data.seq_len,
                tokenizer=prepared[0].path if prepared else None)


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_init_from(cfg: Config) -> None:
    """run.init_from must be a run directory with a checkpoint of this model's shapes; its
    tokenizer becomes data.tokenizer unless one is set."""
    if not cfg.run.init_from:
        return
    from phijax.weights import latest_step, load_config
    source = Path(cfg.run.init_from)
    base = load_config(source).model
    for name in SHAPE_FIELDS:
        if getattr(base, name) != getattr(cfg.model, name):
            raise ConfigError(f"model.{name} is {getattr(cfg.model, name)} but run.init_from "
                              f"{source} has {getattr(base, name)}")
    latest_step(source)
    if not cfg.data.tokenizer and (source / "tokenizer.model").is_file():
        cfg.data.tokenizer = str(source / "tokenizer.model")


def train(cfg: Config, make_task: Callable = lm_task) -> dict:
    """Run (or resume) training; returns the last logged metrics."""
    maybe_initialize_distributed(cfg.run.distributed)
    validate(cfg, jax.device_count())
    check_init_from(cfg)
    mesh = make_mesh(cfg.mesh)
    task = make_task(cfg, mesh)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        atomic_write(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if task.tokenizer is not None:  # the run directory is all that sampling and serving need
            shutil.copyfile(task.tokenizer, run_dir / "tokenizer.model")

    trainer = build_trainer(cfg, mesh, task.objective, task.batch_dims)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    stop = _StopFlag()
    start = ckpt.latest_step() or 0
    initial = None
    if not start and cfg.run.init_from:  # read outside set_mesh: its abstract model is unsharded
        from phijax.weights import load_params
        initial = load_params(cfg.run.init_from, mesh)[1]
    with jax.set_mesh(mesh):
        if start >= cfg.train.steps:
            log.info("run %s is already complete at step %d", run_dir, start)
            ckpt.close()
            return {"step": start}
        if start:
            state, data_state = ckpt.restore(start, trainer.abstract_state)
            log.info("resumed from step %d (data state %s)", start, data_state)
        elif initial is not None:
            state = trainer.init_from(initial)
            log.info("initialized from %s", cfg.run.init_from)
        else:
            state = trainer.init()
        if primary:
            _trim_metrics(run_dir / "metrics.jsonl", start)
        writer = MetricsWriter(run_dir, enabled=primary)
        last = _loop(cfg, task, trainer, state, start, ckpt, writer, stop)
        epochs = [f"{k[len('epochs/'):]} {v:.2f}" for k, v in last.items() if k.startswith("epochs/")]
        if epochs:
            log.info("realized epochs per source: %s", ", ".join(epochs))
        writer.close()
        ckpt.close()
    return last


def _to_global(batch: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in batch.items()}


def _loop(cfg, task, trainer, state, start, ckpt, writer, stop) -> dict:
    t = cfg.train
    it, eval_batches, epochs_at = task.data(start)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = device_peak(t.peak_flops_per_device) * jax.device_count()
    tokens_per_step = task.tokens_per_step
    last, window_start, window_steps = {}, time.perf_counter(), 0
    run_start = time.perf_counter()
    for step in range(start, t.steps):
        state, metrics = trainer.train_step(state, _to_global(next(it), trainer.batch_shardings))
        window_steps += 1
        done = step + 1
        stopping = stop.stop  # read once: a SIGTERM may land anywhere in this iteration
        final = done == t.steps or stopping
        if done % t.log_every == 0 or done == start + 1 or final:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            tps = window_steps * tokens_per_step / elapsed
            last = {"step": done, **metrics, "tokens_per_s": tps,
                    "mfu": tps * flops / peak, "time": time.time(), **epochs_at(done)}
            if eval_batches and (done % t.eval_every == 0 or final):
                last.update(_evaluate(trainer, state["params"], eval_batches))
            writer.write(last)
            eta = (time.perf_counter() - run_start) / (done - start) * (t.steps - done)
            extra = "".join(f" {'eval' if k == 'eval_loss' else k} {v:.4f}" for k, v in last.items()
                            if k not in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                                         "time") and "/" not in k)
            log.info("step %d/%d loss %.4f%s lr %.2e gnorm %.3f | %.0f tok/s mfu %.1f%% | eta %s",
                     done, t.steps, last["loss"], extra, last["lr"], last["grad_norm"], tps,
                     100 * last["mfu"], _fmt_time(eta))
            window_start, window_steps = time.perf_counter(), 0
        if done % cfg.checkpoint.every == 0 or final:
            ckpt.save(done, state, {"step": done, "seed": cfg.data.seed})
        if stopping:
            log.warning("stopped at step %d after SIGTERM; checkpoint saved", done)
            break
    return last


def _evaluate(trainer, params, eval_batches) -> dict:
    """Held-out metrics: each summed quantity of the objective over the eval batches, divided
    by their summed weight, as eval_<name> (eval_loss, and for DPO eval_accuracy...)."""
    sums, weight = {}, 0.0
    for batch in eval_batches:
        s, w = jax.device_get(trainer.eval_step(params, _to_global(batch, trainer.batch_shardings)))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in s.items()}
        weight += float(w)
    return {f"eval_{k}": v / max(weight, 1.0) for k, v in sums.items()}
