"""The local executor: one process, one async teacher, `pipe.concurrency` seeds in flight.

Each seed runs through every stage (`process_seed`); finished seeds are committed to the run
directory in batches (`RunDir.commit`: records, then done markers), at the latest every
`flush_interval_s`, and whatever finished is committed on error or Ctrl-C too. A rerun skips
the seeds already done, so an interrupted run resumes where it stopped.

A seed whose stage fails (`StageError`, or a `TeacherError` after the teacher's retries) is
recorded in failures.jsonl with its cause; a teacher that refuses the client or model
(`TeacherRefused`) stops the whole run at once, its seeds left to do for a rerun. At the end,
`check_failed` fails the run (`PipelineFailed`) when more than `max_failed_fraction` of its
seeds failed, or all of them.
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from tools.pipeline.config import Pipeline
from tools.pipeline.preflight import check_endpoint
from tools.pipeline.rundir import Batch, RunDir, iter_seeds, seed_id_of
from tools.pipeline.stage import PipelineFailed, StageContext, StageError, now
from tools.teacher import Teacher, TeacherError, TeacherRefused


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def new_counts() -> dict:
    """This run's seeds: ok, failed, skipped (done before) and duplicate (a repeated id)."""
    return {"ok": 0, "failed": 0, "skipped": 0, "duplicate": 0}


def make_scrub(secret: Optional[str]) -> Callable[[str], str]:
    """A function that blanks `secret` out of text written to the run directory."""
    if not secret or len(secret) < 4:
        return lambda text: text
    return lambda text: text.replace(secret, "***")


def open_teacher(pipe: Pipeline, api_key: Optional[str] = None,
                 with_cache: bool = True) -> tuple[Teacher, Any]:
    """The pipeline's Teacher and its Cache (None without one, or without `with_cache`).
    `api_key` (a Ray task gets the driver's) is put in the environment only while the client
    is built."""
    cache = None
    if pipe.cache is not None and with_cache:
        from tools.cache import Cache
        cache = Cache(pipe.cache)
    name = pipe.teacher.api_key_env
    old = os.environ.get(name)
    if api_key:
        os.environ[name] = api_key
    try:
        return Teacher(pipe.teacher, cache=cache), cache
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    finally:
        if api_key:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


async def process_seed(pipe: Pipeline, seed: dict, seed_id: str,
                       ctx: StageContext) -> tuple[list[dict], Optional[dict]]:
    """Run every stage; returns (records, None) or ([], failure record)."""
    rec = {k: v for k, v in seed.items() if k not in ("id", "provenance")}
    rec["id"] = seed_id
    rec["provenance"] = {"seed_id": seed_id, "stages": []}
    records = [rec]
    for stage in pipe.stages:
        try:
            outs = await asyncio.gather(*(stage.run(r, ctx) for r in records))
        except TeacherRefused:
            raise   # no other seed can get past it either: the run stops
        except (TeacherError, StageError) as e:
            reason = f"{type(e).__name__}: {str(e).strip()}"
            return [], {"seed_id": seed_id, "stage": stage.name, "reason": reason,
                        "kind": failure_kind(e), "time": now()}
        records = [o for out in outs for o in out]
        if not records:
            break
    return records, None


def failure_kind(e: Exception) -> str:
    """The cause of a seed's failure in a few words, for counting failures by cause: the
    teacher's `kind` ("finish_reason length", "HTTP 500"), else the message without the
    record's id."""
    kind = getattr(e, "kind", None) or re.sub(r"\brecord '[^']*'", "record", str(e).strip())
    return f"{type(e).__name__}: {kind}"


def check_failed(run: RunDir, pipe: Pipeline, result: dict) -> None:
    """Raise `PipelineFailed` (one line: counts by cause) when more than
    `pipe.max_failed_fraction` of the run directory's seeds failed, or all of them."""
    total, failed = len(run.done), run.failed
    if not failed or (failed < total and failed <= pipe.max_failed_fraction * total):
        return
    kinds = Counter(f.get("kind") or str(f.get("reason", "")).split(":")[0]
                    for f in run.failures())
    causes = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
    raise PipelineFailed(f"{failed} of {total} seeds failed ({causes}); "
                         f"{run.main_failures_path} has each", result)


class PendingSeeds:
    """The input's seeds that are still to do: each seed id once, not done in `run`, and
    (with `select`) selected by id; `counts` gets the duplicates and skipped ones."""

    def __init__(self, pipe: Pipeline, run: RunDir, counts: dict,
                 select: Optional[Callable[[str], bool]]):
        self.seeds = iter_seeds(pipe.input)
        self.run, self.counts, self.select = run, counts, select
        self.seen: set[str] = set()

    def __iter__(self):
        return iter(self.next, None)

    def next(self) -> Optional[tuple[str, dict]]:
        for _, obj in self.seeds:
            sid = seed_id_of(obj)
            if self.select is not None and not self.select(sid):
                continue
            if sid in self.seen:
                self.counts["duplicate"] += 1
                continue
            self.seen.add(sid)
            if sid in self.run.done:
                self.counts["skipped"] += 1
                continue
            return sid, obj
        return None


async def run_seeds(pipe: Pipeline, run: RunDir, ctx: StageContext,
                    scrub: Callable[[str], str], counts: dict, *,
                    select: Optional[Callable[[str], bool]] = None,
                    on_flush: Optional[Callable[[], None]] = None,
                    on_seed: Optional[Callable[[], None]] = None) -> None:
    """Process every seed of the input not yet done in `run` (with `select`, only the seeds it
    selects by id), `pipe.concurrency` at a time, committing finished seeds in batches;
    `counts` is updated in place. Whatever finished is committed even on error or cancel."""
    pending: Batch = []
    seeds = PendingSeeds(pipe, run, counts, select)
    stop = asyncio.Event()

    def flush() -> None:
        if pending:
            batch = pending[:]
            pending.clear()
            run.commit(batch, scrub)
            if on_flush is not None:
                on_flush()

    async def worker() -> None:
        while (item := seeds.next()) is not None:
            records, failure = await process_seed(pipe, item[1], item[0], ctx)
            pending.append((item[0], records, failure))
            counts["failed" if failure else "ok"] += 1
            if on_seed is not None:
                on_seed()
            if len(pending) >= pipe.batch_size:
                flush()

    async def flusher() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), pipe.flush_interval_s)
            except asyncio.TimeoutError:
                pass
            flush()

    flush_task = asyncio.create_task(flusher())
    try:
        workers = [asyncio.create_task(worker()) for _ in range(pipe.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    finally:
        stop.set()
        flush_task.cancel()
        await asyncio.gather(flush_task, return_exceptions=True)
        flush()   # whatever finished, even on error / Ctrl-C


class ProgressBar:
    """A tqdm bar of seeds done with failed seeds, tokens, cost and cache hits beside it; does
    nothing when not `enabled`."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        self.last = 0.0
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="seed", dynamic_ncols=True,
                            smoothing=0.1, desc=desc)

    def update(self, done: int, failed: int, usage: dict, force: bool = False) -> None:
        """Show `done` seeds (when more than shown) and the figures (at most 4 times a second
        unless `force`)."""
        if self.bar is None:
            return
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        t = time.monotonic()
        if force or t - self.last >= 0.25:
            self.last = t
            tokens = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
            self.bar.set_postfix(failed=failed, tokens=tokens,
                                 cost=f"${usage.get('cost', 0.0):.4f}",
                                 cached=usage.get("cache_hits", 0), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def count_seeds(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def log_resume(stats: dict, log: Callable[[str], None]) -> None:
    if stats["truncated_bytes"] or stats["dropped_records"] or stats["dropped_failures"]:
        log(f"resume: truncated {stats['truncated_bytes']} bytes of partial lines, dropped "
            f"{stats['dropped_records']} records and {stats['dropped_failures']} failures "
            f"of unfinished seeds")


def summary(run: RunDir, counts: dict, seconds: float, usage: dict, pipe: Pipeline,
            log: Callable[[str], None]) -> dict:
    """What `run_pipeline` and `run_pipeline_ray` return (and the command prints)."""
    if counts["duplicate"]:
        log(f"input: {counts['duplicate']} seeds repeat an earlier seed id and were skipped")
    usage = {**dict(requests=0, cache_hits=0, retries=0, failures=0, prompt_tokens=0,
                    completion_tokens=0, cost=0.0), **usage}
    return {"seeds": len(run.done), "seeds_ok": len(run.done) - run.failed,
            "seeds_failed": run.failed, "records": run.records_written,
            "this_run": {"ok": counts["ok"], "failed": counts["failed"],
                         "skipped": counts["skipped"], "duplicate_ids": counts["duplicate"],
                         "seconds": round(seconds, 3)},
            "usage": usage, "output": str(pipe.output)}


async def run_pipeline(pipe: Pipeline, *, progress: bool = True, retry_failed: bool = False,
                       teacher: Any = None, log: Callable[[str], None] = stderr_log) -> dict:
    """Run (or resume) a pipeline in this process; returns a summary dict. `teacher` replaces
    the Teacher built from `pipe.teacher` (tests, custom clients). Raises `PipelineFailed`
    (after writing everything) when too many seeds failed, `TeacherRefused` when the endpoint
    refuses, and `PipelineError` when a stage's max_tokens cannot fit the served context."""
    run = RunDir(pipe)
    cache = None
    own_teacher = teacher is None
    try:
        if own_teacher:
            teacher, _ = open_teacher(pipe, with_cache=False)
        await check_endpoint(pipe.stages, teacher)   # before the run directory is touched
        log_resume(run.open(retry_failed=retry_failed), log)
        scrub = make_scrub(os.environ.get(pipe.teacher.api_key_env))
        if own_teacher and pipe.cache is not None:
            from tools.cache import Cache
            cache = teacher.cache = Cache(pipe.cache)
        ctx = StageContext(teacher=teacher, model=pipe.teacher.model)
        already, failed_before = len(run.done), run.failed
        bar = ProgressBar(progress, count_seeds(pipe.input), already, pipe.output.name)
        counts = new_counts()

        def show(force: bool = False) -> None:
            bar.update(already + counts["ok"] + counts["failed"],
                       failed_before + counts["failed"], teacher.usage, force)

        def save_usage() -> None:
            run.write_usage(dict(teacher.usage), run.counts(), scrub)

        t0 = time.monotonic()
        try:
            await run_seeds(pipe, run, ctx, scrub, counts, on_seed=show, on_flush=save_usage)
        finally:
            save_usage()
            show(force=True)
            bar.close()
        result = summary(run, counts, time.monotonic() - t0, teacher.usage, pipe, log)
        check_failed(run, pipe, result)
        return result
    finally:
        if own_teacher and teacher is not None:
            await teacher.aclose()
        if cache is not None:
            cache.close()
        run.close()
