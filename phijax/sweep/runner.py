"""Running a sweep: the claim loop of `phijax sweep work`, and `run` (here, or K local workers).

Any number of identical workers share a sweep with no scheduler: each claims the next cell
that is pending, failed with attempts left, or running under a stale lock (see cells.py), runs
`phijax train` on it in a subprocess (a crash or an OOM fails the cell, not the worker), and
goes on until no cell is left. A preempted cell (exit status 42, or a stop the worker passed on)
goes back to pending without counting as an attempt. SIGTERM or Ctrl-C to a worker is passed to
its run, which saves a checkpoint; the worker then exits with status 42 (retryable).

A multi-host cell runs one worker per host; process 0 claims and the others follow (hosts.py).

A run appends its output to the cell's train.log. In a bucket, which cannot append, it goes to a
local copy of train.log instead, uploaded whole at each heartbeat and at the end by process 0
(another host's output stays in a local file, named in its log).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import yaml

from phijax import paths
from phijax.config import to_dict
from phijax.sweep.cells import CellDir, Lock, git_commit, owner
from phijax.sweep.hosts import Hosts
from phijax.sweep.spec import Cell, SweepSpec
from phijax.train.distributed import PREEMPTED_EXIT_CODE as PREEMPTED

log = logging.getLogger("phijax")
DONE, WAIT = -1, -2  # what process 0 broadcasts when there is no cell to run
USER_ERROR = 2  # phijax's exit status for a config or data mistake: not retried


@dataclass
class WorkOptions:
    stale_after: float = 600.0  # seconds without a heartbeat before a running cell is taken over
    heartbeat: Optional[float] = None  # seconds between heartbeats; default stale_after / 4, <= 60
    max_attempts: int = 3  # failed runs of a cell before the sweep gives up on it
    poll: float = 10.0  # seconds between looks while other workers run the remaining cells
    wait: bool = True  # False: exit once nothing is claimable now
    retry_failed: bool = False  # cells failed out of attempts start over
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    @property
    def beat(self) -> float:
        return self.heartbeat or min(60.0, self.stale_after / 4)


class _Stop:
    """SIGTERM, SIGINT or SIGUSR1 set a flag (the run in flight is told and saves) instead of
    killing."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous = {s: signal.signal(s, self._handle)  # USR1: SLURM's before the limit
                          for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        log.warning("%s: stopping the cell in flight (it saves a checkpoint), then exiting",
                    signal.Signals(signum).name)
        self.signal = signal.Signals(signum).name

    def sleep(self, seconds: float) -> None:
        end = time.time() + seconds
        while self.signal is None and time.time() < end:
            time.sleep(min(0.5, max(0.0, end - time.time())))

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def cell_doc(spec: SweepSpec, cell: Cell) -> dict:
    """cell.json: the resolved config and what the hash covers."""
    return {"sweep": spec.name, "label": cell.label, "hash": cell.hash, "values": cell.values,
            "command": spec.command, "identity": cell.identity, "config": to_dict(cell.config)}


def check_cells(spec: SweepSpec, cells: list[Cell]) -> None:
    """Every existing cell.json matches its cell: before anything runs."""
    for cell in cells:
        CellDir(cell.dir).check_identity(cell_doc(spec, cell))


def _claim(cell: Cell, opts: WorkOptions) -> tuple[Optional[Lock], bool]:
    """(a lock on `cell` if this worker should run it, whether another worker runs it now)."""
    d = CellDir(cell.dir)
    status = d.status()
    if status["state"] == "success" or \
            (status["state"] == "failed" and status["attempts"] >= opts.max_attempts):
        return None, False
    lock = d.claim(opts.stale_after)
    if lock is None:
        return None, d.lock_state(opts.stale_after) == "live"
    status = d.status()  # read again under the lock: another worker may have finished it
    if lock.taken_over and status["state"] == "running":
        gone = lock.taken_over
        status = d.write_status(state="failed", attempts=status["attempts"] + 1, last_error=(
            f"worker {gone.get('host')}:{gone.get('pid')} stopped heartbeating (taken over "
            f"after {opts.stale_after:g}s)"))
        log.warning("cell %s: taken over from %s:%s", cell.label, gone.get("host"), gone.get("pid"))
    if status["state"] == "success" or status["attempts"] >= opts.max_attempts:
        lock.release()
        return None, False
    return lock, False


def next_cell(cells: list[Cell], opts: WorkOptions) -> tuple[int, Optional[Lock]]:
    """(index, lock) of the next cell this worker runs, else (WAIT or DONE, None)."""
    busy = False
    for i, cell in enumerate(cells):
        lock, running = _claim(cell, opts)
        if lock is not None:
            return i, lock
        busy = busy or running
    return (WAIT if busy and opts.wait else DONE), None


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when the worker dies
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prepare(spec: SweepSpec, cell: Cell) -> list[str]:
    """The cell's config file (and mixture) on disk; the command that trains it."""
    if cell.mixture is not None:
        paths.write_text(cell.dir / "mixture.yaml", yaml.safe_dump(cell.mixture, sort_keys=False))
    paths.write_text(cell.dir / "train.yaml", yaml.safe_dump(to_dict(cell.config),
                                                             sort_keys=False))
    return [sys.executable, "-m", "phijax", spec.command, str(cell.dir / "train.yaml")]


class _RunLog:
    """The file a run's output is appended to: the cell's train.log, or, for a cell in a bucket,
    a local copy of it that `sync` uploads whole (when this process owns the cell)."""

    def __init__(self, cell_dir, owned: bool):
        self.target, self.owned = cell_dir / "train.log", owned
        self.remote = paths.is_url(self.target)
        if not self.remote:
            self.local = Path(self.target)
            return
        fd, name = tempfile.mkstemp(prefix="phijax-train-", suffix=".log")
        os.close(fd)
        self.local = Path(name)
        if owned:
            with contextlib.suppress(FileNotFoundError):
                self.local.write_bytes(paths.read_bytes(self.target))
        else:
            log.info("cell %s: this host's output goes to %s", cell_dir.name, self.local)

    def sync(self) -> None:
        if self.remote and self.owned:
            paths.upload(self.local, self.target)

    def close(self) -> None:
        """Remove the local copy (once synced: another host's output is kept)."""
        if self.remote and self.owned:
            self.local.unlink(missing_ok=True)


def _last_error(log_path: Path, rc: int) -> str:
    why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = [l.strip() for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
    except OSError:
        lines = []
    errors = [l for l in lines if "error" in l.lower()]
    detail = (errors or lines or [""])[-1][:300]
    return f"{why}: {detail}" if detail else why


def run_cell(spec: SweepSpec, cell: Cell, lock: Optional[Lock], opts: WorkOptions, stop: _Stop,
             env: dict, threads: bool = False) -> str:
    """Train `cell` in a subprocess; with `lock` (process 0) keep its heartbeat and record the
    outcome: success, pending (preempted), failed or lost (taken over by another worker)."""
    d = CellDir(cell.dir)
    argv = _prepare(spec, cell)
    if lock is not None:
        d.write_identity(cell_doc(spec, cell))
        status = d.write_status(state="running")
        info = {"argv": argv, "worker_argv": sys.argv, "git_commit": git_commit(), **owner(),
                "lock": lock.number, "attempt": status["attempts"] + 1, "started": time.time()}
        d.write_run(info)
        log.info("cell %s: running `%s` (log %s)", cell.label, " ".join(argv), cell.dir / "train.log")
    run_log = _RunLog(cell.dir, owned=lock is not None)
    with open(run_log.local, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                # not where JAX's threads run: a fork there may deadlock
                                preexec_fn=None if threads else _die_with_parent)
    forwarded, last_beat = False, time.time()
    while True:
        try:
            rc = proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop.signal and not forwarded:
            proc.send_signal(signal.SIGTERM)
            forwarded = True
        if lock is not None and time.time() - last_beat >= opts.beat:
            last_beat = time.time()
            if not lock.heartbeat():
                log.error("cell %s: taken over by another worker; stopping its run", cell.label)
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                run_log.close()
                return "lost"
            run_log.sync()
    if lock is None:
        run_log.close()
        return "done"
    try:
        return _record(d, cell, lock, rc, forwarded, info, opts.max_attempts, run_log)
    finally:
        run_log.close()


def _record(d: CellDir, cell: Cell, lock: Lock, rc: int, stopped: bool, info: dict,
            max_attempts: int, run_log: _RunLog) -> str:
    status = d.status()
    checkpoint = cell.dir / "checkpoints" / str(cell.config.train.steps)
    complete = paths.exists(checkpoint) if paths.is_url(checkpoint) else checkpoint.is_dir()
    if rc == 0 and complete:
        outcome, changes = "success", {"state": "success"}  # last_error: of an earlier try
    elif rc == PREEMPTED or (stopped and rc in (0, -signal.SIGTERM)):
        outcome, changes = "pending", {"state": "pending", "preemptions": status["preemptions"] + 1}
    else:
        error = _last_error(run_log.local, rc) if rc else \
            f"exit status 0 without a checkpoint at step {cell.config.train.steps}"
        attempts = status["attempts"] + 1
        if rc == USER_ERROR:  # the same config fails the same way: fix it, then --retry-failed
            attempts = max(attempts, max_attempts)
        outcome, changes = "failed", {"state": "failed", "attempts": attempts,
                                      "last_error": error}
    if lock.held():
        run_log.sync()
        d.write_status(**changes)
        d.write_run({**info, "ended": time.time(), "exit_status": rc, "outcome": outcome})
        lock.release()
    log.info("cell %s: %s%s", cell.label, outcome,
             f" ({changes['last_error']})" if outcome == "failed" else "")
    return outcome


def retry_failed(cells: list[Cell], opts: WorkOptions) -> None:
    """Cells failed out of attempts back to pending, each under its lock."""
    for cell in cells:
        d = CellDir(cell.dir)
        if d.status()["state"] == "failed":
            lock = d.claim(opts.stale_after)
            if lock is not None:
                if d.status()["state"] == "failed":
                    d.write_status(state="pending", attempts=0)
                lock.release()


def work(spec: SweepSpec, cells: list[Cell], opts: WorkOptions) -> int:
    """The claim loop; 0 when every cell succeeded, 1 when some failed out of attempts, 42 when
    stopped by a signal."""
    env = dict(os.environ)  # the runs' environment, before Hosts narrows this process to CPU
    check_cells(spec, cells)
    hosts = Hosts(opts, cells[0].config.run.distributed)
    if opts.retry_failed and hosts.primary:
        retry_failed(cells, opts)
    stop = _Stop()
    ran = 0
    try:
        while stop.signal is None:
            index, lock = next_cell(cells, opts) if hosts.primary else (DONE, None)
            index = hosts.agree(index)
            if index == DONE:
                break
            if index == WAIT:
                stop.sleep(opts.poll)
                continue
            run_cell(spec, cells[index], lock, opts, stop, env, threads=hosts.count > 1)
            ran += 1
    finally:
        stop.close()
    if stop.signal:
        return PREEMPTED
    states = [CellDir(c.dir).status() for c in cells]
    failed = sum(s["state"] == "failed" and s["attempts"] >= opts.max_attempts for s in states)
    log.info("worker done: ran %d cell%s; of %d cells %d succeeded, %d failed", ran,
             "" if ran == 1 else "s", len(cells), sum(s["state"] == "success" for s in states),
             failed)
    return 1 if failed and hosts.primary else 0


def work_argv(path: str, opts: WorkOptions) -> list[str]:
    argv = [sys.executable, "-m", "phijax", "sweep", "work", str(path),
            "--stale-after", str(opts.stale_after), "--max-attempts", str(opts.max_attempts),
            "--poll", str(opts.poll)]
    if opts.heartbeat:
        argv += ["--heartbeat", str(opts.heartbeat)]
    return argv + ([] if opts.wait else ["--no-wait"]) + \
        (["--retry-failed"] if opts.retry_failed else [])


def run_local(path: str, spec: SweepSpec, cells: list[Cell], opts: WorkOptions,
              workers: int) -> int:
    """`phijax sweep run`: the claim loop here, or `workers` local `work` processes."""
    if workers <= 1:
        return work(spec, cells, opts)
    check_cells(spec, cells)
    if opts.retry_failed:  # once, here: not again by every worker
        retry_failed(cells, opts)
    argv = work_argv(path, replace(opts, retry_failed=False))
    procs = [subprocess.Popen(argv) for _ in range(workers)]
    stop, passed = _Stop(), False
    try:
        while any(p.poll() is None for p in procs):
            if stop.signal and not passed:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                passed = True
            time.sleep(0.5)
    finally:
        stop.close()
    codes = [p.returncode for p in procs]
    return PREEMPTED if PREEMPTED in codes else max(codes)
