"""`phijax train`: the training loop with logging, eval, checkpoints and SIGTERM handling."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import yaml

from phijax.config import Config, to_dict, validate
from phijax.errors import ConfigError
from phijax.files import atomic_write, read_jsonl, write_jsonl
from phijax.sharding import make_mesh
from phijax.train.checkpoint import Checkpointer
from phijax.train.metrics import MetricsWriter, device_peak, flops_per_token
from phijax.train.step import build_trainer
from phijax.train.tasks import check_init_from, lm_task

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
