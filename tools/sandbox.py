"""Run untrusted (model-generated) code in a separate, contained process.

Used by the code-verification and instruction-reversal pipeline stages, which execute many
generated programs: each run must be bounded in time and resources, must not be able to
touch the machine (files, network, other processes, secrets in our environment), and must
report what happened.

    from tools.sandbox import Limits, run_python
    r = run_python("print(input()[::-1])", stdin="abc\\n")
    r.reason, r.exit_code, r.stdout          # ('ok', 0, 'cba\\n')

Process layout of one run (nothing is ever exec'd or eval'd in the calling process):

    caller ──Popen──> launcher "stage 1" (this file run as a script, still privileged)
                        unshare(): new mount, PID, IPC and network namespaces
                        (plus a user namespace when we are not root); builds the file view
                        └─fork─> init: PID 1 of the new PID namespace; mounts a fresh /proc
                                   └─fork─> program: drops privileges, writes `files`,
                                            setrlimit(), execve()

Layers, and why each one is there:

* Separate process + rlimits (CPU seconds, address space, process count, file size, no
  core dumps): bound what a single program can consume.  RLIMIT_CPU kills busy loops;
  RLIMIT_AS turns a 10 GB allocation into a MemoryError instead of the OOM killer.
* Unprivileged uid.  We run as root on our machines, and for root RLIMIT_NPROC is not
  enforced and file permissions do not apply.  The program therefore runs as a per-run uid
  (_UID_BASE + launcher pid, unique among live runs, so concurrent runs neither share a
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

Only the standard library is used; this file is also the launcher (see `__main__`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Limits", "Result", "SandboxError", "SandboxUnavailable", "WORKDIR",
           "isolation_mode", "run", "run_python"]

# Where the program runs (inside the namespace; in unsafe mode a host temp dir is used).
WORKDIR = "/tmp/work"
# run_python() writes the code here (so tracebacks show file/line and `import helper` works
# for helper modules passed in `files`).
SCRIPT_NAME = "main.py"
# Per-run uid/gid when running as root: _UID_BASE + launcher pid.  Above the ranges used for
# real accounts (and by SSSD id mapping), below 2**31 - 1 for any pid up to pid_max 4194304.
_UID_BASE = 2_100_000_000
# The program's uid inside the nested user namespace in "userns" mode.
_USERNS_UID = 65534


class SandboxError(RuntimeError):
    """The sandbox itself failed (setup error, program could not be started)."""


class SandboxUnavailable(SandboxError):
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


# --------------------------------------------------------------------------------------
# Public API (runs in the calling process)
# --------------------------------------------------------------------------------------

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
    exe, _ = _python()
    return run([exe, "-E", "-s", "-S", "-B", SCRIPT_NAME], stdin=stdin, files=files,
               limits=limits, unsafe_allow_network=unsafe_allow_network, unsafe=unsafe)


ORACLE_LIMITS = Limits(cpu_seconds=5, wall_seconds=10, memory_mb=256)


def passes(code: str, tests: str) -> bool:
    """Whether `code` followed by `tests` exits 0 in the sandbox: the code oracle of
    evaluation, PTS and judge pairs (registered as the `phijax.sandbox` entry point)."""
    return run_python(code + "\n\n" + tests, limits=ORACLE_LIMITS).ok


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
    return _execute(list(argv), mode=mode, netns=not unsafe_allow_network, stdin=stdin,
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
    exe, _ = _python()
    for mode in (["root"] if os.geteuid() == 0 else []) + ["userns"]:
        try:
            r = _execute([exe, "-E", "-s", "-S", "-c", "pass"], mode=mode, netns=True,
                         stdin="", files={}, limits=Limits(wall_seconds=15), env={})
        except SandboxError:
            continue
        if r.reason == "ok":
            return mode
    return None


def _python() -> tuple[str, str]:
    """The real interpreter binary (not a venv shim: we run without site) and its prefix."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not exe.startswith(prefix + os.sep):
        prefix = os.path.dirname(os.path.dirname(exe))
    return exe, prefix


def _check_files(files: Mapping[str, str | bytes]) -> dict:
    out = {}
    for name, content in files.items():
        norm = os.path.normpath(name)
        if (not name or os.path.isabs(name) or norm == "." or norm == ".."
                or norm.startswith("../") or "\0" in name):
            raise ValueError(f"bad file name {name!r}: must be a relative path inside the work dir")
        if isinstance(content, str):
            content = content.encode()
        out[norm] = content.decode("latin-1")  # JSON-safe, bytes-exact
    return out


def _execute(argv: list[str], *, mode: str, netns: bool, stdin: str | bytes,
             files: Mapping[str, str | bytes], limits: Limits, env: Mapping[str, str]) -> Result:
    exe, prefix = _python()
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
        "files": _check_files(files),
        "limits": dataclasses.asdict(limits),
        "python_prefix": prefix,
    }
    cap = limits.output_kb * 1024
    status_r, status_w = os.pipe()
    proc = None
    try:
        # Config and stdin travel as unlinked temp files (no size limits, no pipe deadlocks).
        with tempfile.TemporaryFile() as cfg_f, tempfile.TemporaryFile() as in_f:
            cfg_f.write(json.dumps(cfg).encode())
            cfg_f.flush()
            cfg_f.seek(0)
            in_f.write(stdin.encode() if isinstance(stdin, str) else stdin)
            in_f.flush()
            in_f.seek(0)
            start = time.monotonic()
            # -I -S: the launcher must not pick up modules from tools/ or site-packages.
            proc = subprocess.Popen(
                [exe, "-I", "-S", "-B", os.path.abspath(__file__),
                 str(cfg_f.fileno()), str(status_w)],
                stdin=in_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(cfg_f.fileno(), status_w), env={}, cwd="/",
                start_new_session=True)  # own process group: killpg() reaches the tree
            os.close(status_w)
            status_w = -1
            out, err, truncated, status, timed_out = _collect(
                proc, status_r, start + limits.wall_seconds, cap)
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
        if host_workdir:
            _rmtree(host_workdir)

    msgs = [json.loads(line) for line in status.decode(errors="replace").splitlines()
            if line.strip()]
    errors = [m["error"] for m in msgs if "error" in m]
    if errors:
        raise SandboxError("; ".join(errors))
    final = next((m for m in msgs if "cpu_s" in m), None)
    if final is None and not timed_out:
        raise SandboxError(f"sandbox launcher exited (rc={proc.returncode}) without a status; "
                           f"stderr: {err[-2000:].decode(errors='replace')}")
    final = final or {}
    exit_code, sig = final.get("exit_code"), final.get("signal")
    stderr = err.decode(errors="replace")
    if timed_out:
        exit_code, sig = None, signal.SIGKILL
    return Result(
        reason=_classify(timed_out, exit_code, sig, final.get("cpu_s"), stderr, limits),
        exit_code=exit_code, signal=sig, stdout=out.decode(errors="replace"), stderr=stderr,
        wall_s=wall, cpu_s=final.get("cpu_s"), max_rss_kb=final.get("max_rss_kb"),
        stdout_truncated=truncated["stdout"], stderr_truncated=truncated["stderr"],
        isolation=mode)


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


_MEMORY = re.compile(r"(?m)^MemoryError\b|Cannot allocate memory|std::bad_alloc|out of memory")
_FILE = re.compile(r"\[Errno 27\]|File too large")
_PROCS = re.compile(r"BlockingIOError: \[Errno 11\]|can't start new thread|"
                    r"Resource temporarily unavailable")


def _classify(timed_out, exit_code, sig, cpu_s, stderr, limits: Limits) -> str:
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


# --------------------------------------------------------------------------------------
# Launcher (runs as `python -I -S -B sandbox.py CFG_FD STATUS_FD` in a new session)
# --------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
_HIDDEN = ("/run",)  # covered by an empty read-only tmpfs
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}.get(os.uname().machine)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

_libc = None


def _c():
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _unshare(flags: int) -> None:
    import ctypes
    _check(_c().unshare(ctypes.c_int(flags)), "unshare")


def _mount(source, target, fstype, flags, data=None) -> None:
    import ctypes
    b = lambda s: None if s is None else s.encode()
    _check(_c().mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data)),
           f"mount {source or ''} on {target}")


def _prctl(option: int, arg: int) -> None:
    import ctypes
    _check(_c().prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _report(fd: int, **msg) -> None:
    """One JSON line on the status pipe (kept < PIPE_BUF, so writes are atomic)."""
    line = json.dumps(msg)[:3000] + "\n"
    try:
        os.write(fd, line.encode())
    except OSError:
        pass


def _make_readonly() -> None:
    """Make every mount in our (private) mount namespace read-only and nosuid."""
    if SYS_MOUNT_SETATTR is not None:
        import ctypes
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        ret = _c().syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD),
                           ctypes.c_char_p(b"/"), ctypes.c_uint(AT_RECURSIVE),
                           ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        if ret == 0:
            return
        if ctypes.get_errno() != 38:  # ENOSYS: kernel < 5.12, fall back below
            _check(ret, "mount_setattr(/, RDONLY, AT_RECURSIVE)")
    _remount_each_readonly()


def _remount_each_readonly() -> None:
    """Fallback for old kernels: remount each mount point read-only, one by one."""
    keep = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    with open("/proc/self/mountinfo") as f:  # parents are listed before their children
        entries = [line.split() for line in f]
    for fields in entries:
        point, opts = unescape(fields[4]), fields[5].split(",")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for opt, bit in keep.items():  # unchanged flags must be restated (locked in userns)
            if opt in opts:
                flags |= bit
        if not any(o in opts for o in ("noatime", "relatime", "nodiratime")):
            flags |= MS_STRICTATIME
        try:
            _mount(None, point, None, flags)
        except OSError as e:  # a mount point hidden under another mount cannot be reached
            import errno
            if e.errno not in (errno.ENOENT, errno.EACCES):
                raise


def _loopback_up() -> None:
    """Bring `lo` up in the new network namespace (programs may serve/connect to themselves)."""
    import fcntl
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _expose(path: str, fd: int, scratch: list[str], check_perms: bool) -> None:
    """Keep directory `path` (opened as `fd` before anything was covered) usable at its own
    path: it may now be hidden by one of our tmpfs, or (root mode) sit below a directory the
    sandbox uid may not traverse (e.g. /root, mode 700)."""
    cover = None
    if not any(path == d or path.startswith(d + "/") for d in scratch):
        if not check_perms:
            return
        p = ""
        for part in path.strip("/").split("/"):
            p += "/" + part
            if not os.stat(p).st_mode & stat.S_IXOTH:
                cover = p
                break
        if cover is None:
            return  # reachable as it is
        # An empty tmpfs over the blocking directory hides the rest of it (e.g. /root).
        _mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.makedirs(path, mode=0o755, exist_ok=True)
    # A bind of a read-only mount is itself read-only (and nosuid): nothing to remount.
    _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    if cover:
        _mount(None, cover, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _stage1_setup(cfg: dict) -> None:
    """Namespaces and the filesystem view (runs in the launcher, before the PID-1 fork)."""
    mode = cfg["mode"]
    if mode == "none":
        return
    outer_uid, outer_gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC
    if cfg["netns"]:
        flags |= CLONE_NEWNET
    if mode == "userns":
        flags |= CLONE_NEWUSER  # gives us the capabilities to do the rest, inside only
    _unshare(flags)
    if mode == "userns":
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {outer_uid} 1")
        _write("/proc/self/gid_map", f"0 {outer_gid} 1")
    if cfg["netns"]:
        _loopback_up()
    # Mount changes must not propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    prefix = cfg["python_prefix"]
    prefix_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY) if os.path.isdir(prefix) else -1
    _make_readonly()
    # Fresh, size-capped scratch space over the world-writable directories.
    scratch = [d for d in ("/tmp", "/var/tmp", "/dev/shm")
               if os.path.isdir(d) and not os.path.islink(d)]
    if "/tmp" not in scratch:
        raise OSError("/tmp is not a directory")
    size = cfg["limits"]["disk_mb"]
    for d in scratch:
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=1777")
    # /run holds the host's daemon sockets (databases, dbus, ...), often world-connectable:
    # reachable through the filesystem despite the network namespace.  Hide it.
    for d in _HIDDEN:
        if os.path.isdir(d) and not os.path.islink(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=0755")
            scratch.append(d)
    os.mkdir(WORKDIR, 0o700)
    if mode == "root":
        os.chown(WORKDIR, cfg["uid"], cfg["uid"])
    if prefix_fd >= 0:  # `scratch` now lists every directory we covered
        _expose(prefix, prefix_fd, scratch, check_perms=mode == "root")
        os.close(prefix_fd)


def _set_limits(lim: dict) -> None:
    import math
    import resource as r
    cpu = max(1, math.ceil(lim["cpu_seconds"]))
    mem, fsize = lim["memory_mb"] << 20, lim["file_mb"] << 20
    nofile = min(1024, r.getrlimit(r.RLIMIT_NOFILE)[1])
    nproc = lim["processes"]
    for res, soft, hard in ((r.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU, then SIGKILL 1 s later
                            (r.RLIMIT_AS, mem, mem), (r.RLIMIT_NPROC, nproc, nproc),
                            (r.RLIMIT_FSIZE, fsize, fsize), (r.RLIMIT_CORE, 0, 0),
                            (r.RLIMIT_NOFILE, nofile, nofile)):
        r.setrlimit(res, (soft, hard))


def _exec_program(cfg: dict) -> None:
    """In the program's process: drop privileges, write files, set limits, execve."""
    mode = cfg["mode"]
    if mode == "root":
        uid = cfg["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from here on RLIMIT_NPROC and file permissions apply
    elif mode == "userns":
        # We are uid 0 of our user namespace with all capabilities in it, which would let
        # the program undo our mounts.  A nested user namespace in which we are an ordinary
        # uid leaves no capabilities after execve, and mounts it cannot modify.
        _unshare(CLONE_NEWUSER)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{_USERNS_UID} 0 1")
        _write("/proc/self/gid_map", f"{_USERNS_UID} 0 1")
    os.chdir(cfg["workdir"])
    for name, content in cfg["files"].items():
        path = os.path.join(cfg["workdir"], name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode("latin-1"))
    _set_limits(cfg["limits"])
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no privilege gain through setuid/file-capability binaries
    os.execvpe(cfg["argv"][0], cfg["argv"], cfg["env"])


def _init_main(cfg: dict, status_fd: int) -> None:
    """PID 1 of the new PID namespace: start the program, reap, report its status."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # launcher killed (timeout) -> we die too
        if cfg["mode"] != "none":
            # A /proc for our PID namespace: the host's processes are invisible.
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        pid = os.fork()
    except BaseException as e:
        _report(status_fd, error=f"sandbox init failed: {e!r}")
        os._exit(125)
    if pid == 0:
        try:
            _exec_program(cfg)  # status_fd is close-on-exec: only failures get reported
        except BaseException as e:
            _report(status_fd, error=f"cannot start {cfg['argv'][0]!r} in the sandbox: {e!r}")
        os._exit(126)
    while True:  # as PID 1 we also reap orphans of the program
        try:
            child, st, ru = os.wait4(-1, 0)
        except ChildProcessError:  # cannot happen: our child is still there
            os._exit(125)
        if child == pid:
            break
    msg = {"cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "max_rss_kb": ru.ru_maxrss}
    if os.WIFEXITED(st):
        msg["exit_code"] = os.WEXITSTATUS(st)
    elif os.WIFSIGNALED(st):
        msg["signal"] = os.WTERMSIG(st)
    _report(status_fd, **msg)
    # Exiting makes the kernel kill everything still running in the PID namespace.
    os._exit(0)


def _launcher_main(cfg_fd: int, status_fd: int) -> None:
    os.umask(0o022)
    os.set_inheritable(status_fd, False)  # close-on-exec: the program never gets it
    mode = "?"
    try:
        with os.fdopen(cfg_fd, "rb") as f:
            cfg = json.loads(f.read())
        mode = cfg["mode"]
        if cfg["mode"] == "root":
            cfg["uid"] = _UID_BASE + os.getpid()  # unique among concurrently running sandboxes
        _stage1_setup(cfg)
        init = os.fork()  # the child is PID 1 of the new PID namespace
    except BaseException as e:
        _report(status_fd, error=f"sandbox setup failed (mode {mode}): {e!r}")
        os._exit(125)
    if init == 0:
        _init_main(cfg, status_fd)
    os.waitpid(init, 0)
    os._exit(0)


if __name__ == "__main__":
    _launcher_main(int(sys.argv[1]), int(sys.argv[2]))
