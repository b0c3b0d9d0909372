"""What a sandboxed run may use (`Limits`), what it reports (`Result`) and why it ended."""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from phijax.errors import UserError


class SandboxError(RuntimeError):
    """The sandbox itself failed (setup error, program could not be started)."""


class SandboxUnavailable(SandboxError, UserError):
    """Refusing to run: the required isolation is not available on this machine."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 10     # RLIMIT_CPU of the program (each process; SIGXCPU then SIGKILL)
    memory_mb: int = 512        # RLIMIT_AS (address space) of each process
    processes: int = 32         # RLIMIT_NPROC: processes + threads of the sandbox uid
    file_mb: int = 16           # RLIMIT_FSIZE: largest file a process may write
    wall_seconds: float = 20    # wall clock for the whole run; then the whole tree is killed
    output_kb: int = 256        # captured stdout and stderr, each; the rest is discarded
    disk_mb: int = 64           # each private tmpfs: /tmp (holds WORKDIR), /var/tmp, /dev/shm


@dataclass
class Result:
    # ok | nonzero_exit | timeout | cpu_limit | memory | file_limit | process_limit | killed
    reason: str
    exit_code: int | None       # None when killed by a signal or timed out
    signal: int | None          # terminating signal of the program, if any
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float | None         # user+sys CPU of the program's main process (+ reaped children)
    max_rss_kb: int | None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    isolation: str = ""         # "root", "userns" or "none" (unsafe)

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


_MEMORY = re.compile(r"(?m)^MemoryError\b|Cannot allocate memory|std::bad_alloc|out of memory")
_FILE = re.compile(r"\[Errno 27\]|File too large")
_PROCS = re.compile(r"BlockingIOError: \[Errno 11\]|can't start new thread|"
                    r"Resource temporarily unavailable")


def classify(timed_out: bool, exit_code: int | None, sig: int | None, cpu_s: float | None,
             stderr: str, limits: Limits) -> str:
    """The `Result.reason` of a finished run."""
    if timed_out:
        return "timeout"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s is not None
                                 and cpu_s >= limits.cpu_seconds):
        return "cpu_limit"
    if exit_code == 0:
        return "ok"
    if sig == signal.SIGXFSZ:
        return "file_limit"
    # The program died of an error: name it when it is one of our limits.  (The program
    # could fake these messages, but that only mislabels its own run.)
    tail = stderr[-4000:]
    if _MEMORY.search(tail):
        return "memory"
    if _FILE.search(tail):
        return "file_limit"
    if _PROCS.search(tail):
        return "process_limit"
    return "killed" if sig is not None else "nonzero_exit"
