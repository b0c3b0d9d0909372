"""The caller's side of one sandboxed run: start the launcher, collect output, build the Result.

`execute` passes the run's config and stdin to the launcher (`isolate.py`, started by its path
in a new session) as unlinked temporary files, reads the program's stdout and stderr (keeping
at most `Limits.output_kb` of each) and the status pipe until the launcher is done or the
wall-clock deadline passes, then kills whatever is left of the launcher's process group.
"""
from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Mapping, NamedTuple

from tools.sandbox import isolate
from tools.sandbox.isolate import WORKDIR
from tools.sandbox.result import Limits, Result, SandboxError, classify


def python_binary() -> tuple[str, str]:
    """The real interpreter binary (not a venv shim: we run without site) and its prefix."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not exe.startswith(prefix + os.sep):
        prefix = os.path.dirname(os.path.dirname(exe))
    return exe, prefix


def check_files(files: Mapping[str, str | bytes]) -> dict:
    """`files` with normalised relative names and JSON-safe, bytes-exact (latin-1) contents;
    ValueError for a name outside the work dir."""
    out = {}
    for name, content in files.items():
        norm = os.path.normpath(name)
        if (not name or os.path.isabs(name) or norm == "." or norm == ".."
                or norm.startswith("../") or "\0" in name):
            raise ValueError(f"bad file name {name!r}: must be a relative path inside the work dir")
        if isinstance(content, str):
            content = content.encode()
        out[norm] = content.decode("latin-1")
    return out


class _Output(NamedTuple):
    stdout: bytes
    stderr: bytes
    truncated: dict
    status: bytes
    timed_out: bool
    wall_s: float
    returncode: int


def execute(argv: list[str], *, mode: str, netns: bool, stdin: str | bytes,
            files: Mapping[str, str | bytes], limits: Limits, env: Mapping[str, str]) -> Result:
    """Run `argv` under isolation `mode` ("root", "userns" or "none") and report the run."""
    files = check_files(files)
    host_workdir = tempfile.mkdtemp(prefix="phijax-sandbox-") if mode == "none" else None
    workdir = host_workdir or WORKDIR
    cfg = {
        "mode": mode,
        "netns": netns and mode != "none",
        "argv": argv,
        # The whole environment of the program: nothing is inherited from ours.
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8",
                "TMPDIR": workdir if mode == "none" else "/tmp", **env},
        "workdir": workdir,
        "files": files,
        "limits": dataclasses.asdict(limits),
        "python_prefix": python_binary()[1],
    }
    try:
        out = _launch(cfg, stdin, limits)
    finally:
        if host_workdir:
            _rmtree(host_workdir)
    return _result(out, limits, mode)


def _temp_file(data: bytes):
    f = tempfile.TemporaryFile()
    f.write(data)
    f.flush()
    f.seek(0)
    return f


def _launch(cfg: dict, stdin: str | bytes, limits: Limits) -> _Output:
    """Start the launcher and collect what it and the program write until the run ends."""
    status_r, status_w = os.pipe()
    proc = None
    try:
        # Config and stdin travel as unlinked temp files (no size limits, no pipe deadlocks).
        with _temp_file(json.dumps(cfg).encode()) as cfg_f, \
                _temp_file(stdin.encode() if isinstance(stdin, str) else stdin) as in_f:
            start = time.monotonic()
            # -I -S: the launcher must not pick up modules from tools/ or site-packages.
            proc = subprocess.Popen(
                [python_binary()[0], "-I", "-S", "-B", os.path.abspath(isolate.__file__),
                 str(cfg_f.fileno()), str(status_w)],
                stdin=in_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(cfg_f.fileno(), status_w), env={}, cwd="/",
                start_new_session=True)  # own process group: killpg() reaches the tree
            os.close(status_w)
            status_w = -1
            collected = _collect(proc, status_r, start + limits.wall_seconds,
                                 limits.output_kb * 1024)
            wall = time.monotonic() - start
    finally:
        if proc is not None:
            # Kill whatever is left in the process group (in the namespace modes the kernel
            # has already killed everything with init; this matters for mode "none").  The
            # launcher is not reaped yet, so its pid (= the pgid) cannot have been reused.
            _killpg(proc.pid)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
    return _Output(*collected, wall, proc.returncode)


def _result(out: _Output, limits: Limits, mode: str) -> Result:
    """The Result of a run from the status lines; SandboxError when the sandbox itself failed."""
    msgs = [json.loads(line) for line in out.status.decode(errors="replace").splitlines()
            if line.strip()]
    errors = [m["error"] for m in msgs if "error" in m]
    if errors:
        raise SandboxError("; ".join(errors))
    final = next((m for m in msgs if "cpu_s" in m), None)
    if final is None and not out.timed_out:
        raise SandboxError(f"sandbox launcher exited (rc={out.returncode}) without a status; "
                           f"stderr: {out.stderr[-2000:].decode(errors='replace')}")
    final = final or {}
    exit_code, sig = final.get("exit_code"), final.get("signal")
    stderr = out.stderr.decode(errors="replace")
    if out.timed_out:
        exit_code, sig = None, signal.SIGKILL
    return Result(
        reason=classify(out.timed_out, exit_code, sig, final.get("cpu_s"), stderr, limits),
        exit_code=exit_code, signal=sig, stdout=out.stdout.decode(errors="replace"),
        stderr=stderr, wall_s=out.wall_s, cpu_s=final.get("cpu_s"),
        max_rss_kb=final.get("max_rss_kb"), stdout_truncated=out.truncated["stdout"],
        stderr_truncated=out.truncated["stderr"], isolation=mode)


def _collect(proc, status_r: int, deadline: float, cap: int):
    """Read stdout/stderr (keeping at most `cap` bytes each) and the status pipe.

    Returns when the launcher is done (status pipe EOF) and the output pipes are drained,
    or at the wall-clock deadline, in which case the whole process group is killed.
    """
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(status_r, selectors.EVENT_READ, "status")
    timed_out = done = False
    while sel.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if done:  # launcher finished; something outside the namespace keeps a pipe open
                break
            # Wall-clock timeout: kill the launcher's process group.  The launcher dies, init
            # (PR_SET_PDEATHSIG, and in the same group) dies, and with init the kernel kills
            # every process in the PID namespace.  Then drain what was already written.
            timed_out = done = True
            _killpg(proc.pid)
            deadline = time.monotonic() + 2.0
            continue
        for key, _ in sel.select(remaining):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                if key.data == "status" and not done:
                    done = True  # program, init and launcher have exited
                    deadline = min(deadline, time.monotonic() + 1.0)
                continue
            buf = bufs[key.data]
            if key.data == "status":
                buf += data
                continue
            # Keep reading (so the program never blocks on a full pipe) but keep only `cap`.
            room = cap - len(buf)
            if len(data) > room:
                truncated[key.data] = True
            if room > 0:
                buf += data[:room]
    sel.close()
    return (bytes(bufs["stdout"]), bytes(bufs["stderr"]), truncated, bytes(bufs["status"]),
            timed_out)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):  # the program made directories unwritable (only without root)
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
        shutil.rmtree(path, ignore_errors=True)
