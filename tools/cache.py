"""A content-addressed SQLite store for teacher responses.

`Cache.key(request)` is the sha256 of the canonical JSON of the full request (model, messages,
sampling parameters, n, template version); the API key is never part of a request and so never
reaches the file. Several processes may write one cache file at once: the database runs in WAL
mode with a busy timeout, every write is one short autocommit `INSERT OR IGNORE` (the first
writer of a key wins; a key names its request, so later writers hold an equivalent answer), and
reads never block writers. Stdlib `sqlite3` only.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from phijax.errors import ConfigError
from phijax.hashing import canonical_json, sha256_hex

_SCHEMA = ("CREATE TABLE IF NOT EXISTS responses ("
           "key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)")


class Cache:
    """`get`/`put` JSON-able dicts by request key; safe across threads and processes."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared by threads (to_thread callers)
        self._db = sqlite3.connect(str(self.path), timeout=busy_timeout_s,
                                   isolation_level=None,  # autocommit: each statement is short
                                   check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        # Switching to WAL and creating the table can race with another process doing the same;
        # `journal_mode` does not always wait on the busy handler, so retry briefly.
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    self._db.close()
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":  # e.g. a filesystem without shared memory
            raise ConfigError(f"cache {self.path}: could not enable WAL mode (got {mode!r})")

    @staticmethod
    def key(request: dict) -> str:
        """sha256 hex of the canonical JSON (sorted keys, no whitespace, UTF-8) of `request`."""
        return sha256_hex(canonical_json(request))

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict) -> None:
        blob = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO responses (key, value, created) VALUES (?, ?, ?)",
                             (key, blob, time.time()))

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r})"
