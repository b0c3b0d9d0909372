"""tools.sandbox: each hostile program is contained, reported with the right reason, and the
containment is checked from the outside (files absent, no connection, no processes left)."""

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tools` is a top-level package next to `phijax`
    sys.path.insert(0, str(ROOT))

from tools import sandbox  # noqa: E402
from tools.sandbox import WORKDIR, Limits, SandboxUnavailable, run_python  # noqa: E402
from tools.sandbox.isolate import UID_BASE  # noqa: E402

needs_isolation = pytest.mark.skipif(
    sandbox.isolation_mode() is None,
    reason="no namespace isolation here (not root and no user namespaces)")


def assert_healthy():
    """The parent keeps working: a normal run succeeds."""
    r = run_python("print('alive')")
    assert (r.reason, r.exit_code, r.signal, r.stdout) == ("ok", 0, None, "alive\n"), r


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker`."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def sandbox_uid_processes() -> list[int]:
    """Host pids running as a per-run sandbox uid (root mode)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                uid_line = next(l for l in (p / "status").read_text().splitlines()
                                if l.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if int(uid_line.split()[1]) >= UID_BASE:
                pids.append(int(p.name))
    return pids


def start_sleeper(marker: str, quiet: bool = False) -> str:
    """Program lines that start a detached grandchild in its own session (so it escapes the
    process group) sleeping for 10 minutes, with `marker` in its command line."""
    out = ", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL" if quiet else ""
    return ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-S', '-c', 'import time; time.sleep(600)', "
            f"{marker!r}], start_new_session=True{out})\n")


def wait_until(cond, timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# ---------------------------------------------------------------------------------------
# Normal programs
# ---------------------------------------------------------------------------------------

@needs_isolation
def test_normal_run_stdout_stdin_and_workdir():
    code = """
import os, sys
print(os.getcwd(), sorted(os.listdir('.')))
with open('out.txt', 'w') as f:
    f.write('written inside')
print(open(os.path.join(os.getcwd(), 'out.txt')).read())
print(input()[::-1])
"""
    r = run_python(code, stdin="abc\n")
    assert r.reason == "ok" and r.exit_code == 0 and r.signal is None, r
    assert r.stdout == f"{WORKDIR} ['main.py']\nwritten inside\ncba\n"
    assert r.stderr == "" and not r.stdout_truncated and not r.stderr_truncated
    assert 0 < r.wall_s < 10 and r.cpu_s is not None


@needs_isolation
def test_files_are_placed_in_the_work_dir():
    files = {"helper.py": "ANSWER = 41\n", "data/input.txt": "hello\n", "blob.bin": b"\x00\xff"}
    code = """
import helper
print(helper.ANSWER + 1, open('data/input.txt').read().strip(), open('blob.bin', 'rb').read())
"""
    r = run_python(code, files=files)
    assert r.reason == "ok", r
    assert r.stdout == "42 hello b'\\x00\\xff'\n"
    with pytest.raises(ValueError):
        run_python("pass", files={"../escape.txt": "x"})
    with pytest.raises(ValueError):
        run_python("pass", files={"/etc/escape.txt": "x"})


@needs_isolation
def test_nonzero_exit_and_exceptions():
    r = run_python("import sys\nprint('hi')\nprint('oops', file=sys.stderr)\nsys.exit(3)")
    assert (r.reason, r.exit_code, r.signal) == ("nonzero_exit", 3, None)
    assert r.stdout == "hi\n" and r.stderr == "oops\n"
    r = run_python("def f():\n    raise ValueError('bad')\nf()")
    assert (r.reason, r.exit_code) == ("nonzero_exit", 1)
    assert 'File "/tmp/work/main.py", line 2' in r.stderr and "ValueError: bad" in r.stderr


@needs_isolation
def test_output_beyond_the_cap_is_truncated_and_flagged():
    code = "import sys\nsys.stdout.write('x' * 1_000_000)\nsys.stderr.write('e' * 10)"
    r = run_python(code, limits=Limits(output_kb=4))
    assert r.reason == "ok", r
    assert r.stdout == "x" * 4096 and r.stdout_truncated
    assert r.stderr == "e" * 10 and not r.stderr_truncated


# ---------------------------------------------------------------------------------------
# Hostile programs
# ---------------------------------------------------------------------------------------

@needs_isolation
def test_infinite_loop_hits_the_cpu_limit():
    r = run_python("while True:\n    pass", limits=Limits(cpu_seconds=1, wall_seconds=10))
    assert r.reason == "cpu_limit", r
    assert r.signal in (signal.SIGXCPU, signal.SIGKILL) and r.exit_code is None
    assert r.wall_s < 5
    assert_healthy()


@needs_isolation
def test_wall_timeout_kills_the_whole_tree():
    marker = f"sandbox-sleeper-{uuid.uuid4().hex}"
    code = start_sleeper(marker) + "print('started', flush=True)\ntime.sleep(600)\n"
    r = run_python(code, limits=Limits(wall_seconds=1.5))
    assert r.reason == "timeout", r
    assert r.stdout == "started\n"  # output written before the kill is kept
    assert 1.5 <= r.wall_s < 5
    assert wait_until(lambda: not processes_with(marker)), processes_with(marker)
    assert_healthy()


@needs_isolation
def test_background_processes_do_not_outlive_the_run():
    marker = f"sandbox-daemon-{uuid.uuid4().hex}"
    code = start_sleeper(marker, quiet=True) + "print('bye')\n"
    r = run_python(code)
    assert r.reason == "ok" and r.stdout == "bye\n", r
    assert r.wall_s < 5
    assert wait_until(lambda: not processes_with(marker)), processes_with(marker)


@needs_isolation
def test_fork_bomb_is_contained():
    code = """
import os, time
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print(n, flush=True)
while True:            # and now the classic bomb
    try:
        os.fork()
    except OSError:
        pass
"""
    r = run_python(code, limits=Limits(processes=16, wall_seconds=3))
    assert r.reason == "timeout", r
    n = int(r.stdout)
    assert 1 <= n < 16  # RLIMIT_NPROC really applies (the main process counts too)
    assert r.wall_s < 7
    if sandbox.isolation_mode() == "root":  # nothing of the per-run uid is left running
        assert wait_until(lambda: not sandbox_uid_processes()), sandbox_uid_processes()
    assert_healthy()


@needs_isolation
def test_huge_allocation_hits_the_memory_limit():
    r = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')",
                   limits=Limits(memory_mb=512))
    assert r.reason == "memory", r
    assert r.exit_code == 1 and "MemoryError" in r.stderr and "allocated" not in r.stdout
    assert r.max_rss_kb < 512 * 1024  # the 10 GB were never touched
    assert_healthy()


@needs_isolation
def test_file_size_limit():
    code = "open('big', 'wb').write(b'x' * (4 << 20))"
    r = run_python(code, limits=Limits(file_mb=1))
    assert r.reason == "file_limit", r
    assert "File too large" in r.stderr
    assert_healthy()


CONTAINED = ("Read-only file system", "Permission denied", "No such file or directory")


@needs_isolation
def test_writing_outside_the_work_dir_is_contained():
    tag = uuid.uuid4().hex
    targets = [f"/tmp/sandbox-escape-{tag}", f"/var/tmp/sandbox-escape-{tag}",
               f"/dev/shm/sandbox-escape-{tag}", str(ROOT / f"sandbox-escape-{tag}"),
               str(Path(__file__).parent / f"sandbox-escape-{tag}"),
               f"/etc/sandbox-escape-{tag}", f"/root/sandbox-escape-{tag}",
               f"{WORKDIR}/../sandbox-escape-rel-{tag}"]
    code = f"""
import json
res = {{}}
for p in {targets!r}:
    try:
        with open(p, 'w') as f:
            f.write('escaped')
        res[p] = 'written'
    except OSError as e:
        res[p] = e.strerror
print(json.dumps(res))
"""
    try:
        r = run_python(code)
        assert r.reason == "ok", r
        res = json.loads(r.stdout)
        # The repository, /etc and /root are read-only inside the sandbox (or, for a checkout
        # under /tmp, hidden by the private /tmp) ...
        for p in targets[3:7]:
            assert res[p] in CONTAINED, (p, res[p])
        # ... and whatever succeeded (the private /tmp, /var/tmp, /dev/shm) never reached us.
        for p in targets + [f"/tmp/sandbox-escape-rel-{tag}"]:
            assert not os.path.exists(p), p
        # Each run gets a fresh private /tmp: the previous run's file is gone.
        r2 = run_python(f"import os\nprint(os.path.exists('/tmp/sandbox-escape-{tag}'))")
        assert r2.stdout == "False\n", r2
        # Not catching the error: reported as a failing program.
        r3 = run_python(f"open({str(ROOT / ('sandbox-escape-' + tag))!r}, 'w')")
        assert r3.reason == "nonzero_exit" and any(e in r3.stderr for e in CONTAINED), r3
        assert not (ROOT / f"sandbox-escape-{tag}").exists()
    finally:
        for p in targets:
            if os.path.isfile(p):
                os.unlink(p)
    assert_healthy()


@needs_isolation
def test_no_network_access():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"""
import socket, threading
def attempt(addr):
    try:
        socket.create_connection(addr, timeout=2).close()
        return 'connected'
    except OSError as e:
        return type(e).__name__
print(attempt(('127.0.0.1', {port})))
print(attempt(('8.8.8.8', 53)))
# the sandbox's own loopback works (a program may talk to itself)
srv = socket.create_server(('127.0.0.1', 0))
threading.Thread(target=lambda: srv.accept()[0].sendall(b'self'), daemon=True).start()
with socket.create_connection(srv.getsockname(), timeout=2) as c:
    print(c.recv(4).decode())
socket.create_connection(('127.0.0.1', {port}), timeout=2)
"""
    try:
        r = run_python(code)
        assert r.reason == "nonzero_exit", r
        assert r.stdout.splitlines() == ["ConnectionRefusedError", "OSError", "self"], r
        assert "ConnectionRefusedError" in r.stderr
        with pytest.raises(BlockingIOError):  # nothing ever reached our listener
            listener.accept()
    finally:
        listener.close()
    assert_healthy()


@needs_isolation
@pytest.mark.skipif(not os.access("/run", os.W_OK), reason="needs a writable /run")
def test_host_unix_sockets_are_hidden():
    path = f"/run/phijax-sandbox-test-{uuid.uuid4().hex[:8]}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        os.chmod(path, 0o777)  # world-connectable, like many daemons' sockets
        server.listen(1)
        server.setblocking(False)
        code = f"""
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect({path!r})
    print('connected')
except OSError as e:
    print(type(e).__name__)
"""
        r = run_python(code)
        assert r.reason == "ok" and r.stdout == "FileNotFoundError\n", r
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


@needs_isolation
def test_environment_secret_is_not_visible(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("PHIJAX_TEST_SECRET", secret)
    code = f"""
import os
print(sorted(os.environ))
print(os.environ.get('PHIJAX_TEST_SECRET'))
found = []
for pid in os.listdir('/proc'):          # every environ/cmdline we can see
    for name in ('environ', 'cmdline'):
        try:
            data = open(f'/proc/{{pid}}/{{name}}', 'rb').read()
        except OSError:
            continue
        if b'PHIJAX_TEST_SECRET' in data:
            found.append((pid, name))
try:                                     # the test process itself, by its host pid
    open('/proc/{os.getpid()}/environ', 'rb').read()
    print('parent environ readable')
except OSError as e:
    print(type(e).__name__)
print(found)
"""
    r = run_python(code)
    assert r.reason == "ok", r
    assert secret not in r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(sorted(["HOME", "LANG", "PATH", "TMPDIR"]))
    assert lines[1] == "None" and lines[2] != "parent environ readable" and lines[3] == "[]"
    assert_healthy()


@needs_isolation
def test_concurrent_runs_are_independent():
    results = [None] * 4

    def go(i):
        results[i] = run_python(f"import os, time\nopen('/tmp/x', 'w').write('{i}')\n"
                                f"time.sleep(0.2)\nprint(open('/tmp/x').read(), os.getuid())")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.reason for r in results] == ["ok"] * 4
    assert [r.stdout.split()[0] for r in results] == ["0", "1", "2", "3"]
    if sandbox.isolation_mode() == "root":  # one uid per run
        assert len({r.stdout.split()[1] for r in results}) == 4


# ---------------------------------------------------------------------------------------
# Without isolation
# ---------------------------------------------------------------------------------------

def test_refuses_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_mode", lambda: None)
    with pytest.raises(SandboxUnavailable, match="unsafe=True"):
        run_python("print(1)")
    with pytest.raises(SandboxUnavailable, match="unsafe_allow_network=True"):
        run_python("print(1)", unsafe=True)
    # Explicitly unsafe: rlimits, clean environment and a temporary host directory only.
    monkeypatch.setenv("PHIJAX_TEST_SECRET", "not-for-the-child")
    r = run_python("import os\nprint(os.environ.get('PHIJAX_TEST_SECRET'), os.getcwd())",
                   unsafe=True, unsafe_allow_network=True)
    assert r.reason == "ok" and r.isolation == "none", r
    value, cwd = r.stdout.split()
    assert value == "None" and not os.path.exists(cwd)  # temp dir removed afterwards
    r = run_python("while True:\n    pass", limits=Limits(cpu_seconds=1),
                   unsafe=True, unsafe_allow_network=True)
    assert r.reason == "cpu_limit", r


# ---------------------------------------------------------------------------------------
# The code oracle
# ---------------------------------------------------------------------------------------

def test_entry_point_is_the_code_oracle():
    from importlib.metadata import entry_points
    (ep,) = [e for e in entry_points(group="phijax.sandbox") if e.name == "python"]
    assert ep.load() is sandbox.passes


@needs_isolation
def test_passes_runs_code_then_tests():
    assert sandbox.passes("def f(x):\n    return 2 * x", "assert f(3) == 6")
    assert not sandbox.passes("def f(x):\n    return 2 * x", "assert f(3) == 7")
