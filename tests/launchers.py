"""Two JAX processes on this machine, started the way each launcher starts them: the variables
it sets (and nothing of the test runner's own cluster), gloo collectives, virtual CPU devices.

    phijax   `phijax launch` local: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    slurm    srun --ntasks=2 on one node (srun(1), "OUTPUT ENVIRONMENT VARIABLES"); JAX takes
             the port from the job id, so the job id is one whose port is free
    xpk-gpu  xpk's GPU workloads (xpk/core/docker_resources.py get_gpu_env): a port-less
             JAX_COORDINATOR_ADDRESS, JAX_COORDINATOR_PORT, NNODES, NODE_RANK; Kubernetes adds
             KUBERNETES_SERVICE_HOST and, for an indexed Job, JOB_COMPLETION_INDEX
    xpk-cpu  xpk's CPU workloads (get_cpu_env): a port-less JAX_COORDINATOR_ADDRESS (port 1234,
             the one xpk opens), JAX_PROCESS_COUNT, PROCESSES_IN_JOB, JOB_INDEX,
             JOB_COMPLETION_INDEX
The pod-0 DNS name xpk puts in JAX_COORDINATOR_ADDRESS is `localhost` here.
"""
import os
import random
import socket
import signal
import subprocess
import sys
import time

from conftest import ROOT, free_port, read_metrics

STYLES = ("phijax", "slurm", "xpk-gpu", "xpk-cpu")
SLURM_PORTS = 65535 - 2**12 + 1  # JAX's SLURM port: this + job id % 4096
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR",
                     "JAX_NUM_PROCESSES", "JAX_PROCESS_", "KUBERNETES_", "JOB_COMPLETION_INDEX",
                     "JOB_INDEX", "PROCESSES_IN_JOB", "NNODES", "NODE_RANK")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def slurm_job_id() -> int:
    """A job id whose coordinator port (as JAX picks it for SLURM) is free now."""
    while True:
        job = random.randrange(100_000, 10_000_000)
        if port_is_free(SLURM_PORTS + job % 2**12):
            return job


def launcher_envs(style: str, processes: int = 2) -> list[dict]:
    """For each process of a job of `style`, the variables its launcher sets."""
    if style == "phijax":
        port = free_port()
        return [{"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                 "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(rank)}
                for rank in range(processes)]
    if style == "slurm":
        job, n = str(slurm_job_id()), str(processes)
        return [{"SLURM_JOB_ID": job, "SLURM_JOBID": job, "SLURM_STEP_ID": "0",
                 "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
                 "SLURM_STEP_NODELIST": "localhost", "SLURM_NNODES": "1",
                 "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS": n, "SLURM_NPROCS": n,
                 "SLURM_STEP_NUM_TASKS": n, "SLURM_TASKS_PER_NODE": n,
                 "SLURM_STEP_TASKS_PER_NODE": n, "SLURM_NODEID": "0",
                 "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
                for rank in range(processes)]
    if style == "xpk-gpu":
        port = free_port()
        return [{"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
                 "JOB_COMPLETION_INDEX": str(rank), "JOBSET_NAME": "phijax",
                 "REPLICATED_JOB_NAME": "slice-job", "NNODES": str(processes),
                 "NODE_RANK": str(rank), "GPUS_PER_NODE": "2",
                 "JAX_COORDINATOR_ADDRESS": "localhost", "JAX_COORDINATOR_PORT": str(port)}
                for rank in range(processes)]
    if style == "xpk-cpu":
        return [{"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
                 "REPLICATED_JOB_NAME": "slice-job", "JOB_INDEX": "0",
                 "JOB_COMPLETION_INDEX": str(rank), "PROCESSES_IN_JOB": str(processes),
                 "JAX_PROCESS_COUNT": str(processes), "JAX_COORDINATOR_ADDRESS": "localhost"}
                for rank in range(processes)]
    raise ValueError(style)


def start(command: list, envs: list[dict], devices: int) -> list[subprocess.Popen]:
    """`python COMMAND` once per launcher environment, `devices` CPU devices each."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    base.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    return [subprocess.Popen([sys.executable, *map(str, command)], env={**base, **env},
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for env in envs]


def start_two(*args, style: str = "phijax", devices: int = 4, envs=None):
    """`phijax train ARGS` as the two processes of one job started by `style`'s launcher (or
    with `envs`, the same job again), `devices` CPU devices each."""
    return start(["-m", "phijax", "train", *args], envs or launcher_envs(style), devices)


def finish(procs, timeout: float) -> list[str]:
    """Each process's output once all have exited; any still running after `timeout` killed."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def signal_at_step(procs, run_dir, step: int, sig: signal.Signals, timeout: float = 300) -> None:
    """Send `sig` to process 1 (the one that does not write the metrics) once the run in
    `run_dir` has logged `step`, or give up when a process ends or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(m["step"] >= step for m in read_metrics(run_dir)):
            procs[1].send_signal(sig)
            return
        time.sleep(0.01)
