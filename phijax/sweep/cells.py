"""A cell's directory: its identity, status, locks and run info.

    cell.json        the resolved config and the identity its hash covers
    status.json      state (pending, running, success, failed), attempts, preemptions, last error
    locks/0001.json  one per claim: owner (host, pid), heartbeat, released
    run.json         the latest attempt: git commit, argv, owner, times, exit status
    train.yaml       the config the cell's `phijax train` runs; train.log its output
    ...              and what `phijax train` writes there (config.yaml, checkpoints/, metrics.jsonl)

The directory may be in a bucket (gs://, s3://): every file here is written whole, never
appended or renamed, through phijax.paths. Claiming a cell creates locks/N+1, N being its newest
lock, only if that name is free (`paths.create_if_absent`: a hard link locally, a conditional
write on a bucket, checked by the store), so of two workers claiming at once exactly one wins. A lock is live until its owner releases it or stops
rewriting its heartbeat for `stale_after` seconds; a claim over a stale lock takes the cell
over, and the old owner, finding a newer lock at its next heartbeat, stops. Only the owner of
the newest lock writes status.json and run.json. Heartbeats carry the writer's clock: the hosts
of a sweep must keep their clocks in step (NTP) to well within `stale_after`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from phijax import paths
from phijax.errors import ConfigError
from phijax.sweep.identity import differences

STATES = ("pending", "running", "success", "failed")


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def git_commit() -> Optional[str]:
    """The commit of the phijax code that runs, when it is a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


class CellDir:
    def __init__(self, path: str | paths.AnyPath):
        self.path = paths.as_path(path)
        self.locks = self.path / "locks"

    def _read(self, name: str) -> Optional[dict]:
        try:
            return json.loads(paths.read_text(self.path / name))
        except (FileNotFoundError, IsADirectoryError):
            return None
        except json.JSONDecodeError:
            raise ConfigError(f"cell {self.path}: {name} is not JSON") from None

    # ------------------------------------------------------------ identity

    def check_identity(self, doc: dict) -> bool:
        """True when cell.json exists and holds `doc`'s hash and identity; ConfigError naming
        the cell when it holds another (never reused silently); False when there is none."""
        saved = self._read("cell.json")
        if saved is None:
            return False
        keys = differences({"hash": saved.get("hash"), "identity": saved.get("identity")},
                           {"hash": doc["hash"], "identity": doc["identity"]})
        if keys:
            raise ConfigError(f"cell {self.path}: its cell.json differs from this sweep's cell at "
                              f"{', '.join(keys[:4])}; move the directory away or restore it")
        return True

    def write_identity(self, doc: dict) -> None:
        self.check_identity(doc)
        paths.write_text(self.path / "cell.json", _dump(doc))

    # ------------------------------------------------------------ status and run info

    def status(self) -> dict:
        status = {"state": "pending", "attempts": 0, "preemptions": 0, "last_error": None}
        status.update(self._read("status.json") or {})
        return status

    def write_status(self, **changes) -> dict:
        status = {**self.status(), **changes, "updated": time.time()}
        paths.write_text(self.path / "status.json", _dump(status))
        return status

    def write_run(self, info: dict) -> None:
        paths.write_text(self.path / "run.json", _dump(info))

    # ------------------------------------------------------------ locks

    def newest_lock(self) -> tuple[int, Optional[dict]]:
        """(number, contents) of the newest lock; (0, None) when there is none."""
        numbers = [int(m.group(1)) for name in paths.listdir(self.locks)
                   if (m := re.fullmatch(r"(\d+)\.json", name))]
        if not numbers:
            return 0, None
        n = max(numbers)
        path = self.locks / f"{n:04d}.json"
        try:
            return n, json.loads(paths.read_text(path))
        except (json.JSONDecodeError, FileNotFoundError):  # being written: live since its mtime
            local = not paths.is_url(path) and path.exists()
            return n, {"heartbeat": path.stat().st_mtime if local else time.time(),
                       "released": False}

    def lock_state(self, stale_after: float) -> str:
        """free (no lock, or released), live, or stale."""
        _, lock = self.newest_lock()
        if lock is None or lock.get("released"):
            return "free"
        return "stale" if time.time() - lock.get("heartbeat", 0) > stale_after else "live"

    def claim(self, stale_after: float) -> Optional["Lock"]:
        """A new lock on the cell when it has none live and no other worker claims it first."""
        n, previous = self.newest_lock()
        if previous is not None and not previous.get("released") and \
                time.time() - previous.get("heartbeat", 0) <= stale_after:
            return None
        now = time.time()
        body = {**owner(), "claimed": now, "heartbeat": now, "released": False}
        if not paths.create_if_absent(self.locks / f"{n + 1:04d}.json", _dump(body)):
            return None
        stale = previous if previous is not None and not previous.get("released") else None
        return Lock(self, n + 1, body, stale)


class Lock:
    """This worker's claim on a cell. `taken_over`: the stale lock it replaced, if any."""

    def __init__(self, cell: CellDir, number: int, body: dict, taken_over: Optional[dict]):
        self.cell, self.number, self.body, self.taken_over = cell, number, body, taken_over
        self.path = cell.locks / f"{number:04d}.json"

    def held(self) -> bool:
        """No newer lock: no other worker has taken the cell over."""
        return self.cell.newest_lock()[0] == self.number

    def heartbeat(self) -> bool:
        """Renew the heartbeat; False (and nothing written) when the cell was taken over."""
        if not self.held():
            return False
        self.body["heartbeat"] = time.time()
        paths.write_text(self.path, _dump(self.body))
        return True

    def release(self) -> None:
        if self.held():
            self.body.update(released=True, heartbeat=time.time())
            paths.write_text(self.path, _dump(self.body))
