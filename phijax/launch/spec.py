"""The launch spec: what to run (`command`), where (`target`), on what hardware, how often to retry.

A spec is a typed dataclass loaded like every other config (`phijax.config.load` / `from_dict`),
then checked across fields by `check`, which also derives the hardware each host has from
`topology` (a name `phijax plan` accepts, through its chip table) or `nodes`/`gpus_per_node`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from phijax.config import check_fields, load_config, one_of, positive, ranged, validate
from phijax.errors import ConfigError
from phijax.plan.chips import parse_topology

TARGETS = ("local", "tpu-vm", "xpk", "jobset", "k8s-job", "slurm", "skypilot")
# The hardware each target runs on, and which run containers (and so need --image).
RUNS_ON = {"local": {"tpu", "gpu", "cpu"}, "tpu-vm": {"tpu"}, "xpk": {"tpu"},
           "jobset": {"tpu", "gpu", "cpu"}, "k8s-job": {"gpu", "cpu"}, "slurm": {"gpu", "cpu"},
           "skypilot": {"tpu", "gpu", "cpu"}}
CONTAINER_TARGETS = ("xpk", "jobset", "k8s-job")
MULTISLICE_TARGETS = ("local", "tpu-vm", "xpk", "jobset")
TRAINING_COMMANDS = ("train", "sft", "dpo")
NAME_PATTERN = r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?"  # a DNS label short enough for pod names

# Per TPU family: the name Cloud TPU, xpk and SkyPilot give it, GKE's node label for it, and
# the TPU VM runtime to create it with.
TPU_FAMILIES = {
    "v4": ("v4", "tpu-v4-podslice", "tpu-ubuntu2204-base"),
    "v5e": ("v5litepod", "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p", "tpu-v5p-slice", "v2-alpha-tpuv5"),
    "v6e": ("v6e", "tpu-v6e-slice", "v2-alpha-tpuv6e"),
}
GPUS_PER_NODE = 8  # how an h100xN / h200xN topology is split into nodes


@dataclass
class LaunchSpec:
    name: str  # job, JobSet, queued resource or workload name: a DNS label of 40 characters at most
    target: str = one_of(*TARGETS)
    command: list[str] = field(default_factory=list)  # what every host runs, as an argv
    topology: Optional[str] = None  # a TPU slice (v5p-128, v6e-16), h100xN, h200xN or cpu-N
    nodes: Optional[int] = positive(None)  # or: hosts (GPU or CPU nodes) ...
    gpus_per_node: int = ranged(0, ge=0)  # ... with this many GPUs each (0: CPU nodes)
    gpu_type: str = "H100"  # SkyPilot's accelerator name for the GPUs
    slices: int = positive(1)  # TPU slices joined over the data-center network (multislice)
    workers: int = positive(1)  # independent copies of the whole job, each running `command`
    max_restarts: int = ranged(3, ge=0)  # restarts after a failure; preemptions (exit 42) are free
    image: Optional[str] = None  # a container image with phijax installed
    venv: Optional[str] = None  # or: a virtual environment with phijax, at this path on every host
    port: int = ranged(8476, gt=0, lt=65536)  # the JAX coordinator's port (local: the first one)
    project: Optional[str] = None  # Google Cloud project (tpu-vm, xpk)
    zone: Optional[str] = None  # Google Cloud zone (tpu-vm, xpk, skypilot)
    cluster: Optional[str] = None  # the xpk cluster
    namespace: Optional[str] = None  # Kubernetes namespace (jobset, k8s-job)
    partition: Optional[str] = None  # SLURM partition
    time: Optional[str] = None  # SLURM time limit, e.g. 24:00:00
    # gs://B or s3://B (a folder in it too): run.dir defaults to B/runs/NAME, for a training
    # command that sets no run.dir=... of its own
    bucket: Optional[str] = None


@dataclass(frozen=True)
class Hardware:
    """What one slice (TPU) or one job (GPU, CPU nodes) is made of."""
    kind: str  # "tpu", "gpu" or "cpu"
    hosts: int  # processes of one slice or job, one per host
    devices_per_host: int  # JAX devices each process has (one per TPU chip, megacore)
    description: str  # e.g. "v5p-128: 64 chips, 16 hosts of 4"
    accelerator: Optional[str] = None  # TPU: v5p-128, v5litepod-16; GPU: H100
    gke_accelerator: Optional[str] = None  # TPU: cloud.google.com/gke-tpu-accelerator
    gke_topology: Optional[str] = None  # TPU: cloud.google.com/gke-tpu-topology, e.g. 4x4x4
    runtime_version: Optional[str] = None  # TPU VM software version

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host


def _tpu_hardware(name: str) -> Hardware:
    topo = parse_topology(name)
    family, shape = topo.libtpu_name.split(":")
    cloud_name, gke_label, runtime = TPU_FAMILIES[family]
    chips = topo.chips
    # v4 and v5p hosts hold 4 chips; v5e and v6e slices of up to 8 chips are one host
    per_host = chips if family in ("v5e", "v6e") and chips <= 8 else min(chips, 4)
    hosts = chips // per_host
    count = topo.accelerator.split("-")[1]
    plural = "s" * (hosts > 1)
    description = f"{topo.accelerator}: {chips} chips, {hosts} host{plural} of {per_host}"
    return Hardware("tpu", hosts, per_host, description, f"{cloud_name}-{count}", gke_label, shape,
                    runtime)


def hardware(spec: LaunchSpec) -> Hardware:
    """The hardware of one slice or job, from `topology` or `nodes` and `gpus_per_node`."""
    if spec.topology is not None and spec.nodes is not None:
        raise ConfigError("give --topology or --nodes (with --gpus-per-node), not both")
    if spec.topology is None:
        nodes, gpus = spec.nodes or 1, spec.gpus_per_node
        hosts = f"node{'s' * (nodes > 1)}"
        if not gpus:
            return Hardware("cpu", nodes, 1, f"{nodes} CPU {hosts}")
        return Hardware("gpu", nodes, gpus, f"{nodes} {hosts} of {gpus} {spec.gpu_type}",
                        spec.gpu_type)
    if spec.gpus_per_node:
        raise ConfigError(f"--gpus-per-node goes with --nodes; --topology {spec.topology} "
                          f"names the devices itself")
    topo = parse_topology(spec.topology)
    if topo.kind == "tpu":
        return _tpu_hardware(spec.topology)
    if topo.kind == "cpu":
        return Hardware("cpu", 1, topo.devices,
                        f"{topo.name}: one host of {topo.devices} CPU devices")
    n = topo.devices
    if n > GPUS_PER_NODE and n % GPUS_PER_NODE:
        raise ConfigError(f"--topology {topo.name}: more than {GPUS_PER_NODE} GPUs come in nodes "
                          f"of {GPUS_PER_NODE}; give a multiple of {GPUS_PER_NODE}")
    per_node = min(n, GPUS_PER_NODE)
    gpu = topo.chip.name.split()[1]  # "NVIDIA H100 SXM" -> H100
    return Hardware("gpu", n // per_node, per_node,
                    f"{topo.name}: {n // per_node} node(s) of {per_node} {gpu}", gpu)


def check(spec: LaunchSpec) -> Hardware:
    """Every field's range, then the checks across fields (one line naming the flags at fault);
    returns the spec's hardware."""
    check_fields(spec)
    if not re.fullmatch(NAME_PATTERN, spec.name):
        raise ConfigError(f"--name {spec.name!r}: lowercase letters, digits and '-', starting with "
                          f"a letter, 40 characters at most (it names pods and cloud resources)")
    if not spec.command:
        raise ConfigError("command: empty; give the argv every host runs")
    hw = hardware(spec)
    t = spec.target
    if hw.kind not in RUNS_ON[t]:
        wants = "a TPU slice (--topology v5p-128)" if RUNS_ON[t] == {"tpu"} else \
            "GPU or CPU nodes (--nodes N [--gpus-per-node G])"
        raise ConfigError(f"{t} runs on {wants}, not {hw.description}")
    if spec.image and spec.venv:
        raise ConfigError("give --image or --venv, not both")
    if t in CONTAINER_TARGETS and not spec.image:
        raise ConfigError(f"{t} runs containers: give --image, an image with phijax installed")
    if t == "local" and spec.image:
        raise ConfigError("local runs on this machine: --venv, not --image")
    if t == "xpk" and not spec.cluster:
        raise ConfigError("xpk needs --cluster, the xpk cluster to run on")
    if spec.slices > 1 and (t not in MULTISLICE_TARGETS or hw.kind != "tpu"):
        raise ConfigError(f"--slices {spec.slices}: multislice is for TPU slices on "
                          f"{', '.join(MULTISLICE_TARGETS)}")
    if spec.workers > 1 and t == "tpu-vm":
        raise ConfigError("tpu-vm runs one copy of the job; for workers > 1 use xpk or jobset")
    if spec.workers > 1 and spec.slices > 1:
        raise ConfigError("give --slices or workers > 1, not both")
    if spec.bucket is not None:
        _check_bucket(spec)
    return hw


def _check_bucket(spec: LaunchSpec) -> None:
    from phijax.paths import is_url

    if not is_url(spec.bucket):
        raise ConfigError(f"--bucket {spec.bucket}: give gs://BUCKET or s3://BUCKET")
    if _training_args(spec.command) is None:
        raise ConfigError(f"--bucket sets run.dir of {'|'.join(TRAINING_COMMANDS)}, not of "
                          f"`{' '.join(spec.command[:3])}`")


def bucket_run_dir(spec: LaunchSpec) -> Optional[str]:
    """BUCKET/runs/NAME, the run.dir --bucket gives a training command that sets none on its
    command line; None without --bucket or when the command sets run.dir itself."""
    if spec.bucket is None or _training_args(spec.command) is None or \
            any(a.startswith("run.dir=") for a in spec.command[3:]):
        return None
    return f"{spec.bucket.rstrip('/')}/runs/{spec.name}"


def host_command(spec: LaunchSpec) -> list[str]:
    """`command`, with run.dir=BUCKET/runs/NAME added when --bucket gives it."""
    run_dir = bucket_run_dir(spec)
    return [*spec.command, f"run.dir={run_dir}"] if run_dir else list(spec.command)


def _training_args(command: list[str]) -> Optional[list[str]]:
    """The overrides of a `phijax train|sft|dpo CONFIG key=value ...` command (None for any
    other command)."""
    if len(command) < 3 or Path(command[0]).name != "phijax" or command[1] not in TRAINING_COMMANDS:
        return None
    return [a for a in command[3:] if "=" in a and not a.startswith("-")]


def _training_config(command: list[str]):
    """The config of a `phijax train|sft|dpo CONFIG key=value ...` command, loaded and checked
    (None for any other command)."""
    overrides = _training_args(command)
    return None if overrides is None else load_config(command[2], overrides)


def check_training(spec: LaunchSpec) -> list[str]:
    """For a `phijax train|sft|dpo` command: its config loaded and checked against the devices
    one copy of the job has (a mesh that does not match fails here, not on the cluster);
    returns warnings, such as a relative run.dir on several hosts."""
    from phijax.paths import is_url  # etils: only once a config is checked

    hw = check(spec)
    cfg = _training_config(host_command(spec))
    if cfg is None:
        return []
    devices = hw.devices * spec.slices
    try:
        validate(cfg, device_count=devices)
    except ConfigError as e:
        slices = f" x {spec.slices} slices" * (spec.slices > 1)
        raise ConfigError(f"{e} on {hw.description}{slices}")
    hosts = hw.hosts * spec.slices
    if hosts > 1 and cfg.run.distributed == "off":
        raise ConfigError(f"run.distributed=off would run each of the {hosts} hosts on its own")
    if hosts > 1 and hw.kind == "tpu" and spec.target in ("tpu-vm", "skypilot") and \
            cfg.run.distributed == "auto":
        raise ConfigError(f"the {hosts} hosts of a TPU VM slice find each other only under "
                          f"run.distributed=on (JAX asks the metadata server): add "
                          f"run.distributed=on")
    run_dir = cfg.run.dir
    if spec.target != "local" and hosts > 1 and hw.kind == "tpu" and not is_url(run_dir):
        return [f"run.dir {run_dir} is a local path: the {hosts} hosts of a TPU slice share no "
                f"file system (unless each mounts one there); give --bucket gs://BUCKET (run.dir "
                f"gs://BUCKET/runs/{spec.name}) or run.dir=gs://..."]
    if spec.target != "local" and hosts > 1 and not is_url(run_dir) and \
            not Path(run_dir).expanduser().is_absolute():
        return [f"run.dir {run_dir} is relative: each of the {hosts} hosts resolves it in its own "
                f"working directory; give a bucket (gs://...) or an absolute path every host "
                f"shares"]
    return []
