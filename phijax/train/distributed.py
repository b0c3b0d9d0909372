"""Multi-host start-up: find the cluster this process runs in, start JAX's distributed system,
and say so in one line on every host. Also the exit status of a preempted run.

Under `run.distributed: auto` the distributed system starts when the environment shows several
processes: the first of these clusters that matches (JAX's order) names the cluster,

    OMPI_COMM_WORLD_SIZE > 1           Open MPI's mpirun
    SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID, SLURM_LOCALID     srun
    TPU_WORKER_HOSTNAMES or MEGASCALE_COORDINATOR_ADDRESS    TPU slices on GKE, multislice
    KUBERNETES_SERVICE_HOST with JOB_COMPLETION_INDEX        Kubernetes indexed Jobs, JobSets

or JAX_COORDINATOR_ADDRESS is set (phijax's local launcher, xpk's GPU and CPU workloads,
scripts); that address, and a process count and id set beside it, win over a cluster's own.
JAX_NUM_PROCESSES=1 says a process runs alone whatever else the environment shows (the
single-host pods of an indexed Job carry the Kubernetes signature).
`on` starts it in any case (a TPU VM's workers, for one, are found by JAX from the metadata
server), `off` never. What the environment names explicitly is passed to
`jax.distributed.initialize`; everything else is left to JAX's own cluster detection
(`jax._src.clusters`: the first SLURM node and a port from the job id, Open MPI's launcher
address, the first TPU worker, the Job's pod 0). Launchers' aliases are accepted: the process
count from JAX_NUM_PROCESSES, JAX_PROCESS_COUNT (xpk CPU) or NNODES (xpk GPU); the process id
from JAX_PROCESS_ID, NODE_RANK (xpk GPU), JOB_INDEX * PROCESSES_IN_JOB + JOB_COMPLETION_INDEX
(xpk CPU, several slices) or JOB_COMPLETION_INDEX; a coordinator address without a port takes
JAX_COORDINATOR_PORT, else 1234 (the port xpk opens for CPU workloads).

Imports nothing heavy at module level, so launch templates and sweeps can read
PREEMPTED_EXIT_CODE cheaply.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from phijax.errors import ConfigError

log = logging.getLogger("phijax")

# A run stopped by SIGTERM or SIGUSR1 saved a checkpoint on every host and exits with this status:
# retryable, for xpk's and JobSet's podFailurePolicy and SLURM's requeue; the same command resumes.
PREEMPTED_EXIT_CODE = 42

DEFAULT_PORT = "1234"
ADDRESS = "JAX_COORDINATOR_ADDRESS"
COUNT = ("JAX_NUM_PROCESSES", "JAX_PROCESS_COUNT", "NNODES")
XPK_CPU_RANK = "JOB_INDEX * PROCESSES_IN_JOB + JOB_COMPLETION_INDEX"  # slice, hosts per slice, host
RANK = ("JAX_PROCESS_ID", "NODE_RANK", XPK_CPU_RANK, "JOB_COMPLETION_INDEX")
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OMPI_URI = "OMPI_MCA_orte_hnp_uri"  # set by Open MPI 4's mpirun; JAX reads the address from it


@dataclass(frozen=True)
class Start:
    """How to start: `cluster` names what was detected, `kwargs` what the environment says
    explicitly (the rest JAX detects), `sources` the variables they came from."""
    cluster: str
    kwargs: dict = field(default_factory=dict)
    sources: tuple = ()


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None


def _cluster(env: Mapping[str, str]) -> Optional[str]:
    """The first multi-process signature in the environment, JAX's order; None when none."""
    if "OMPI_COMM_WORLD_SIZE" in env and _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "open-mpi"
    if all(k in env for k in SLURM) and _int(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if "TPU_WORKER_HOSTNAMES" in env or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "kubernetes"
    return None


def _address(env: Mapping[str, str]) -> str:
    """JAX_COORDINATOR_ADDRESS as HOST:PORT; a port-less one takes JAX_COORDINATOR_PORT or 1234."""
    address = env[ADDRESS].strip()
    if re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+):\d+", address):
        return address
    if not re.fullmatch(r"\[[^\]]+\]|[^:\[\]]+", address):
        raise ConfigError(f"{ADDRESS}={address!r} is not HOST or HOST:PORT")
    port = env.get("JAX_COORDINATOR_PORT", DEFAULT_PORT)
    if not port.isdigit():
        raise ConfigError(f"JAX_COORDINATOR_PORT={port!r} is not a port number")
    return f"{address}:{port}"


def _has(env: Mapping[str, str], name: str) -> bool:
    if name == XPK_CPU_RANK:
        return all(k in env for k in ("JOB_INDEX", "PROCESSES_IN_JOB", "JOB_COMPLETION_INDEX"))
    return name in env


def _value(env: Mapping[str, str], name: str) -> int:
    if name == XPK_CPU_RANK:
        return _int(env, "JOB_INDEX") * _int(env, "PROCESSES_IN_JOB") + \
            _int(env, "JOB_COMPLETION_INDEX")
    return _int(env, name)


def _explicit(env: Mapping[str, str]) -> tuple[dict, list]:
    """(kwargs, source variables) for what the environment names: the coordinator address, the
    process count and id. Launchers' aliases count only beside an address (a script's NNODES
    under srun may count nodes, not processes)."""
    kwargs, sources = {}, []
    if ADDRESS in env:
        kwargs["coordinator_address"], sources = _address(env), [ADDRESS]
    aliases = ADDRESS in env
    for key, names in (("num_processes", COUNT), ("process_id", RANK)):
        name = next((k for k in (names if aliases else names[:1]) if _has(env, k)), None)
        if name:
            kwargs[key] = _value(env, name)
            sources.append(name)
    return kwargs, sources


def _cluster_kwargs(cluster: Optional[str], env: Mapping[str, str]) -> dict:
    """What phijax reads itself for a cluster: Open MPI's count and rank (JAX reads them only
    with OMPI_MCA_orte_hnp_uri, which Open MPI 5 no longer sets). JAX reads the others."""
    if cluster == "open-mpi":
        return {"num_processes": _int(env, "OMPI_COMM_WORLD_SIZE"),
                "process_id": _int(env, "OMPI_COMM_WORLD_RANK")}
    return {}


def _jax_completes(cluster: Optional[str], env: Mapping[str, str], kubernetes: bool) -> bool:
    """Whether JAX's own detection finds what the environment leaves out for `cluster`."""
    return cluster in ("slurm", "tpu") or (cluster == "open-mpi" and OMPI_URI in env) or \
        (cluster == "kubernetes" and kubernetes)


def _check_complete(kwargs: dict, trigger: str) -> None:
    """ConfigError naming the first variable missing from a start JAX cannot complete."""
    for key, names in (("coordinator_address", (ADDRESS,)), ("num_processes", COUNT),
                       ("process_id", RANK)):
        if key not in kwargs:
            also = f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""
            raise ConfigError(f"{trigger} is set but {names[0]} is not{also}; set it, or "
                              f"run.distributed=off for a single process")


def plan(env: Mapping[str, str], mode: str = "auto", kubernetes: Optional[bool] = None
         ) -> Optional[Start]:
    """How this process joins a multi-process JAX job under `run.distributed: mode`, from the
    environment alone; None when it runs on its own. `kubernetes`: whether the kubernetes
    package (which JAX's Kubernetes detection needs) is installed; looked up when None."""
    if mode == "off":
        return None
    cluster = _cluster(env)
    explicit, sources = _explicit(env)
    if mode == "auto" and explicit.get("num_processes") == 1:
        return None  # one process said so (a single-host pod of an indexed Job, a sweep worker)
    kwargs = {**_cluster_kwargs(cluster, env), **explicit}
    if cluster is None and ADDRESS not in env:
        if explicit:
            raise ConfigError(f"{sources[0]} is set but {ADDRESS} is not")
        return Start("jax", {}, ()) if mode == "on" else None
    if kubernetes is None:
        kubernetes = importlib.util.find_spec("kubernetes") is not None
    if not _jax_completes(cluster, env, kubernetes):
        trigger = {None: ADDRESS, "open-mpi": "OMPI_COMM_WORLD_SIZE (without " + OMPI_URI + ")",
                   "kubernetes": "JOB_COMPLETION_INDEX (a Kubernetes indexed Job; JAX's own "
                                 "detection needs the kubernetes package)"}[cluster]
        _check_complete(kwargs, trigger)
    if not 0 <= kwargs.get("process_id", 0) < kwargs.get("num_processes", math.inf):
        raise ConfigError(f"process id {kwargs['process_id']} is not below the process count "
                          f"{kwargs['num_processes']} ({', '.join(sources)})")
    if len(explicit) == 3 and cluster not in ("slurm", "open-mpi"):
        # nothing left for JAX to detect (no Kubernetes API lookups in a pod)
        kwargs["cluster_detection_method"] = "deactivate"
    return Start(cluster or "environment", kwargs, tuple(sources))


def initialize(mode: str = "auto", timeout: int = 300) -> Optional[Start]:
    """Start JAX's distributed system as `plan` says (waiting up to `timeout` seconds for the
    other processes; JAX ends the process when they do not come) and log one line on every
    host: cluster, process id and count, local and global device counts. Must run before
    anything touches a JAX device; a second call does nothing."""
    start = plan(os.environ, mode)
    if start is None:
        return None
    import jax

    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**start.kwargs, initialization_timeout=timeout)
        except ValueError as e:  # what JAX's detection could not find
            raise ConfigError(f"run.distributed={mode}: {start.cluster}: {e}") from None
    via = f" ({', '.join(start.sources)})" if start.sources else ""
    log.info("distributed: %s%s, process %d of %d, %d local devices, %d global", start.cluster,
             via, jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return start
