"""The `local` target: the job's processes on this machine, each with the environment a cluster
would give it (a coordinator on 127.0.0.1, its process id, CPU devices standing in for its
accelerators), run and waited for with their output prefixed by rank."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from phijax.errors import UserError
from phijax.launch.spec import Hardware, LaunchSpec
from phijax.train.distributed import PREEMPTED_EXIT_CODE

GRACE_SECONDS = 30  # after one process fails, how long the others get to stop before SIGKILL


@dataclass(frozen=True)
class Process:
    label: str  # its rank, or WORKER.RANK when there are several workers
    env: dict  # the variables a cluster would set for it
    argv: list


def local_processes(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> list[Process]:
    """One process per host of every slice, for each worker (each worker its own coordinator
    port: spec.port + worker)."""
    hosts = hw.hosts * spec.slices
    processes = []
    for worker in range(spec.workers):
        for rank in range(hosts):
            env = {"JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={hw.devices_per_host}"}
            if hosts > 1:
                env.update(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                           JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{spec.port + worker}",
                           JAX_NUM_PROCESSES=str(hosts), JAX_PROCESS_ID=str(rank))
            label = f"{worker}.{rank}" if spec.workers > 1 else str(rank)
            processes.append(Process(label, env, list(argv)))
    return processes


def worst_status(statuses: list[int]) -> int:
    """The job's exit status from its processes' (in the order they ended): the first failure;
    else PREEMPTED_EXIT_CODE when any was preempted; else 0."""
    failed = [s for s in statuses if s not in (0, PREEMPTED_EXIT_CODE)]
    if failed:
        return failed[0]
    return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in statuses else 0


def _check_executable(program: str) -> None:
    if "/" in program:
        if not os.access(program, os.X_OK):
            raise UserError(f"{program} is not an executable file")
    elif shutil.which(program) is None:
        raise UserError(f"{program} is not on PATH")


def _relay(stream, label: str, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[{label}] {line}")
            sys.stdout.flush()


def _status(child: subprocess.Popen) -> int:
    code = child.returncode
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def _wait(children: list[subprocess.Popen]) -> int:
    """Wait for every child; once one fails (not 0, not preempted), stop the others."""
    ended, deadline = [], None
    running = list(children)
    while running:
        for child in [c for c in running if c.poll() is not None]:
            running.remove(child)
            ended.append(_status(child))
            if deadline is None and worst_status(ended) not in (0, PREEMPTED_EXIT_CODE):
                deadline = time.monotonic() + GRACE_SECONDS
                for other in running:
                    other.terminate()
        if deadline is not None and time.monotonic() > deadline:
            for other in running:
                other.kill()
        time.sleep(0.1)
    return worst_status(ended)


def run_local(processes: list[Process]) -> int:
    """Start every process, relay their output line by line as `[rank] line`, forward SIGINT and
    SIGTERM to them, and return the job's exit status (`worst_status`)."""
    _check_executable(processes[0].argv[0])
    lock = threading.Lock()
    children, relays = [], []

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in processes:
            # in their own session: a Ctrl-C reaches them once, forwarded from here
            child = subprocess.Popen(p.argv, env={**os.environ, **p.env, "PYTHONUNBUFFERED": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True)
            children.append(child)
            relays.append(threading.Thread(target=_relay, args=(child.stdout, p.label, lock)))
            relays[-1].start()
        status = _wait(children)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for child in children:  # none left unless something above failed
            if child.poll() is None:
                child.kill()
        for relay in relays:
            relay.join()
    statuses = " ".join(f"{p.label}:{_status(c)}" for p, c in zip(processes, children))
    print(f"phijax launch: processes ended ({statuses}); exit status {status}", file=sys.stderr)
    return status
