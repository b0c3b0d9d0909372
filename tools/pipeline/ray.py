"""The Ray executor: the same pipeline with one Ray task per output shard.

The driver first asks the endpoint for the model's context length (`check_endpoint`, as the
local executor does), then holds `state/lock`, recovers the run directory like the local
executor, scans the input once (duplicate and done seeds, which shards have work) and submits a
task for each shard with pending seeds, biggest first. Task k reads the input itself, keeps the
seeds whose shard is k, and runs them through its own async Teacher (the shared SQLite cache in
the run directory: WAL, safe across processes and nodes of a POSIX shared filesystem) with the
local executor's batching; it is the only writer of records-0000k-of-N.jsonl,
state/done-0000k.jsonl and state/failures-0000k.jsonl (same records-then-markers order, so the
same crash safety; a task Ray retries after its worker or node died recovers its own files
first). A progress actor collects each task's done count and teacher usage; the driver shows
them in a tqdm bar and writes usage.json. At the end the driver folds the per-shard logs into
state/done.jsonl and failures.jsonl, so the finished run directory has the local executor's
layout and either executor can resume it. A task that stops on a user's mistake (the endpoint
refuses the key or model) cancels the others and the driver raises that error as it is; too
many failed seeds raise `PipelineFailed`, as locally.

Each task gets the full teacher.concurrency and pipeline concurrency; requests_per_minute and
tokens_per_minute are split evenly over the tasks that can run at once (min(tasks, CPUs of the
cluster)), so the cluster as a whole stays under them. The API key is read from the driver's
environment and handed to the tasks as an argument (tasks on other nodes do not see the
driver's environment); a task puts it into its process environment only while it builds its
Teacher. The tasks import tools.pipeline: on a cluster, install phijax on the nodes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections import Counter
from typing import Any, Callable, Optional

from phijax.errors import UserError
from tools.pipeline.config import Pipeline
from tools.pipeline.local import (PendingSeeds, ProgressBar, check_failed, log_resume,
                                  make_scrub, new_counts, open_teacher, run_seeds, stderr_log,
                                  summary)
from tools.pipeline.preflight import check_endpoint
from tools.pipeline.rundir import RunDir, shard_of, sum_usage
from tools.pipeline.stage import PipelineError, StageContext
from tools.ray_cluster import one_line_error as _one_line_error, start_ray


class _Secret:
    """The API key in transit to a task; never shown in a repr, log or traceback."""

    def __init__(self, value: Optional[str]):
        self.value = value

    def __repr__(self) -> str:
        return "_Secret(***)"


class _Progress:
    """Ray actor: the shard tasks report here; the driver polls `snapshot`."""

    def __init__(self):
        self.parts: dict[int, dict] = {}     # shard -> {ok, failed, records} in its done log
        self.usages: dict[str, dict] = {}    # task attempt -> teacher usage

    def update(self, shard: int, part: dict, attempt: str, usage: dict) -> None:
        self.parts[shard] = dict(part)
        self.usages[attempt] = dict(usage)

    def snapshot(self) -> dict:
        return {"parts": self.parts, "usages": self.usages}


# ---------------------------------------------------------------- a shard task

async def _run_shard(pipe: Pipeline, shard: int, progress: Any, secret: _Secret) -> dict:
    """Process the pending seeds of one output shard, reporting to the `progress` actor."""
    run = RunDir(pipe, shard=shard)
    cache = teacher = None
    attempt = uuid.uuid4().hex
    try:
        run.open()
        scrub = make_scrub(secret.value or os.environ.get(pipe.teacher.api_key_env))
        teacher, cache = open_teacher(pipe, secret.value)
        ctx = StageContext(teacher=teacher, model=pipe.teacher.model)

        def report() -> None:
            if progress is not None:
                progress.update.remote(shard, run.part, attempt, teacher.usage)

        report()
        try:
            await run_seeds(pipe, run, ctx, scrub, new_counts(), on_flush=report,
                            select=lambda sid: shard_of(sid, pipe.shards) == shard)
        finally:
            report()
        return {"shard": shard, "part": dict(run.part), "attempt": attempt,
                "usage": dict(teacher.usage)}
    finally:
        if teacher is not None:
            await teacher.aclose()
        if cache is not None:
            cache.close()
        run.close()


def _shard_task(pipe: Pipeline, shard: int, progress: Any, secret: _Secret) -> dict:
    """The body of a Ray task: process the pending seeds of one output shard."""
    return asyncio.run(_run_shard(pipe, shard, progress, secret))


# ---------------------------------------------------------------- the driver

def _scan(pipe: Pipeline, run: RunDir) -> tuple[int, dict, dict[int, int]]:
    """One pass over the input: the number of seeds, this run's counts (duplicate and skipped
    seeds) and the number of seeds to do per shard."""
    counts = new_counts()
    todo = Counter(shard_of(sid, pipe.shards) for sid, _ in PendingSeeds(pipe, run, counts, None))
    return sum(todo.values()) + counts["duplicate"] + counts["skipped"], counts, dict(todo)


async def _check_endpoint(pipe: Pipeline) -> None:
    """`check_endpoint` with a Teacher of the driver's own, closed again."""
    teacher, _ = open_teacher(pipe, with_cache=False)
    try:
        await check_endpoint(pipe.stages, teacher)
    finally:
        await teacher.aclose()


class _Driver:
    """The driver's view of the shard tasks: their reports folded into done counts and teacher
    usage, shown in the progress bar and written to usage.json."""

    def __init__(self, pipe: Pipeline, run: RunDir, bar: ProgressBar,
                 scrub: Callable[[str], str]):
        self.pipe, self.run, self.bar, self.scrub = pipe, run, bar, scrub
        self.already, self.failed_before = len(run.done), run.failed
        self.base_records = run.records_written
        self.parts: dict[int, dict] = {}     # shard -> its done log's {ok, failed, records}
        self.usages: dict[str, dict] = {}    # task attempt -> teacher usage
        self.part = {"ok": 0, "failed": 0, "records": 0}
        self.usage: dict = {}
        self.actor = None
        self.ended = True                    # no task is writing

    def merge(self, snap: dict) -> None:
        """Fold in a report; every number only grows, so the largest is the latest."""
        for src, dst in ((snap["parts"], self.parts), (snap["usages"], self.usages)):
            for key, d in src.items():
                old = dst.setdefault(key, {})
                for name, v in d.items():
                    old[name] = max(old.get(name, v), v)
        self.part = {k: sum(q.get(k, 0) for q in self.parts.values()) for k in self.part}
        self.usage = sum_usage(*self.usages.values())

    def counts(self) -> dict:
        """The run's seeds_done, seeds_failed and records while tasks still run."""
        return {"seeds_done": self.already - self.failed_before + self.part["ok"],
                "seeds_failed": self.failed_before + self.part["failed"],
                "records": self.base_records + self.part["records"]}

    def show(self, force: bool = False) -> None:
        self.bar.update(self.already + self.part["ok"] + self.part["failed"],
                        self.failed_before + self.part["failed"], self.usage, force)

    def submit(self, todo: dict[int, int], api_key: Optional[str],
               task_num_cpus: float) -> list:
        """One task per shard with work, biggest first; the teacher's rate limits split over
        the tasks that can run at once."""
        import ray
        cpus = ray.cluster_resources().get("CPU", 1)
        parallel = max(1, min(len(todo), int(cpus // max(task_num_cpus, 1e-3))))
        t = self.pipe.teacher
        teacher = dataclasses.replace(t, **{k: getattr(t, k) / parallel for k in
                                            ("requests_per_minute", "tokens_per_minute")
                                            if getattr(t, k)})
        task_pipe = dataclasses.replace(self.pipe, teacher=teacher)
        self.actor = ray.remote(num_cpus=0)(_Progress).remote()
        task = ray.remote(num_cpus=task_num_cpus, max_retries=3,
                          retry_exceptions=False)(_shard_task)
        secret = _Secret(api_key)
        self.ended = False
        return [task.remote(task_pipe, k, self.actor, secret)
                for k in sorted(todo, key=lambda k: -todo[k])]

    def _collect(self, ref) -> Optional[BaseException]:
        """Fold in a finished task's result; the error of a task that failed for good."""
        import ray
        try:
            res = ray.get(ref)
        except Exception as e:
            return getattr(e, "cause", None) or e
        self.merge({"parts": {res["shard"]: res["part"]}, "usages": {res["attempt"]: res["usage"]}})
        return None

    def wait(self, refs: list, poll_s: float) -> None:
        """Until every task ended: poll the progress actor, show it, save usage each second.
        The first task that fails for good cancels the others and fails the run; Ctrl-C
        cancels them all (each commits what it finished, as a local run does)."""
        import ray
        waiting, last_usage, error = list(refs), 0.0, None
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=poll_s)
                self.merge(ray.get(self.actor.snapshot.remote()))
                for ref in ready:
                    failure = self._collect(ref)
                    if failure is not None and error is None:
                        error = failure
                        for other in waiting:
                            ray.cancel(other)
                self.show()
                if time.monotonic() - last_usage > 1.0:
                    last_usage = time.monotonic()
                    self.run.write_usage(self.usage, self.counts(), self.scrub)
            self.ended = True
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref)
            _, left = ray.wait(list(refs), num_returns=len(refs), timeout=30)
            self.ended = not left
            raise
        if isinstance(error, UserError):
            raise error
        if error is not None:
            raise PipelineError(f"ray: shard task failed: {_one_line_error(error)}")

    def finish(self) -> None:
        """The last reports in; with no task writing any more, the per-shard logs folded into
        the main ones; usage.json and the bar brought up to date."""
        if self.actor is not None:
            import ray
            try:
                self.merge(ray.get(self.actor.snapshot.remote(), timeout=10))
            except Exception:
                pass
        if self.ended:
            self.run.consolidate()
        self.run.write_usage(self.usage, self.run.counts() if self.ended else self.counts(),
                             self.scrub)
        self.show(force=True)
        self.bar.close()


def run_pipeline_ray(pipe: Pipeline, *, progress: bool = True, retry_failed: bool = False,
                     num_cpus: Optional[int] = None, task_num_cpus: float = 1.0,
                     poll_s: float = 0.25, log: Callable[[str], None] = stderr_log) -> dict:
    """Run (or resume) a pipeline on Ray, one task per output shard; same records, same run
    directory and same summary as `run_pipeline`. Uses the Ray instance this process is
    connected to, else `ray.init()`: the cluster at RAY_ADDRESS, or a new local instance with
    `num_cpus` (default: all) that is shut down at the end."""
    try:
        import ray
    except ImportError:
        raise PipelineError("ray is not installed; pip install ray") from None
    # Tasks may run in another working directory (or node): paths resolved on the driver.
    pipe = dataclasses.replace(pipe, input=pipe.input.resolve(), output=pipe.output.resolve(),
                               cache=pipe.cache.resolve() if pipe.cache is not None else None)
    asyncio.run(_check_endpoint(pipe))   # before the run directory is touched
    run = RunDir(pipe)
    started = False
    try:
        log_resume(run.open(retry_failed=retry_failed), log)
        api_key = os.environ.get(pipe.teacher.api_key_env) or None
        total, counts, todo = _scan(pipe, run)
        if todo and not ray.is_initialized():
            start_ray(num_cpus, PipelineError)
            started = True
        driver = _Driver(pipe, run, ProgressBar(progress, total, len(run.done), pipe.output.name),
                         make_scrub(api_key))
        t0 = time.monotonic()
        try:
            if todo:
                driver.wait(driver.submit(todo, api_key, task_num_cpus), poll_s)
        finally:
            driver.finish()
        counts.update(ok=driver.part["ok"], failed=driver.part["failed"])
        result = summary(run, counts, time.monotonic() - t0, driver.usage, pipe, log)
        check_failed(run, pipe, result)
        return result
    finally:
        run.close()
        if started:
            ray.shutdown()
