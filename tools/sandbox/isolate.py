"""The launcher of one sandboxed run: namespaces, the file view, rlimits, the program.

The caller (`tools.sandbox.launch`) starts this file by its path as
`<python> -I -S -B isolate.py CFG_FD STATUS_FD`, in a new session and with an empty environment:
isolated mode puts neither this directory nor site-packages on sys.path, so this file uses
only the standard library. CFG_FD holds the run's JSON config (argv, env, files, limits, mode);
STATUS_FD is a pipe on which every process reports one JSON line: an error, or the program's
exit status, CPU time and peak memory.

    launcher (still privileged)
      unshare(): new mount, PID, IPC and network namespaces (plus a user namespace when not
      root); every mount read-only and nosuid; size-capped tmpfs over /tmp, /var/tmp and
      /dev/shm; an empty tmpfs over /run; the interpreter's prefix kept reachable
      └─fork─> init: PID 1 of the new PID namespace; mounts a fresh /proc; reaps and reports
                 └─fork─> program: drops privileges, writes the files, setrlimit(), execve()
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import struct
import sys

# Where the program runs inside the namespaces (in unsafe mode a host temp dir is used).
WORKDIR = "/tmp/work"
# Per-run uid/gid when running as root: UID_BASE + launcher pid. Above the ranges used for
# real accounts (and by SSSD id mapping), below 2**31 - 1 for any pid up to pid_max 4194304.
UID_BASE = 2_100_000_000
# The program's uid inside the nested user namespace in "userns" mode.
USERNS_UID = 65534

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


def _enter_namespaces(cfg: dict) -> None:
    """New mount, PID and IPC namespaces (network and user ones as configured); mount changes
    stay private to them."""
    outer_uid, outer_gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC
    if cfg["netns"]:
        flags |= CLONE_NEWNET
    if cfg["mode"] == "userns":
        flags |= CLONE_NEWUSER  # gives us the capabilities to do the rest, inside only
    _unshare(flags)
    if cfg["mode"] == "userns":
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {outer_uid} 1")
        _write("/proc/self/gid_map", f"0 {outer_gid} 1")
    if cfg["netns"]:
        _loopback_up()
    # Mount changes must not propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def _cover_scratch(disk_mb: int) -> list[str]:
    """Fresh, size-capped tmpfs over the world-writable directories and an empty read-only one
    over /run; the directories covered."""
    scratch = [d for d in ("/tmp", "/var/tmp", "/dev/shm")
               if os.path.isdir(d) and not os.path.islink(d)]
    if "/tmp" not in scratch:
        raise OSError("/tmp is not a directory")
    for d in scratch:
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=1777")
    # /run holds the host's daemon sockets (databases, dbus, ...), often world-connectable:
    # reachable through the filesystem despite the network namespace.  Hide it.
    for d in _HIDDEN:
        if os.path.isdir(d) and not os.path.islink(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=0755")
            scratch.append(d)
    return scratch


def _setup(cfg: dict) -> None:
    """Namespaces and the file view (runs in the launcher, before the PID-1 fork)."""
    mode = cfg["mode"]
    if mode == "none":
        return
    _enter_namespaces(cfg)
    prefix = cfg["python_prefix"]
    prefix_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY) if os.path.isdir(prefix) else -1
    _make_readonly()
    scratch = _cover_scratch(cfg["limits"]["disk_mb"])
    os.mkdir(WORKDIR, 0o700)
    if mode == "root":
        os.chown(WORKDIR, cfg["uid"], cfg["uid"])
    if prefix_fd >= 0:
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
        _write("/proc/self/uid_map", f"{USERNS_UID} 0 1")
        _write("/proc/self/gid_map", f"{USERNS_UID} 0 1")
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


def main(cfg_fd: int, status_fd: int) -> None:
    """The launcher: read the config, set up the namespaces, fork init, wait for it."""
    os.umask(0o022)
    os.set_inheritable(status_fd, False)  # close-on-exec: the program never gets it
    mode = "?"
    try:
        with os.fdopen(cfg_fd, "rb") as f:
            cfg = json.loads(f.read())
        mode = cfg["mode"]
        if cfg["mode"] == "root":
            cfg["uid"] = UID_BASE + os.getpid()  # unique among concurrently running sandboxes
        _setup(cfg)
        init = os.fork()  # the child is PID 1 of the new PID namespace
    except BaseException as e:
        _report(status_fd, error=f"sandbox setup failed (mode {mode}): {e!r}")
        os._exit(125)
    if init == 0:
        _init_main(cfg, status_fd)
    os.waitpid(init, 0)
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
