"""Multi-host start-up under each launcher's environment, and the preemption contract: SIGTERM
or SIGUSR1 saves the same step on every host and exits 42; the same command resumes exactly."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, read_metrics, run_cli
from launchers import (STYLES, finish, launcher_envs, port_is_free, signal_at_step, start,
                       start_two)
from phijax.errors import ConfigError
from phijax.train.distributed import PREEMPTED_EXIT_CODE, Start, plan

TINY = ROOT / "configs" / "tiny.yaml"

# ------------------------------------------------------------- detection: env -> how to start


@pytest.mark.parametrize("style, rank, kwargs", [
    ("phijax", 1, {"num_processes": 2, "process_id": 1}),
    ("xpk-gpu", 1, {"num_processes": 2, "process_id": 1}),
    ("xpk-cpu", 1, {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}),
    ("slurm", 1, {}),  # all from JAX's SlurmCluster
])
def test_each_launchers_environment_is_detected(style, rank, kwargs):
    env = launcher_envs(style)[rank]
    start = plan(env, kubernetes=False)
    assert {k: start.kwargs[k] for k in kwargs} == kwargs and set(start.kwargs) >= set(kwargs)
    if style == "xpk-gpu":  # a port-less address takes JAX_COORDINATOR_PORT
        assert start.kwargs["coordinator_address"] == f"localhost:{env['JAX_COORDINATOR_PORT']}"
    if style == "slurm":
        assert start == Start("slurm")
    assert plan(env, "off") is None


def test_no_signature_runs_alone_unless_asked():
    assert plan({}) is None
    assert plan({"NNODES": "2", "NODE_RANK": "1", "SLURM_JOB_ID": "7"}) is None  # no address
    assert plan({**launcher_envs("slurm")[0], "SLURM_NTASKS": "1"}) is None  # one task
    assert plan({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) is None
    assert plan({}, "on") == Start("jax")  # JAX's own detection (a TPU VM's metadata...)


def test_clusters_jax_completes():
    assert plan({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "1"}) == Start("tpu")
    assert plan({"MEGASCALE_COORDINATOR_ADDRESS": "a"}).cluster == "tpu"
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}
    assert plan({**ompi, "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5"}).kwargs == \
        {"num_processes": 4, "process_id": 3}
    assert plan({**ompi, "JAX_COORDINATOR_ADDRESS": "10.0.0.1:9"}).kwargs == \
        {"coordinator_address": "10.0.0.1:9", "num_processes": 4, "process_id": 3}
    k8s = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "1"}
    assert plan(k8s, kubernetes=True) == Start("kubernetes")
    # a single-host pod of an indexed Job (a sweep worker) says it runs alone
    assert plan({**k8s, "JAX_NUM_PROCESSES": "1"}, kubernetes=False) is None
    assert plan({**k8s, "JAX_NUM_PROCESSES": "1"}, "on", kubernetes=True).cluster == "kubernetes"
    # under srun, a script's NNODES counts nodes: only JAX_* names override SLURM's
    slurm = {**launcher_envs("slurm")[1], "NNODES": "1", "JAX_COORDINATOR_PORT": "5555"}
    assert plan(slurm) == Start("slurm")


def test_aliases():
    xpk_cpu_slice_1 = {"JAX_COORDINATOR_ADDRESS": "[fd00::1]", "JAX_PROCESS_COUNT": "8",
                       "PROCESSES_IN_JOB": "4", "JOB_INDEX": "1", "JOB_COMPLETION_INDEX": "2"}
    assert plan(xpk_cpu_slice_1).kwargs == {
        "coordinator_address": "[fd00::1]:1234", "num_processes": 8, "process_id": 6,
        "cluster_detection_method": "deactivate"}  # all given: nothing for JAX to detect
    indexed_job = {"JAX_COORDINATOR_ADDRESS": "job-0.svc:5000", "JAX_NUM_PROCESSES": "3",
                   "JOB_COMPLETION_INDEX": "2", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert plan(indexed_job, kubernetes=False).kwargs == {
        "coordinator_address": "job-0.svc:5000", "num_processes": 3, "process_id": 2,
        "cluster_detection_method": "deactivate"}


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not (nor JAX_PROCESS_COUNT, NNODES)"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "NNODES": "2"},
     "JAX_COORDINATOR_ADDRESS is set but JAX_PROCESS_ID is not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is not"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"},
     "is set but JAX_COORDINATOR_ADDRESS is not"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"},
     "is set but JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "process id 2 is not below the process count 2"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "NNODES": "two", "NODE_RANK": "0"},
     "NNODES='two' is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:x:1", "NNODES": "2", "NODE_RANK": "0"},
     "is not HOST or HOST:PORT"),
])
def test_a_half_set_signature_is_one_line_naming_what_is_missing(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan(env, kubernetes=False)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORD", "SLURM_"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_the_cli_says_which_variable_is_missing():
    out = subprocess.run([sys.executable, "-m", "phijax", "train", TINY, "train.steps=1"],
                         env=clean_env(JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_PROCESS_ID="0"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "phijax: error: JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not (nor "
        "JAX_PROCESS_COUNT, NNODES); set it, or run.distributed=off for a single process")


def test_a_process_whose_peers_never_come_gives_up_after_run_distributed_timeout(tmp_path):
    port = free_port()
    began = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "phijax", "train", TINY, "run.distributed_timeout=2",
         f"run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=clean_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID="1"))
    assert out.returncode != 0 and "DEADLINE_EXCEEDED" in out.stderr, out.stderr[-2000:]
    assert time.time() - began < 120  # not the 300 s default
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------- two real processes per style

PSUM = """
import json, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from phijax.train.distributed import initialize
start = initialize("auto", 120)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("d",))
ones = np.arange(jax.local_device_count()) + 1 + jax.local_device_count() * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), ones.astype(np.float32))
total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"),
                              out_specs=P()))(x)
print(json.dumps({"cluster": start.cluster, "process": jax.process_index(),
                  "processes": jax.process_count(), "devices": jax.device_count(),
                  "psum": float(total.addressable_data(0)[0])}))
"""


@pytest.mark.slow
def test_every_launchers_two_processes_form_one_job():
    """All styles at once, each a job of two processes with two CPU devices each: 4 devices,
    and a psum across both processes adds 1+2+3+4."""
    if not port_is_free(1234):
        pytest.skip("port 1234, xpk's CPU coordinator port, is taken")
    jobs = {style: start(["-c", PSUM], launcher_envs(style), devices=2) for style in STYLES}
    clusters = {"phijax": "environment", "slurm": "slurm", "xpk-gpu": "kubernetes",
                "xpk-cpu": "kubernetes"}
    for style, procs in jobs.items():
        outputs = finish(procs, 300)
        for rank, (p, out) in enumerate(zip(procs, outputs)):
            assert p.returncode == 0, f"{style}:\n{out}"
            result = json.loads(out.strip().splitlines()[-1])
            assert result == {"cluster": clusters[style], "process": rank, "processes": 2,
                              "devices": 4, "psum": 10.0}, f"{style}: {out}"
            assert re.search(rf"distributed: {clusters[style]}.*, process {rank} of 2, 2 local "
                             r"devices, 4 global", out), f"{style}: {out}"


# ------------------------------------------------------------- training under SLURM

STEPS = 12
COMMON = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=1000",
          "checkpoint.every=1000", "mesh.fsdp=4"]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, cache_dir):
    """configs/tiny.yaml, STEPS steps, as two SLURM tasks with 2 CPU devices each."""
    run = tmp_path_factory.mktemp("slurm") / "run"
    procs = start_two(TINY, *COMMON, f"run.dir={run}", f"data.cache_dir={cache_dir}",
                      style="slurm", devices=2)
    outputs = finish(procs, 600)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    assert all("distributed: slurm, process" in out for out in outputs), outputs
    return run


@pytest.mark.slow
def test_two_slurm_tasks_train_like_one_process(tmp_path, cache_dir, slurm_run):
    run_cli("train", TINY, *COMMON, f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
            devices=4)
    one, two = read_metrics(tmp_path), read_metrics(slurm_run)
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    assert (slurm_run / "checkpoints" / str(STEPS)).is_dir()


@pytest.mark.slow
def test_sigterm_to_one_host_saves_one_step_everywhere_exits_42_and_resumes_exactly(
        tmp_path, cache_dir, slurm_run):
    run = tmp_path / "run"
    args = [TINY, *COMMON, f"run.dir={run}", f"data.cache_dir={cache_dir}"]
    envs = launcher_envs("slurm")
    procs = start_two(*args, envs=envs, devices=2)
    signal_at_step(procs, run, 2, signal.SIGTERM)
    outputs = finish(procs, 300)
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2 == [42, 42], outputs
    stopped = [int(re.search(r"stopped at step (\d+) after ", out).group(1)) for out in outputs]
    assert stopped[0] == stopped[1] < STEPS, outputs
    assert "after SIGTERM" in outputs[1] and "after a signal to another process" in outputs[0]
    assert (run / "checkpoints" / str(stopped[0])).is_dir()

    outputs = finish(start_two(*args, envs=envs, devices=2), 600)  # the scheduler's retry
    assert all(f"resumed from step {stopped[0]}" in out for out in outputs), outputs
    resumed, straight = read_metrics(run), read_metrics(slurm_run)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]  # bitwise
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in straight]


@pytest.mark.parametrize("sig, preempted", [(signal.SIGTERM, True), (signal.SIGUSR1, True),
                                            (signal.SIGINT, False)])
def test_which_signals_are_a_preemption(sig, preempted):
    from phijax.train.loop import _StopFlag

    stop = _StopFlag()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), sig)
        assert stop.should_stop() and stop.reason == sig.name and stop.preempted == preempted
    finally:
        stop.close()
