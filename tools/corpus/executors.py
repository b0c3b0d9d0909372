"""Where a corpus run's tasks run: `Workers`, a process per core on this machine, or
`RayWorkers`, Ray tasks on a cluster. Both run the same task functions (module-level functions
of plain arguments: shards, the config, paths) and yield (task index, result) as tasks finish;
the runner drives both alike, so the progress bar, the files and the summary are the same.

On Ray a task's files go where its paths point, on the node that runs it: across machines the
output must be a file system every node mounts at the same path (NFS, a Filestore or EFS share,
a Lustre or GCS Fuse mount). Ray retries a task whose worker or node died (up to 3 times); a
task writes its marker last, so a retry redoes it whole. A task that fails on the user's input
(strict mode) raises that error in the driver as it is.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterator

from phijax.errors import UserError
from tools.ray_cluster import start_ray


class Workers:
    """A pool of `n` processes, started at its first use and shared by every phase (forkserver:
    the caller may run threads); n == 1 runs tasks in this process."""

    def __init__(self, n: int):
        self.n, self.pool = n, None

    def completed(self, fn: Callable, tasks: list[tuple]) -> Iterator[tuple[int, object]]:
        """(task index, result) as tasks finish."""
        if self.n == 1 or len(tasks) == 1:
            yield from ((k, fn(*task)) for k, task in enumerate(tasks))
            return
        if self.pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["tools.corpus.runner", "trafilatura"])  # once
            self.pool = ProcessPoolExecutor(self.n, mp_context=context)
        futures = {self.pool.submit(fn, *task): k for k, task in enumerate(tasks)}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class RayWorkers:
    """Each task a Ray task of one CPU, on the Ray instance this process is connected to, else
    the cluster at RAY_ADDRESS, else a new local instance of `n` CPUs (shut down at `close`)."""

    def __init__(self, n: int | None):
        self.n, self.started = n, False

    def completed(self, fn: Callable, tasks: list[tuple]) -> Iterator[tuple[int, object]]:
        import ray
        if not ray.is_initialized():
            start_ray(self.n)
            self.started = True
        remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(fn)
        refs = {remote.remote(*task): k for k, task in enumerate(tasks)}
        waiting = list(refs)
        try:
            while waiting:  # what finished in the last quarter second, in one call
                ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.25)
                for ref in ready:
                    yield refs[ref], _result(ref)
        finally:  # an error, Ctrl-C or a closed generator: the rest are not wanted
            for ref in waiting:
                ray.cancel(ref)

    def close(self) -> None:
        if self.started:
            import ray
            ray.shutdown()
            self.started = False


def _result(ref) -> object:
    """The task's result; a user's mistake raised as it is (one line), a bug with Ray's
    traceback of the task."""
    import ray
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise


def make_workers(executor: str, workers: int) -> Workers | RayWorkers:
    """`workers` processes here (0: one per core), or Ray tasks (`workers`: the CPUs of a local
    Ray instance started for the run; 0: every core)."""
    if executor == "ray":
        return RayWorkers(workers or None)
    return Workers(workers or len(os.sched_getaffinity(0)))
