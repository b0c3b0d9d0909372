"""`phijax train`: the training loop with logging, eval (held-out loss and benchmark tasks),
checkpoints, the non-finite step guard, and stops on a preemption (SIGTERM, SIGUSR1: exit
status 42) or Ctrl-C (exit status 0) with a checkpoint of the same step on every host."""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P

from phijax import paths
from phijax.config import Config, to_dict, validate
from phijax.data.tokenizer import save_tokenizer
from phijax.errors import ConfigError
from phijax.files import jsonl_line, read_jsonl
from phijax.sharding import make_mesh
from phijax.train.checkpoint import Checkpointer, check_resume
from phijax.train.distributed import PREEMPTED_EXIT_CODE, initialize
from phijax.train.eval_tasks import EvalTasks, load_eval_tasks
from phijax.train.metrics import MetricsWriter, device_peak, flops_per_token
from phijax.train.step import build_trainer
from phijax.train.tasks import check_init_from, lm_task

log = logging.getLogger("phijax")


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop records past the checkpoint we resume from, so steps are never logged twice."""
    if paths.exists(path):
        kept = [m for _, m in read_jsonl(path) if m["step"] <= last_step]
        paths.write_text(path, "".join(map(jsonl_line, kept)))


class NonFiniteStop(SystemExit):
    """A step's loss or gradient norm was not finite under `train.on_nonfinite: stop`: the
    program exits with status 1 and this one line. The step's update was not applied and no
    checkpoint was saved after it."""

    def __init__(self, message: str):
        super().__init__(f"phijax: error: {message}")


class Preempted(SystemExit):
    """The run stopped on SIGTERM or SIGUSR1 (to this process or another) with a checkpoint of
    the same step saved on every host: the program exits with PREEMPTED_EXIT_CODE, which
    schedulers retry, and the same command resumes."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


class _StopFlag:
    """Set by a first Ctrl-C (SIGINT), or by SIGTERM or SIGUSR1, which announce a preemption
    (SLURM's `--signal=USR1@120` sends USR1 ahead of a time limit): the loop saves a checkpoint
    after the step and returns, and after a preemption `train` raises Preempted; a second
    Ctrl-C aborts at once. With several processes the stop is agreed: each step all-reduces
    (max) every process's level on the devices, and `should_stop` reads the previous step's
    result (ready by then, so no host sync), so all processes save the same step, one step
    after the signal, and exit alike (a preemption anywhere outranks a Ctrl-C)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    INTERRUPTED, PREEMPTED = 1, 2  # levels; 0: no signal

    def __init__(self, mesh=None):
        self.local, self.agreed, self.reason, self._pending = 0, 0, None, None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._agree = _max_over_processes(mesh) if mesh is not None and jax.process_count() > 1 \
            else None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        interrupt = signum == signal.SIGINT
        if interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one aborts
        log.warning("%s: saving a checkpoint after this step, then exiting%s", name,
                    " (a second Ctrl-C aborts)" if interrupt else
                    f" with status {PREEMPTED_EXIT_CODE} (preempted; the same command resumes)")
        level = self.INTERRUPTED if interrupt else self.PREEMPTED
        if level > self.local:
            self.local, self.reason = level, name

    def should_stop(self) -> bool:
        """Called once a step, after the step is dispatched."""
        if self._agree is None:
            self.agreed = self.local
            return bool(self.agreed)
        previous, self._pending = self._pending, self._agree(self.local)
        if not self.agreed and previous is not None:
            self.agreed = int(previous)
            if self.agreed and self.agreed != self.local:
                self.reason = "a signal to another process"
        return bool(self.agreed)

    @property
    def preempted(self) -> bool:
        return self.agreed == self.PREEMPTED

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _max_over_processes(mesh):
    """level -> a replicated device int: the highest level of any process (one tiny
    all-reduce, dispatched like a step, so asking does not wait)."""
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    local = np.zeros(jax.local_device_count(), np.int32)
    return lambda level: reduce(jax.make_array_from_process_local_data(sharding, local + level))


class _NonFinite:
    """Finds the steps the train step skipped as non-finite from the cumulative `skipped_steps`
    each step returns, read only at log steps and before saves: no device sync on the others."""

    def __init__(self, cfg: Config, task, skipped: int):
        self.stop = cfg.train.on_nonfinite == "stop"
        self.sources_at = getattr(task, "sources_at", None)
        self.skipped, self.window = skipped, []  # the count at the last check; steps since

    def add(self, done: int, metrics: dict) -> None:
        self.window.append((done, metrics))

    def check(self, ckpt) -> int:
        """The count of skipped steps so far; under `stop`, NonFiniteStop at a new one."""
        if not self.window:
            return self.skipped
        now = int(jax.device_get(self.window[-1][1]["skipped_steps"]))
        if now > self.skipped:
            counts = jax.device_get([m["skipped_steps"] for _, m in self.window])
            done, metrics = self.window[[int(c) > self.skipped for c in counts].index(True)]
            what = self._describe(done, metrics)
            if self.stop:
                latest = ckpt.latest_step()
                raise NonFiniteStop(
                    f"{what}: not finite, so its update was not applied and the run stopped; "
                    f"last checkpoint: {f'step {latest}' if latest else 'none'}, intact; "
                    f"lower optimizer.learning_rate, or set train.on_nonfinite=skip to go on")
            log.warning("%s: not finite, update skipped (%d skipped so far)", what, now)
        self.skipped, self.window = now, []
        return now

    def _describe(self, done: int, metrics: dict) -> str:
        """`step N: loss X, gradient norm Y (sources a 3, b 5 windows)`."""
        loss, gnorm = (float(metrics[k]) for k in ("loss", "grad_norm"))
        what = f"step {done}: loss {loss:.4g}, gradient norm {gnorm:.4g}"
        sources = self.sources_at(done - 1) if self.sources_at else {}  # batch index = step - 1
        if sources:
            what += f" (sources {', '.join(f'{k} {v}' for k, v in sources.items())} windows)"
        return what


def _initial_state(cfg: Config, trainer, ckpt: Checkpointer, initial):
    """(state, first step): the newest readable checkpoint, else `initial` params, else init."""
    restored = ckpt.restore_latest(trainer.abstract_state)
    if restored:
        start, state, data_state = restored
        log.info("resumed from step %d (data state %s)", start, data_state)
        return state, start
    if initial is not None:
        log.info("initialized from %s", cfg.run.init_from)
        return trainer.init_from(initial), 0
    return trainer.init(), 0


def _write_run_files(cfg: Config, task, run_dir: Path, start: int) -> None:
    """config.yaml, the tokenizer (all that sampling and serving need) and metrics.jsonl cut
    back to `start`: written once the state is in hand, so a failed resume changes nothing."""
    paths.write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if task.tokenizer is not None:
        save_tokenizer(task.tokenizer, run_dir)
    _trim_metrics(run_dir / "metrics.jsonl", start)


def check_run_dir(run_dir: Path) -> None:
    """run.dir is a directory, or can be made one: a ConfigError before any data or compile
    work otherwise (a file in its place or in its path, a parent we cannot write; a bucket
    that does not exist, cannot be reached or may not be written)."""
    if paths.is_url(run_dir):
        paths.check_writable(run_dir, "run.dir")
        return
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"run.dir {run_dir} is a file, not a directory")
        existing = run_dir
    else:
        existing = next(p for p in run_dir.absolute().parents if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"run.dir {run_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir {run_dir}: {existing} is not writable")


def train(cfg: Config, make_task: Callable = lm_task) -> dict:
    """Run (or resume) training; returns the last logged metrics. A stop on SIGTERM or SIGUSR1
    raises Preempted (exit status PREEMPTED_EXIT_CODE) once the checkpoint is saved."""
    initialize(cfg.run.distributed, cfg.run.distributed_timeout)
    validate(cfg, jax.device_count())
    benchmarks = load_eval_tasks(cfg)  # every file read before any data or compile work
    check_init_from(cfg)
    run_dir = paths.as_path(cfg.run.dir)
    check_run_dir(run_dir)
    check_resume(cfg, run_dir)
    mesh = make_mesh(cfg.mesh)
    task = make_task(cfg, mesh)
    eval_tasks = EvalTasks(cfg, benchmarks, task.tokenizer, mesh) if benchmarks else None
    if not paths.is_url(run_dir):  # a bucket has no directories to make
        run_dir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    trainer = build_trainer(cfg, mesh, task.objective, task.batch_dims)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    latest = ckpt.latest_step() or 0
    if latest >= cfg.train.steps:
        log.info("run %s is already complete at step %d", run_dir, latest)
        ckpt.close()
        return {"step": latest}
    initial = None
    if not latest and cfg.run.init_from:  # read outside set_mesh: its abstract model is unsharded
        from phijax.weights import load_params
        initial = load_params(cfg.run.init_from, mesh)[1]
    stop = _StopFlag(mesh)
    aborted = False
    try:
        with jax.set_mesh(mesh):
            state, start = _initial_state(cfg, trainer, ckpt, initial)
            if primary:
                _write_run_files(cfg, task, run_dir, start)
            writer = MetricsWriter(run_dir, enabled=primary)
            try:
                last = _loop(cfg, task, trainer, state, start, ckpt, writer, stop, eval_tasks)
            finally:
                writer.close()
    except KeyboardInterrupt:  # a second Ctrl-C: no waiting for a save in flight
        aborted = True
        raise
    finally:
        stop.close()
        if not aborted:
            ckpt.close()
    if stop.preempted:
        log.warning("preempted: exiting with status %d; the same command resumes",
                    PREEMPTED_EXIT_CODE)
        raise Preempted()
    epochs = [f"{k[len('epochs/'):]} {v:.2f}" for k, v in last.items() if k.startswith("epochs/")]
    if epochs:
        log.info("realized epochs per source: %s", ", ".join(epochs))
    return last


def _to_global(batch: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in batch.items()}


class _Progress:
    """Throughput, MFU and ETA over the steps since the last log line, and that line."""

    def __init__(self, cfg: Config, task, start: int):
        self.steps, self.start = cfg.train.steps, start
        self.tokens_per_step = task.tokens_per_step
        self.flops = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = device_peak(cfg.train.peak_flops_per_device) * jax.device_count()
        self.run_start = self.window_start = time.perf_counter()
        self.window_steps = 0

    def record(self, done: int, metrics: dict, skipped: int, extra: dict) -> dict:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tps = self.window_steps * self.tokens_per_step / (time.perf_counter() - self.window_start)
        return {"step": done, **metrics, "skipped_steps": skipped, "tokens_per_s": tps,
                "mfu": tps * self.flops / self.peak, "time": time.time(), **extra}

    def log(self, last: dict) -> None:
        done = last["step"]
        eta = (time.perf_counter() - self.run_start) / (done - self.start) * (self.steps - done)
        extra = "".join(f" {'eval' if k == 'eval_loss' else k} {v:.4f}" for k, v in last.items()
                        if k not in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                                     "time", "skipped_steps") and "/" not in k)
        skipped = f" skipped {last['skipped_steps']}" if last["skipped_steps"] else ""
        log.info("step %d/%d loss %.4f%s lr %.2e gnorm %.3f%s | %.0f tok/s mfu %.1f%% | eta %s",
                 done, self.steps, last["loss"], extra, last["lr"], last["grad_norm"], skipped,
                 last["tokens_per_s"], 100 * last["mfu"], _fmt_time(eta))
        self.window_start, self.window_steps = time.perf_counter(), 0


def _loop(cfg, task, trainer, state, start, ckpt, writer, stop, eval_tasks=None) -> dict:
    t = cfg.train
    it, eval_batches, epochs_at = task.data(start)
    progress = _Progress(cfg, task, start)
    nonfinite = _NonFinite(cfg, task, int(jax.device_get(state["skipped_steps"])))
    last = {}
    for step in range(start, t.steps):
        state, metrics = trainer.train_step(state, _to_global(next(it), trainer.batch_shardings))
        progress.window_steps += 1
        done = step + 1
        nonfinite.add(done, metrics)
        stopping = stop.should_stop()  # read once: a signal may land anywhere in this iteration
        final = done == t.steps or stopping
        evaluate = bool(eval_batches) and (done % t.eval_every == 0 or final)
        # benchmark tasks may take minutes: not while stopping on a signal
        score = eval_tasks is not None and not stopping and \
            (done % t.eval_every == 0 or done == t.steps)
        if done % t.log_every == 0 or done == start + 1 or final or evaluate or score:
            last = progress.record(done, metrics, nonfinite.check(ckpt), epochs_at(done))
            if evaluate:
                last.update(_evaluate(trainer, state["params"], eval_batches))
            if score:
                last.update(eval_tasks.run(state["params"]))
            writer.write(last)
            progress.log(last)
            if score:
                eval_tasks.log(done)
        if done % cfg.checkpoint.every == 0 or final:
            nonfinite.check(ckpt)  # never saves past a non-finite step under `stop`
            ckpt.save(done, state, {"step": done, "seed": cfg.data.seed})
        if stopping:
            log.warning("stopped at step %d after %s; checkpoint saved", done, stop.reason)
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
