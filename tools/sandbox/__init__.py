"""Run untrusted (model-generated) code in a separate, contained process.

Used by the code-verification and instruction-reversal pipeline stages and by the code oracle
of evaluation, PTS and judge pairs, which execute many generated programs: each run must be
bounded in time and resources, must not be able to touch the machine (files, network, other
processes, secrets in our environment), and must report what happened.

    from tools.sandbox import Limits, run_python
    r = run_python("print(input()[::-1])", stdin="abc\\n")
    r.reason, r.exit_code, r.stdout          # ('ok', 0, 'cba\\n')

Modules: this one is the public API and picks the isolation; `result` holds `Limits`, `Result`
and the classification of how a run ended; `launch` is the caller's side of one run (start the
launcher, collect output within the limits, kill the leftovers); `isolate` is the launcher,
a standard-library-only script started by its path, which builds the namespaces, the file view
and the rlimits, and execs the program. Nothing is ever exec'd or eval'd in the calling process.

Layers, and why each one is there:

* Separate process + rlimits (CPU seconds, address space, process count, file size, no
  core dumps): bound what a single program can consume.  RLIMIT_CPU kills busy loops;
  RLIMIT_AS turns a 10 GB allocation into a MemoryError instead of the OOM killer.
* Unprivileged uid.  We run as root on our machines, and for root RLIMIT_NPROC is not
  enforced and file permissions do not apply.  The program therefore runs as a per-run uid
  (UID_BASE + launcher pid, unique among live runs, so concurrent runs neither share a
  process budget nor can touch each other), which makes RLIMIT_NPROC bite (fork bombs)
  and lets ordinary permissions protect the system.  When we are not root, a user
  namespace gives the same effect (the program ends up as an unprivileged uid in a nested
  user namespace, with no capabilities over our mounts).
* Mount namespace: every mount is remounted read-only (and nosuid) in the private copy,
  and fresh size-capped tmpfs are mounted over the world-writable /tmp, /var/tmp and
  /dev/shm.  The program's working directory WORKDIR=/tmp/work lives in that tmpfs, so
  nothing the program writes reaches the host disk and the total it can write is capped
  (Limits.disk_mb); everything disappears with the namespace.  Writes anywhere else fail
  with EROFS.  /run (host daemons' unix sockets) is hidden under an empty read-only tmpfs.
  If the interpreter lives in a directory the sandbox uid cannot traverse
  (e.g. pyenv under /root, mode 700), an empty read-only tmpfs is mounted over that
  directory with only the interpreter's prefix bind-mounted back (read-only), which also
  hides the rest of it.
* Network namespace: only a loopback interface (brought up, so programs may talk to
  themselves); the host's 127.0.0.1 and the outside world are unreachable.  If network
  namespaces are unavailable we refuse unless the caller passes unsafe_allow_network=True
  (which also means: do not create one, i.e. give the program our network).
* PID namespace: the program cannot see or signal any host process, and when init exits
  (the program finished) or is killed (wall-clock timeout) the kernel kills every process
  left in the namespace: background children, daemons and processes that called setsid()
  all go with it.  init gets PR_SET_PDEATHSIG so killing the launcher kills init.
* Clean environment: the program gets a fixed minimal environment (PATH, HOME, TMPDIR,
  LANG), never ours, and cannot read our /proc/<pid>/environ (different PID namespace and
  different uid).  IPC namespace: no access to host SysV/POSIX message queues/shm.

Capability is detected at runtime (`isolation_mode()`: "root", "userns" or None, probed
once per process by actually running a trivial program).  Without any namespace support we
refuse to run unless unsafe=True, in which case only rlimits, the clean environment, a
temporary host directory and a process-group kill are applied (as root, the program then
runs as root, and RLIMIT_NPROC does not apply: only for trusted code).
"""
from __future__ import annotations

import os
import threading
from typing import Mapping, Sequence

from tools.sandbox.isolate import WORKDIR
from tools.sandbox.launch import execute, python_binary
from tools.sandbox.result import Limits, Result, SandboxError, SandboxUnavailable

__all__ = ["Limits", "Result", "SandboxError", "SandboxUnavailable", "WORKDIR", "SCRIPT_NAME",
           "ORACLE_LIMITS", "isolation_mode", "passes", "run", "run_python", "run_tests"]

# run_python() writes the code here (so tracebacks show file/line and `import helper` works
# for helper modules passed in `files`).
SCRIPT_NAME = "main.py"

# The limits of one code-oracle check (`passes`).
ORACLE_LIMITS = Limits(cpu_seconds=5, wall_seconds=10, memory_mb=256)


def run_python(code: str, *, stdin: str = "", files: Mapping[str, str | bytes] | None = None,
               limits: Limits = Limits(), unsafe_allow_network: bool = False,
               unsafe: bool = False) -> Result:
    """Run Python source `code` as WORKDIR/main.py with the current interpreter.

    The interpreter runs with -E -s -S -B: no PYTHON* variables, no site-packages (standard
    library only), no .pyc files; the work dir is sys.path[0], so modules in `files` import.
    """
    files = dict(files or {})
    if SCRIPT_NAME in files:
        raise ValueError(f"files may not contain {SCRIPT_NAME!r} (the code is written there)")
    files[SCRIPT_NAME] = code
    exe, _ = python_binary()
    return run([exe, "-E", "-s", "-S", "-B", SCRIPT_NAME], stdin=stdin, files=files,
               limits=limits, unsafe_allow_network=unsafe_allow_network, unsafe=unsafe)


def run_tests(code: str, tests: str, limits: Limits = ORACLE_LIMITS) -> Result:
    """`code` followed by `tests`, run as one program in the sandbox."""
    return run_python(code + "\n\n" + tests, limits=limits)


def passes(code: str, tests: str) -> bool:
    """Whether `code` followed by `tests` exits 0 in the sandbox: the code oracle of
    evaluation, PTS and judge pairs (registered as the `phijax.sandbox` entry point)."""
    return run_tests(code, tests).ok


def run(argv: Sequence[str], *, stdin: str | bytes = "",
        files: Mapping[str, str | bytes] | None = None, limits: Limits = Limits(),
        unsafe_allow_network: bool = False, unsafe: bool = False,
        env: Mapping[str, str] | None = None) -> Result:
    """Run the command `argv` (looked up on the sandbox PATH) in the sandbox.

    `files` (relative path -> text or bytes) are written into the work dir first.  `env`
    adds variables to the minimal environment (nothing is inherited from ours).
    `unsafe_allow_network=True` gives the program our network (no network namespace);
    `unsafe=True` allows running where no namespace isolation is available at all.
    """
    if not argv:
        raise ValueError("empty argv")
    mode = isolation_mode()
    if mode is None:
        if not unsafe:
            raise SandboxUnavailable(
                "no namespace isolation available here (not root and user namespaces are "
                "disabled or blocked): refusing to run untrusted code. Pass unsafe=True "
                "(and unsafe_allow_network=True) to run with rlimits only: no filesystem "
                "containment, no privilege drop, no network isolation.")
        if not unsafe_allow_network:
            raise SandboxUnavailable(
                "cannot create a network namespace here: refusing to run untrusted code "
                "with network access. Pass unsafe_allow_network=True to allow it.")
        mode = "none"
    return execute(list(argv), mode=mode, netns=not unsafe_allow_network, stdin=stdin,
                   files=files or {}, limits=limits, env=env or {})


_mode_lock = threading.Lock()
_mode_cache: list = []


def isolation_mode() -> str | None:
    """Which isolation works here: "root", "userns" or None (probed once, then cached)."""
    with _mode_lock:
        if not _mode_cache:
            _mode_cache.append(_probe())
        return _mode_cache[0]


def _probe() -> str | None:
    exe, _ = python_binary()
    for mode in (["root"] if os.geteuid() == 0 else []) + ["userns"]:
        try:
            r = execute([exe, "-E", "-s", "-S", "-c", "pass"], mode=mode, netns=True,
                        stdin="", files={}, limits=Limits(wall_seconds=15), env={})
        except SandboxError:
            continue
        if r.reason == "ok":
            return mode
    return None
