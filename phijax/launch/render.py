"""A launch spec rendered through its target's template (`launch/<target>.*.j2` in the source
tree): a gcloud script, xpk command, JobSet, Indexed Job, sbatch script, SkyPilot task or the
local processes. Templates get the spec, its hardware and what each target needs worked out
here (environment variables, argvs); everything else is in the template, readable on its own."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

import phijax
from phijax.errors import UserError
from phijax.launch.local import local_processes
from phijax.launch.spec import Hardware, LaunchSpec, bucket_run_dir, check, host_command
from phijax.train.distributed import PREEMPTED_EXIT_CODE

# Each target's rendered file (after the spec's name) and its template, `<suffix>.j2`.
SUFFIXES = {"local": "local.sh", "tpu-vm": "tpu-vm.sh", "xpk": "xpk.sh", "jobset": "jobset.yaml",
            "k8s-job": "k8s-job.yaml", "slurm": "slurm.sbatch", "skypilot": "skypilot.yaml"}
MEGASCALE_PORT = 8080  # the data-center network port slices talk over
JOB_INDEX = "metadata.annotations['jobset.sigs.k8s.io/job-index']"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass(frozen=True)
class Rendered:
    name: str  # a file name: <spec.name>.<target's suffix>
    text: str


def templates_dir() -> Path:
    """`launch/` beside the `phijax` package: the templates live in the source tree."""
    folder = Path(phijax.__file__).resolve().parent.parent / "launch"
    if not folder.is_dir():
        raise UserError(f"the launch templates folder {folder} is missing: phijax launch reads "
                        f"them from phijax's source tree (pip install -e . in a clone)")
    return folder


def _sh(value) -> str:
    """One shell word, or a whole argv."""
    if isinstance(value, (list, tuple)):
        return shlex.join(map(str, value))
    return shlex.quote(str(value))


def _yq(value) -> str:
    """A YAML scalar (strings quoted where YAML would read them otherwise)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
    return text.removesuffix("\n...\n").strip()


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir()),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(sh=_sh, yq=_yq)
    return env


def host_argv(spec: LaunchSpec) -> list[str]:
    """The argv every host runs: `command`, its program taken from the venv's bin/ (--venv)."""
    argv = host_command(spec)
    if spec.venv and "/" not in argv[0]:
        argv[0] = f"{spec.venv.rstrip('/')}/bin/{argv[0]}"
    return argv


def _env(name: str, value: str | None = None, field: str | None = None) -> dict:
    return {"name": name, "value": value, "field": field}


def _cpu_env(hw: Hardware) -> list[dict]:
    """Several CPU devices per host (--topology cpu-N) are XLA's host-platform devices."""
    if hw.kind == "cpu" and hw.devices_per_host > 1:
        return [_env("XLA_FLAGS", f"--xla_force_host_platform_device_count={hw.devices_per_host}")]
    return []


def _resource(hw: Hardware) -> tuple[str, int] | None:
    return {"tpu": ("google.com/tpu", hw.devices_per_host),
            "gpu": ("nvidia.com/gpu", hw.devices_per_host)}.get(hw.kind)


def _tpu_vm(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> dict:
    # multislice: set on each host by the ssh command; $COORDINATOR and $slice are the script's
    megascale = {"MEGASCALE_COORDINATOR_ADDRESS": f"$COORDINATOR:{MEGASCALE_PORT}",
                 "MEGASCALE_NUM_SLICES": str(spec.slices), "MEGASCALE_SLICE_ID": "$slice",
                 "MEGASCALE_PORT": str(MEGASCALE_PORT)} if spec.slices > 1 else {}
    remote = shlex.join(argv)
    if spec.image:  # sudo drops the environment: each variable is handed to the container
        env = "".join(f' -e {k}="${k}"' for k in megascale)
        remote = f"sudo docker run --rm --net=host --privileged{env} {_sh([spec.image, *argv])}"
    return {"remote": remote, "megascale": megascale}


def _xpk(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> dict:
    commands = []
    for worker in range(spec.workers):
        name = spec.name if spec.workers == 1 else f"{spec.name}-{worker}"
        flags = [("--workload", name), ("--cluster", spec.cluster), ("--project", spec.project),
                 ("--zone", spec.zone), ("--tpu-type", hw.accelerator),
                 ("--num-slices", spec.slices), ("--max-restarts", spec.max_restarts),
                 ("--docker-image", spec.image), ("--command", shlex.join(argv))]
        commands.append([(flag, value) for flag, value in flags if value is not None])
    return {"commands": commands}


def _jobset(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> dict:
    rjob = "slice" if hw.kind == "tpu" else "job"
    first_pod = f"{spec.name}-{rjob}-0-0.{spec.name}"  # <jobset>-<job>-<job index>-<pod index>
    env = _cpu_env(hw)
    if spec.slices > 1:
        env += [_env("MEGASCALE_COORDINATOR_ADDRESS", f"{first_pod}:{MEGASCALE_PORT}"),
                _env("MEGASCALE_NUM_SLICES", str(spec.slices)),
                _env("MEGASCALE_SLICE_ID", field=JOB_INDEX),
                _env("MEGASCALE_PORT", str(MEGASCALE_PORT))]
    elif hw.kind != "tpu" and hw.hosts > 1:  # TPU hosts find each other through GKE's variables
        env += [_env("JOB_INDEX", field=JOB_INDEX),
                _env("JAX_COORDINATOR_ADDRESS",
                     f"{spec.name}-{rjob}-$(JOB_INDEX)-0.{spec.name}:{spec.port}"),
                _env("JAX_NUM_PROCESSES", str(hw.hosts)),
                _env("JAX_PROCESS_ID", field=COMPLETION_INDEX)]
    elif hw.kind != "tpu":  # one host: the pod's indexed-Job variables must not start JAX's
        env.append(_env("JAX_NUM_PROCESSES", "1"))  # distributed system
    return {"rjob": rjob, "replicas": spec.slices if spec.slices > 1 else spec.workers,
            "env": env, "resource": _resource(hw)}


def _k8s_job(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> dict:
    env, command = _cpu_env(hw), argv
    n = hw.hosts
    if n > 1:  # pods i*n ... i*n+n-1 are worker i's processes 0 ... n-1; its pod 0 coordinates
        script = (f"i=$JOB_COMPLETION_INDEX; export JAX_PROCESS_ID=$((i % {n})) "
                  f"JAX_COORDINATOR_ADDRESS={spec.name}-$((i - i % {n})).{spec.name}:{spec.port}; "
                  f'exec "$@"')
        command = ["sh", "-c", script, "sh", *argv]
    env.append(_env("JAX_NUM_PROCESSES", str(n)))  # 1: a pod of its own, not a JAX job
    return {"pods": n * spec.workers, "command": command, "env": env, "resource": _resource(hw)}


def _slurm(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> dict:
    container = ["--container-image", spec.image] if spec.image else []
    return {"tasks_per_node": hw.devices_per_host if hw.kind == "gpu" else 1,
            "srun": ["srun", "--kill-on-bad-exit=1", *container, *argv], "env": _cpu_env(hw)}


def _skypilot(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> dict:
    accelerators = {"tpu": f"tpu-{hw.accelerator}",
                    "gpu": f"{hw.accelerator}:{hw.devices_per_host}"}.get(hw.kind)
    jax_extra = {"tpu": ' "jax[tpu]"', "gpu": ' "jax[cuda12]"'}.get(hw.kind, "")
    install = None if spec.image or spec.venv else f"pip install -e .{jax_extra}"
    return {"accelerators": accelerators, "install": install, "env": _cpu_env(hw),
            "num_nodes": 1 if hw.kind == "tpu" else hw.hosts,  # a TPU pod is one SkyPilot node
            "coordinator": hw.kind != "tpu" and hw.hosts > 1}


def _local(spec: LaunchSpec, hw: Hardware, argv: list[str]) -> dict:
    processes = local_processes(spec, hw, argv)
    shared = {k: v for k, v in processes[0].env.items()
              if all(p.env.get(k) == v for p in processes)}
    own = [{k: v for k, v in p.env.items() if k not in shared} for p in processes]
    return {"processes": processes, "shared": shared, "own": own}


CONTEXTS = {"local": _local, "tpu-vm": _tpu_vm, "xpk": _xpk, "jobset": _jobset,
            "k8s-job": _k8s_job, "slurm": _slurm, "skypilot": _skypilot}


def render(spec: LaunchSpec) -> list[Rendered]:
    """The files that launch `spec` on its target (checked first: one line naming what is wrong)."""
    hw = check(spec)
    argv = host_argv(spec)
    context = {"spec": spec, "hw": hw, "argv": argv, "preempted": PREEMPTED_EXIT_CODE,
               "bucket_run_dir": bucket_run_dir(spec),
               **CONTEXTS[spec.target](spec, hw, argv)}
    suffix = SUFFIXES[spec.target]
    text = _environment().get_template(f"{suffix}.j2").render(**context)
    return [Rendered(f"{spec.name}.{suffix}", text)]
