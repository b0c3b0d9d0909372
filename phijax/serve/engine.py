"""The engine: one worker thread that owns the sampler and batches requests continuously.

A `Job` is one HTTP request's work: sampler requests to generate, or prompts to score. Jobs
arrive from any thread (`submit`). The worker keeps one `phijax.rows.Rows` batch running; at
each segment boundary it drops the rows of cancelled jobs (a client that went away) and rows a
job no longer needs (`stop_row`: a stop string was found in its text), scores the waiting
prompts, prefills the jobs that arrived and merges them into the batch (up to `max_batch` rows
in all; a job larger than that runs when the batch is empty), runs the next decode segment of
`segment` steps, and hands each job its rows' new tokens. A job's events go to its sink, from
the worker thread: ("tokens", [Emit]) with owners (request index, sample index), ("scores",
[Scored]), ("done", None) once every row has finished, or ("error", exception).

Failures stay with the job that causes them. If admitting several jobs fails, each is admitted
on its own, and only one that fails alone gets the error. If a decode segment fails, the batch
is dropped and each of its jobs resumes alone, from its prompts and the tokens it already has
(the tokens it would have got: a row's randomness depends only on its seed, sample and step);
a job that fails when alone gets the error, and the others go on.

`paused()` holds the worker at a boundary: jobs submitted meanwhile are admitted together when
it ends; `wait_queued(n)` tells when n jobs wait. `stats()` counts admissions, segments, jobs
and rows, and the seconds spent admitting (prefill and merge) and decoding.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from typing import Callable, Iterator

from phijax.errors import ConfigError
from phijax.rows import Rows, Seq
from phijax.sampling import Collect, Request, Sample
from phijax.serve.schemas import APIError

log = logging.getLogger(__name__)


class Job:
    """Sampler requests to generate (or prompts to score, with `top` most likely tokens per
    position); `sink(event)` receives its events from the worker thread."""

    def __init__(self, requests: list[Request] = (), sink: Callable | None = None,
                 score: list[list[int]] | None = None, top: int = 0):
        self.requests, self.score, self.top = list(requests), score, top
        self.sink = sink if sink is not None else queue.Queue().put
        self.cancelled = False
        self.suspect = False  # in a batch whose segment failed: runs alone from now on
        self.stopping: list[tuple[int, int]] = []    # rows the client needs no more (any thread)
        self.stopped: set[tuple[int, int]] = set()   # the same, seen by the worker
        self.tokens = {(i, j): [] for i, r in enumerate(self.requests) for j in range(r.n)}
        self.finished: set[tuple[int, int]] = set()

    @property
    def open_rows(self) -> int:
        return len(self.tokens) - len(self.finished)

    def seqs(self) -> list[Seq]:
        """The prefills of its unfinished rows: rows with no tokens yet share one per request;
        a row that has tokens (resuming) continues from its prompt and those tokens."""
        out = []
        for i, r in enumerate(self.requests):
            todo = [j for j in range(r.n) if (i, j) not in self.finished | self.stopped]
            fresh = [((self, i, j), j, 0) for j in todo if not self.tokens[i, j]]
            if fresh:
                out.append(Seq(r.prompt, r, fresh))
            out += [Seq(r.prompt + self.tokens[i, j], r, [((self, i, j), j, len(self.tokens[i, j]))])
                    for j in todo if self.tokens[i, j]]
        return out


def shutting_down() -> APIError:
    return APIError("the server is shutting down", 503, type="server_error")


class Engine:
    """The job queue and the worker thread; `close()` stops it (waiting jobs get a 503)."""

    def __init__(self, sampler, max_batch: int = 64, segment: int = 8,
                 batch_wait: float = 0.005):
        if max_batch < 1:
            raise ConfigError(f"max_batch {max_batch}: must be at least 1")
        if segment < 1:
            raise ConfigError(f"segment {segment}: must be at least 1")
        self.sampler, self.max_batch, self.batch_wait = sampler, max_batch, batch_wait
        self.rows = Rows(sampler, segment)
        self._queue: collections.deque[Job] = collections.deque()
        self._running: dict[Job, None] = {}   # jobs with rows in the batch, in order
        self._cond = threading.Condition()    # guards the queue, flags and stats
        self._closed = self._paused = False
        self._stats = {"admissions": 0, "admitted_jobs": 0, "largest_admission": 0,
                       "segments": 0, "scored_prompts": 0, "samples": 0, "largest_batch": 0,
                       "failures": 0, "admit_s": 0.0, "decode_s": 0.0}
        self._worker = threading.Thread(target=self._work, name="phijax-serve-engine",
                                        daemon=True)
        self._worker.start()

    # Called from any thread.

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise shutting_down()
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job (its rows leave the batch at the next boundary); no more events."""
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def stop_row(self, job: Job, i: int, j: int) -> None:
        """Row j of request i needs no more tokens (it counts as finished)."""
        with self._cond:
            job.stopping.append((i, j))

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        """`Sampler.generate` through the engine: blocks until the requests are done."""
        self.sampler.check(requests)
        events: queue.Queue = queue.Queue()
        self.submit(Job(requests, events.put))
        got = Collect()
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                return [[got.sample((i, j), r) for j in range(r.n)]
                        for i, r in enumerate(requests)]
            got.add(payload)

    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker at the next boundary for the block."""
        with self._cond:
            self._paused = True
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def wait_queued(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least `n` jobs wait to be admitted; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= n, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=60)

    # The worker: the only thread that touches the sampler and the batch.

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or not self._paused and (
                    self._queue or self.rows.live))
                if self._closed:
                    break
                if not self.rows.live and self.batch_wait:  # let a burst arrive together
                    self._cond.wait(self.batch_wait)
                self._drop_stopped()
                scores, jobs = self._take()
            try:
                for job in scores:
                    self._score(job)
                self._admit(jobs)
                if self.rows.live:
                    self._segment()
            except Exception as e:  # noqa: BLE001 - a bug: fail what is running, go on
                log.exception("the engine failed")
                self.rows.reset()
                for job in dict.fromkeys(list(self._running) + jobs):
                    job.sink(("error", e))
                self._running.clear()
        with self._cond:
            waiting = list(self._running) + list(self._queue)
            self._queue.clear()
        for job in waiting:
            job.sink(("error", shutting_down()))

    def _drop_stopped(self) -> None:
        """Rows of cancelled jobs, and rows their jobs stopped, leave the batch."""
        for job in [j for j in self._queue if j.cancelled]:
            self._queue.remove(job)
        for job in list(self._running) + list(self._queue):
            job.stopped.update(job.stopping)
            job.stopping.clear()
        for owner in self.rows.cancel(lambda o: o[0].cancelled or o[1:] in o[0].stopped):
            job = owner[0]
            job.finished.add(owner[1:])
            if job.cancelled:
                self._running.pop(job, None)
            elif not job.open_rows:
                self._finish(job)

    def _take(self) -> tuple[list[Job], list[Job]]:
        """(scoring jobs, generation jobs to admit now): in order, as many as fit."""
        scores = [j for j in self._queue if j.score is not None]
        for job in scores:
            self._queue.remove(job)
        if any(j.suspect for j in self._running):  # a job that failed runs alone
            return scores, []
        room, jobs = self.max_batch - self.rows.live, []
        while self._queue:
            job = self._queue[0]
            alone = not self.rows.live and not jobs
            if (job.suspect and not alone) or (job.open_rows > room and not alone):
                break
            jobs.append(self._queue.popleft())
            room -= job.open_rows
            if job.suspect:
                break
        return scores, jobs

    def _score(self, job: Job) -> None:
        try:
            scored = self.sampler.prompt_logprobs(job.score, job.top)
        except Exception as e:  # noqa: BLE001 - answered to the job, the worker goes on
            log.exception("scoring failed")
            self._count(failures=1)
            job.sink(("error", e))
            return
        self._count(scored_prompts=len(job.score))
        job.sink(("scores", scored))

    def _admit(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        start = time.perf_counter()
        try:
            emits = self.rows.admit([s for job in jobs for s in job.seqs()])
        except Exception as e:  # noqa: BLE001 - answered to the job, the worker goes on
            if len(jobs) > 1:  # find the culprit: the others still get their tokens
                log.warning("admitting %d jobs failed (%s); admitting them one by one",
                            len(jobs), e)
                for job in jobs:
                    self._admit([job])
                return
            log.exception("admitting a job failed")
            self._count(failures=1)
            jobs[0].sink(("error", e))
            return
        for job in jobs:
            self._running[job] = None
        self._count(admissions=1, admitted_jobs=len(jobs), largest_admission=len(jobs),
                    samples=sum(len(j.tokens) for j in jobs),
                    admit_s=time.perf_counter() - start)
        self._dispatch(emits)

    def _segment(self) -> None:
        live, start = self.rows.live, time.perf_counter()
        try:
            emits = self.rows.step()
        except Exception as e:  # noqa: BLE001 - the batch is gone; its jobs resume alone
            jobs = list(self._running)
            self._running.clear()
            self._count(failures=1)
            if len(jobs) == 1 and jobs[0].suspect:
                log.exception("a decode segment failed")
                jobs[0].sink(("error", e))
                return
            log.warning("a decode segment of %d jobs failed (%s); resuming each alone",
                        len(jobs), e)
            with self._cond:
                for job in reversed(jobs):
                    job.suspect = True
                    self._queue.appendleft(job)
            return
        self._count(segments=1, largest_batch=live, decode_s=time.perf_counter() - start)
        self._dispatch(emits)

    def _dispatch(self, emits) -> None:
        """Each job's new tokens to its sink; "done" to the jobs whose rows all finished."""
        by_job: dict[Job, list] = {}
        for e in emits:
            job, i, j = e.owner
            job.tokens[i, j] += e.tokens
            if e.done:
                job.finished.add((i, j))
            by_job.setdefault(job, []).append(e._replace(owner=(i, j)))
        for job, mine in by_job.items():
            if not job.cancelled:
                job.sink(("tokens", mine))
            if not job.open_rows:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        self._running.pop(job, None)
        if not job.cancelled:
            job.sink(("done", None))

    def _count(self, **counts) -> None:
        with self._cond:
            for k, v in counts.items():
                if k.startswith("largest"):
                    self._stats[k] = max(self._stats[k], v)
                else:
                    self._stats[k] += v
