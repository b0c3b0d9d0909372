"""One worker thread that owns the sampler and batches concurrent requests into one call.

Handler threads `submit` lists of sampler requests (a job) and block until they are generated.
The worker takes the first waiting job, then everything else already waiting or arriving within
`batch_wait` seconds, up to `max_batch` samples in all, and makes one `Sampler.generate` call
for the whole batch. A job that would overflow the batch opens the next one.

If a batched call fails, each job of the batch is generated again on its own, so only the
job that caused the failure gets the error. `stats()` counts calls, jobs and samples.

`paused()` holds the worker: jobs submitted meanwhile wait, and go to the sampler together
(as far as `max_batch` allows) when the block ends. With `wait_queued(n)` a caller can tell
when n jobs are waiting, which makes batching observable without relying on timing.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator

from phijax.serve.schemas import APIError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    requests: list          # list[phijax.sampling.Request]
    future: Future

    @property
    def rows(self) -> int:
        return sum(r.n for r in self.requests)


def _shutting_down() -> APIError:
    return APIError("the server is shutting down", 503, type="server_error")


class Batcher:
    """The queue and the worker thread; `close()` stops the worker (queued jobs are refused)."""

    def __init__(self, sampler, max_batch: int = 64, batch_wait: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: must be at least 1")
        self.sampler, self.max_batch, self.batch_wait = sampler, max_batch, batch_wait
        self._stats = {"generate_calls": 0, "batched_jobs": 0, "samples": 0,
                       "largest_batch": 0}
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._state = threading.Condition()   # guards _closed, _queued and _stats
        self._closed = False
        self._queued = 0                       # submitted jobs not yet handed to the sampler
        self._running = threading.Event()      # cleared while paused
        self._running.set()
        self._worker = threading.Thread(target=self._work, name="phijax-serve-worker",
                                        daemon=True)
        self._worker.start()

    # Called from any thread.

    def enqueue(self, requests: list) -> Future:
        """Queue sampler requests; the future gets `sampler.generate`'s answers for them."""
        job = _Job(requests, Future())
        with self._state:
            if self._closed:
                raise _shutting_down()
            self._queued += 1
            self._queue.put(job)  # under the lock: never behind close()'s end marker
            self._state.notify_all()
        return job.future

    def submit(self, requests: list) -> list:
        """Queue sampler requests and block until the worker has generated them."""
        return self.enqueue(requests).result()

    def stats(self) -> dict:
        with self._state:
            return dict(self._stats)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker for the block: jobs submitted meanwhile wait and are batched
        together when it ends. A batch already at the sampler finishes."""
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

    def wait_queued(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least `n` submitted jobs wait for the sampler; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self._queued >= n, timeout)

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._running.set()
        self._worker.join(timeout=60)

    # The worker: the only thread that calls the sampler.

    def _work(self) -> None:
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else self._queue.get()
            if job is None:
                break
            self._running.wait()
            jobs, carry, stop = self._collect(job)
            with self._state:
                self._queued -= len(jobs)
            self._generate(jobs)
            if stop:
                break
        self._refuse_waiting(carry)

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """The batch that starts with `first`: (jobs, the job that did not fit, end seen)."""
        jobs, rows = [first], first.rows
        deadline = time.monotonic() + self.batch_wait
        while rows < self.max_batch:
            try:  # a job already waiting is taken even once the deadline has passed
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return jobs, None, True
            if rows + nxt.rows > self.max_batch:
                return jobs, nxt, False
            jobs.append(nxt)
            rows += nxt.rows
        return jobs, None, False

    def _refuse_waiting(self, carry: _Job | None) -> None:
        leftovers = [carry] if carry is not None else []
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftovers:
            if job is not None:
                job.future.set_exception(_shutting_down())

    def _generate(self, jobs: list[_Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        try:
            results = self.sampler.generate(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"the sampler answered {len(results)} of {len(requests)} "
                                   f"requests")
        except Exception as e:  # noqa: BLE001 - answered to the caller, the worker goes on
            self._count(calls=1)
            if len(jobs) > 1:  # find the culprit: the others still get their answers
                log.warning("a batch of %d requests failed (%s); generating them one by one",
                            len(jobs), e)
                for job in jobs:
                    self._generate([job])
                return
            log.exception("generation failed")
            jobs[0].future.set_exception(e)
            return
        self._count(calls=1, jobs=len(jobs), samples=sum(job.rows for job in jobs))
        i = 0
        for job in jobs:
            job.future.set_result(results[i:i + len(job.requests)])
            i += len(job.requests)

    def _count(self, calls: int, jobs: int = 0, samples: int = 0) -> None:
        with self._state:
            self._stats["generate_calls"] += calls
            self._stats["batched_jobs"] += jobs
            self._stats["samples"] += samples
            self._stats["largest_batch"] = max(self._stats["largest_batch"], jobs)
