"""The run directory of a pipeline: output shards and crash-safe logs of what is done.

    records-00000-of-00004.jsonl ...   output records (only records, nothing else)
    failures.jsonl                     {"seed_id", "stage", "reason", "kind", "time"} per
                                       failed seed (`kind`: the cause in a few words)
    usage.json                         requests, cache hits, retries, tokens, cost (cumulative)
    cache.sqlite                       teacher responses (tools.cache), so reruns never pay twice
    state/done.jsonl                   {"seed_id", "status": ok|failed, "records": n} per seed
    state/pipeline.json                fingerprint of shards + stages (reruns must match)
    state/lock                         flock: one runner per run directory
    state/done-0000k.jsonl             Ray executor, while it runs: shard k's task's done
    state/failures-0000k.jsonl           markers and failures (folded into done.jsonl and
    state/lock-0000k                     failures.jsonl when the tasks end, or on the next start)

Crash safety (SIGKILL at any instant): records and failures are appended as whole lines,
flushed and fsynced per batch, and only then is the batch's `done` marker line appended and
fsynced. On start, any partial trailing line is truncated from every log, and records or
failures of seeds without a done marker are dropped (the log is rewritten atomically), so those
seeds are simply processed again (the teacher cache answers them for free). A seed with a done
marker is skipped. The result is exactly the set of records an uninterrupted run gives.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from phijax.errors import ConfigError
from phijax.files import atomic_write, fsync_dir, jsonl_line, read_jsonl
from phijax.hashing import canonical_json, sha256_hex
from tools.pipeline.stage import PipelineError, now

Batch = list[tuple[str, list[dict], Optional[dict]]]   # (seed id, records, failure or None)


def seed_id_of(record: dict) -> str:
    """The seed's `id` (as a string), or `sha256:<16 hex>` of its canonical JSON."""
    if record.get("id") is not None:
        return str(record["id"])
    return "sha256:" + sha256_hex(canonical_json(record))[:16]


def shard_of(seed_id: str, shards: int) -> int:
    return int(sha256_hex(seed_id)[:16], 16) % shards


def shard_path(output: str | Path, shard: int, shards: int) -> Path:
    return Path(output) / f"records-{shard:05d}-of-{shards:05d}.jsonl"


def read_records(output: str | Path) -> list[dict]:
    """All output records of a run directory (every shard), in file order."""
    return [obj for p in sorted(Path(output).glob("records-*-of-*.jsonl"))
            for _, obj in read_jsonl(p)]


def iter_seeds(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, seed) of the input file; a bad line fails naming `input` and file:line."""
    try:
        yield from read_jsonl(path)
    except ConfigError as e:
        raise PipelineError(f"input: {e}") from None


# ---------------------------------------------------------------- log files

def _log(path: Path) -> list[dict]:
    """The objects of a log file of the run directory ([] when it does not exist)."""
    if not path.exists():
        return []
    try:
        return [obj for _, obj in read_jsonl(path)]
    except ConfigError as e:
        raise PipelineError(f"output: {e} (edit or remove the line, then rerun)") from None


def _truncate_partial_line(path: Path) -> int:
    """Cut a trailing line that has no newline (a write interrupted by a crash); returns the
    number of bytes dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    size = path.stat().st_size
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos, keep = size, 0
        while pos > 0:   # scan backwards for the last newline
            start = max(0, pos - (1 << 16))
            f.seek(start)
            j = f.read(pos - start).rfind(b"\n")
            if j >= 0:
                keep = start + j + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def _filter_log(path: Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite `path` atomically keeping the lines where keep(obj); returns the number dropped."""
    objs = _log(path)
    kept = [obj for obj in objs if keep(obj)]
    if len(kept) != len(objs):
        atomic_write(path, "".join(map(jsonl_line, kept)))
    return len(objs) - len(kept)


def sum_usage(*usages: dict) -> dict:
    """The numbers of several usage records (requests, tokens, cost ...) added up."""
    total: dict = {}
    for u in usages:
        for k, v in u.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def _part_paths(state: Path, kind: str) -> list[Path]:
    """The per-shard logs `state/<kind>-0000k.jsonl` written by Ray shard tasks."""
    return sorted(p for p in state.glob(f"{kind}-*.jsonl")
                  if re.fullmatch(rf"{kind}-\d{{5}}\.jsonl", p.name))


# Fault injection for the crash tests: TOOLS_PIPELINE_CRASH="<point>:<n>" SIGKILLs this process
# the n-th time it reaches <point>: "torn" (half of a records batch written), "records" (records
# fsynced, done markers not yet written) or "done" (done markers written). Unset: no effect.
_CRASH = os.environ.get("TOOLS_PIPELINE_CRASH", "")
_crash_counts: dict[str, int] = {}


def _crashpoint(point: str) -> bool:
    if not _CRASH.startswith(point + ":"):
        return False
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    return _crash_counts[point] >= int(_CRASH.split(":", 1)[1])


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the run directory

class RunDir:
    """The run directory's files; all appends are whole lines, fsynced per batch.

    `RunDir(pipe)` is the whole run (the local executor, and the Ray driver): it holds
    `state/lock`, appends to `state/done.jsonl` and `failures.jsonl`. `RunDir(pipe, shard=k)`
    is one Ray shard task: it holds `state/lock-0000k`, writes only records-0000k-of-N.jsonl,
    `state/done-0000k.jsonl` and `state/failures-0000k.jsonl` (one writer per file), and reads
    `state/done.jsonl` (which nobody writes while shard tasks run). The whole-run `open()`
    first folds any per-shard logs into done.jsonl / failures.jsonl, so both executors share
    one layout and either can resume the other's run.
    """

    def __init__(self, pipe: Any, shard: Optional[int] = None):
        self.pipe = pipe
        self.shard = shard
        self.root = Path(pipe.output)
        self.state = self.root / "state"
        self.main_done_path = self.state / "done.jsonl"
        self.main_failures_path = self.root / "failures.jsonl"
        if shard is None:
            self.done_path, self.failures_path = self.main_done_path, self.main_failures_path
        else:
            self.done_path = self.state / f"done-{shard:05d}.jsonl"
            self.failures_path = self.state / f"failures-{shard:05d}.jsonl"
        self.usage_path = self.root / "usage.json"
        self.shard_paths = [shard_path(self.root, k, pipe.shards) for k in range(pipe.shards)]
        self._lock_fd: Optional[int] = None
        self._files: dict[Path, Any] = {}
        self.done: dict[str, str] = {}      # seed id -> "ok" | "failed"
        self.records_written = 0
        self.base_usage: dict = {}
        # shard tasks: what this shard's own done log holds (all attempts of this run)
        self.part = {"ok": 0, "failed": 0, "records": 0}

    @property
    def failed(self) -> int:
        return sum(1 for v in self.done.values() if v == "failed")

    def _lock(self, name: str, wait_s: float = 0.0) -> None:
        self._lock_fd = os.open(str(self.state / name), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._lock_fd)
                    self._lock_fd = None
                    what = "another run" if self.shard is None else \
                        f"another task of shard {self.shard}"
                    raise PipelineError(f"output: {what} is using {self.root}") from None
                time.sleep(0.1)

    def _check_fingerprint(self) -> None:
        fp_path = self.state / "pipeline.json"
        fp = json.loads(canonical_json(self.pipe.fingerprint()))
        if not fp_path.exists():
            atomic_write(fp_path, json.dumps(fp, indent=1) + "\n")
            return
        old = json.loads(fp_path.read_text())
        if old != fp:
            what = "shards" if old.get("shards") != fp["shards"] else "stages"
            raise PipelineError(f"output: {self.root} holds a run of a different pipeline "
                                f"({what} changed); use a new output directory")

    def open(self, retry_failed: bool = False) -> dict:
        """Lock and recover the run directory; returns what recovery cut (truncated_bytes,
        dropped_records, dropped_failures)."""
        if self.shard is not None:
            return self._open_shard()
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock("lock")
        self._check_fingerprint()
        stats = {"truncated_bytes": 0, "dropped_records": 0, "dropped_failures": 0}
        parts = _part_paths(self.state, "done") + _part_paths(self.state, "failures")
        for p in [self.done_path, self.failures_path, *self.shard_paths, *parts]:
            stats["truncated_bytes"] += _truncate_partial_line(p)
        for other in self.root.glob("records-*-of-*.jsonl"):
            if other not in self.shard_paths:  # cannot happen with a matching fingerprint
                raise PipelineError(f"output: {other} belongs to a run with another shard count")
        self.consolidate()
        if retry_failed:
            self._filter(self.done_path, lambda o: o.get("status") != "failed")
        self.done = {o["seed_id"]: o["status"] for o in _log(self.done_path)}
        self.records_written = 0
        # Drop outputs of seeds without a done marker (a crash between the two writes),
        # and any duplicate (defensive: cannot happen when markers follow their records).
        for p in self.shard_paths:
            stats["dropped_records"] += self._drop_unmarked_records(p)
        stats["dropped_failures"] = self._drop_unmarked_failures()
        if self.usage_path.exists():
            try:
                self.base_usage = json.loads(self.usage_path.read_text()).get("total", {})
            except (json.JSONDecodeError, AttributeError):
                self.base_usage = {}
        return stats

    def _drop_unmarked_failures(self) -> int:
        """Keep one failure line per seed whose done marker says failed; drop the rest."""
        seen: set[str] = set()

        def keep(o):
            ok = self.done.get(o.get("seed_id")) == "failed" and o.get("seed_id") not in seen
            seen.add(o.get("seed_id"))
            return ok
        return self._filter(self.failures_path, keep)

    def _drop_unmarked_records(self, p: Path) -> int:
        seen: set[str] = set()

        def keep(o):
            ok = (self.done.get(o.get("provenance", {}).get("seed_id")) == "ok"
                  and o.get("id") not in seen)
            seen.add(o.get("id"))
            self.records_written += ok
            return ok
        return self._filter(p, keep)

    def consolidate(self) -> int:
        """Fold the per-shard logs of Ray shard tasks (state/done-0000k.jsonl,
        state/failures-0000k.jsonl) into done.jsonl / failures.jsonl, then delete them; only
        while no shard task runs (under `state/lock`). Idempotent: a crash mid-way leaves
        duplicates that are skipped here and dropped by `open`. Returns the markers moved."""
        assert self.shard is None
        for part in _part_paths(self.state, "done") + _part_paths(self.state, "failures"):
            _truncate_partial_line(part)
        failed = {o["seed_id"] for p in [self.done_path, *_part_paths(self.state, "done")]
                  for o in _log(p) if o.get("status") == "failed"}
        known_f = {o.get("seed_id") for o in _log(self.failures_path)}
        for part in _part_paths(self.state, "failures"):   # failures before their markers
            new = [o for o in _log(part) if o.get("seed_id") not in known_f
                   and o.get("seed_id") in failed]
            known_f.update(o.get("seed_id") for o in new)
            if new:
                self._append(self.failures_path, [jsonl_line(o) for o in new])
            part.unlink()
        known = {o["seed_id"] for o in _log(self.done_path)}
        moved = 0
        for part in _part_paths(self.state, "done"):
            new = []
            for o in _log(part):
                if o["seed_id"] not in known:
                    known.add(o["seed_id"])
                    new.append(jsonl_line(o))
                    if o["status"] == "ok" and o["seed_id"] not in self.done:
                        self.records_written += int(o.get("records", 0))
                    self.done[o["seed_id"]] = o["status"]
            if new:
                self._append(self.done_path, new)
                moved += len(new)
            part.unlink()
        fsync_dir(self.state)
        return moved

    def _open_shard(self) -> dict:
        """A shard task's recovery: only its own files (the driver has folded and cleaned the
        rest); a retried task (worker or node died) resumes like a restarted run."""
        k = self.shard
        self._lock(f"lock-{k:05d}", wait_s=60.0)   # a dying earlier attempt may still hold it
        stats = {"truncated_bytes": 0, "dropped_records": 0, "dropped_failures": 0}
        mine = self.shard_paths[k]
        for p in (self.done_path, self.failures_path, mine):
            stats["truncated_bytes"] += _truncate_partial_line(p)
        for obj in _log(self.main_done_path):
            if shard_of(obj["seed_id"], self.pipe.shards) == k:
                self.done[obj["seed_id"]] = obj["status"]
        for obj in _log(self.done_path):
            if obj["seed_id"] not in self.done:
                self.part[obj["status"]] += 1
                self.part["records"] += int(obj.get("records", 0))
            self.done[obj["seed_id"]] = obj["status"]
        stats["dropped_records"] = self._drop_unmarked_records(mine)
        stats["dropped_failures"] = self._drop_unmarked_failures()
        return stats

    def _filter(self, path: Path, keep: Callable[[dict], bool]) -> int:
        """`_filter_log`, first closing this run's append handle on `path`: the rewrite puts a
        new file in its place, and later appends must go to that one."""
        f = self._files.pop(path, None)
        if f is not None:
            f.close()
        return _filter_log(path, keep)

    def _append(self, path: Path, lines: list[str]) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "ab")
        f.write("".join(lines).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())

    def commit(self, batch: Batch, scrub: Callable[[str], str]) -> None:
        """Write a batch of finished seeds: records and failures first, then done markers."""
        if not batch:
            return
        per_shard: dict[int, list[str]] = {}
        failures: list[str] = []
        markers: list[str] = []
        for seed_id, records, failure in batch:
            if failure is not None:
                failures.append(scrub(jsonl_line(failure)))
                markers.append(jsonl_line({"seed_id": seed_id, "status": "failed"}))
                continue
            k = shard_of(seed_id, self.pipe.shards)
            assert self.shard is None or k == self.shard, (seed_id, k, self.shard)
            per_shard.setdefault(k, []).extend(scrub(jsonl_line(r)) for r in records)
            markers.append(jsonl_line({"seed_id": seed_id, "status": "ok",
                                       "records": len(records), "shard": k}))
        for k, lines in per_shard.items():
            if _CRASH and _crashpoint("torn"):
                data = "".join(lines)
                self._append(self.shard_paths[k], [data[: len(data) // 2 + 1]])
                _die()
            self._append(self.shard_paths[k], lines)
        if failures:
            self._append(self.failures_path, failures)
        if _CRASH and _crashpoint("records"):
            _die()
        self._append(self.done_path, markers)   # only now are these seeds done
        if _CRASH and _crashpoint("done"):
            _die()
        for seed_id, records, failure in batch:
            status = "failed" if failure is not None else "ok"
            self.done[seed_id] = status
            self.part[status] += 1
            if failure is None:
                self.records_written += len(records)
                self.part["records"] += len(records)

    def failures(self) -> list[dict]:
        """The failure records of the whole run (failures.jsonl)."""
        return _log(self.main_failures_path)

    def write_usage(self, usage: dict, extra: dict, scrub: Callable[[str], str]) -> None:
        doc = {"total": sum_usage(self.base_usage, usage), "this_run": usage, **extra, "updated": now()}
        atomic_write(self.usage_path, scrub(json.dumps(doc, indent=1) + "\n"))

    def counts(self) -> dict:
        """seeds_done, seeds_failed and records of the whole run so far (for usage.json)."""
        return {"seeds_done": len(self.done) - self.failed, "seeds_failed": self.failed,
                "records": self.records_written}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
