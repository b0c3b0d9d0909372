"""Benchmark tasks scored inside the training loop (`train.eval_tasks`): the tasks of `phijax eval`
(`phijax.eval.tasks`), read and checked before anything compiles, scored on the live parameters
at each eval step by the harness, and logged as `eval/<task>/<metric>` and
`eval/<task>/<metric>_stderr`."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import jax

from phijax.config import Config
from phijax.data.tokenizer import load_tokenizer
from phijax.errors import ConfigError, DataError
from phijax.eval.harness import HarnessConfig, Model, evaluate_tasks
from phijax.eval.questions import installed_sandbox
from phijax.eval.tasks import TASKS, load_task

log = logging.getLogger("phijax")


def load_eval_tasks(cfg: Config) -> list:
    """The (task, items) of train.eval_tasks, every file read and checked: one-line errors
    naming the key. [] when none are asked for."""
    t = cfg.train
    for name in t.eval_paths:
        if name not in t.eval_tasks:
            raise ConfigError(f"train.eval_paths.{name}: {name} is not among train.eval_tasks "
                              f"({', '.join(t.eval_tasks) or 'none'})")
        if not isinstance(t.eval_paths[name], str):
            raise ConfigError(f"train.eval_paths.{name}: expected a file path, got "
                              f"{t.eval_paths[name]!r}")
    for i, name in enumerate(t.eval_tasks):
        if name not in TASKS:
            raise ConfigError(f"train.eval_tasks: unknown task {name!r}; known tasks: "
                              f"{', '.join(TASKS)}")
        if name in t.eval_tasks[:i]:
            raise ConfigError(f"train.eval_tasks: {name} is named twice")
        if name not in t.eval_paths and not t.eval_data_dir and name != "humaneval":
            raise ConfigError(f"train.eval_paths.{name}: no data file for task {name}; give "
                              f"train.eval_paths.{name}=FILE or train.eval_data_dir=DIR (holding "
                              f"{TASKS[name].default_file}); the public file is at "
                              f"{TASKS[name].source}")
    try:
        tasks = [load_task(name, t.eval_data_dir, t.eval_paths, t.eval_limit)
                 for name in t.eval_tasks]
        if any(task.kind == "code" for task, _ in tasks):
            installed_sandbox()  # code tasks run their tests there
    except (ConfigError, DataError) as e:
        raise type(e)(f"train.eval_tasks: {e}") from None
    return tasks


class EvalTasks:
    """Scores `tasks` with the run's parameters; the likelihood scorer (and its compiled
    program) is kept from one eval step to the next, the sampler's programs are cached by
    model shape."""

    def __init__(self, cfg: Config, tasks: list, tokenizer: Optional[Path], mesh):
        if tokenizer is None:
            raise ConfigError("train.eval_tasks needs a tokenizer and this run has none "
                              "(data.synthetic runs, and runs from a run.init_from without one)")
        self.cfg, self.tasks, self.mesh = cfg, tasks, mesh
        self.tokenizer = load_tokenizer(tokenizer)
        self.harness = HarnessConfig(tasks=[task.name for task, _ in tasks],
                                     limit=cfg.train.eval_limit,
                                     max_new_tokens=cfg.train.eval_max_new_tokens)
        self.scorer, self.summary = None, ""

    def run(self, params) -> dict:
        """{eval/<task>/<metric>: value, eval/<task>/<metric>_stderr: its standard error}."""
        start = time.perf_counter()
        model = Model(self.cfg, params, self.tokenizer, self.mesh, self.harness.batch,
                      _scorer=self.scorer)
        if self.scorer is not None:
            self.scorer.params = params
        # as `phijax eval` runs it: no mesh in context (the decoding model's abstract init is
        # unsharded); the params keep the training shardings and the sampler its mesh
        with jax.set_mesh(None):
            results = evaluate_tasks(model, self.tasks, self.harness)
        self.scorer = model._scorer
        if self.scorer is not None:
            self.scorer.params = None  # the train step donates them
        out, shown = {}, []
        for task, (metrics, _) in results.items():
            for name, m in metrics.items():
                out[f"eval/{task}/{name}"] = m["value"]
                out[f"eval/{task}/{name}_stderr"] = m["stderr"]
            scores = ", ".join(f"{name} {m['value']:.3f} ± {m['stderr']:.3f}"
                               for name, m in metrics.items())
            shown.append(f"{task} {scores} ({m['n']} items)")
        self.summary = f"({time.perf_counter() - start:.1f}s): {'; '.join(shown)}"
        return out

    def log(self, step: int) -> None:
        """`eval tasks at step N (12.3s): arith accuracy 0.250 ± 0.217 (4 items); ...`."""
        log.info("eval tasks at step %d %s", step, self.summary)
