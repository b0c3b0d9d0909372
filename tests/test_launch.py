"""phijax launch: every target's rendered files for configs/tiny.yaml on two CPU nodes and
configs/phi-4.yaml on a v5p-128 slice (and on two 8-GPU nodes) against golden files under
tests/data/launch/ (rewrite them with `pytest --update-goldens`); the Kubernetes objects
validated offline by kubernetes-validate --strict and the JobSet by its CRD's schema; the
scripts parsed by bash; the CLI's mistakes as one line; and the local target running a real
two-process job."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, read_metrics, run_cli
from phijax.cli import main
from phijax.launch.render import render
from phijax.launch.spec import LaunchSpec
from phijax.launch.submit import submit, submit_commands

GOLDEN = ROOT / "tests" / "data" / "launch"
# The JobSet CRD (kubernetes-sigs/jobset v0.12.0) sits beside the clone in CI, not in the clone.
CRD = ROOT.parent / "shared" / "k8s" / "jobset.x-k8s.io_jobsets.yaml"
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"

IMAGE = ["--image", "ghcr.io/example/phijax:0.1"]
CONFIGS = {
    "tiny": ["configs/tiny.yaml", "--nodes", "2", "mesh.data=2", "run.dir=/shared/runs/tiny"],
    "phi-4": ["configs/phi-4.yaml", "--topology", "v5p-128", "mesh.data=1", "mesh.fsdp=64",
              "mesh.tensor=1", "train.microbatches=30", "run.distributed=on",
              "run.dir=gs://phijax-runs/phi-4"],
    "phi-4-gpu": ["configs/phi-4.yaml", "--nodes", "2", "--gpus-per-node", "8", "mesh.data=1",
                  "mesh.fsdp=16", "mesh.tensor=1", "train.microbatches=30",
                  "run.dir=/shared/runs/phi-4"],
}
CASES = {
    ("tiny", "local"): [],
    ("tiny", "jobset"): IMAGE,
    ("tiny", "k8s-job"): IMAGE + ["--namespace", "research"],
    ("tiny", "slurm"): ["--venv", "/shared/venvs/phijax", "--partition", "cpu",
                        "--time", "1:00:00"],
    ("tiny", "skypilot"): [],
    ("phi-4", "tpu-vm"): ["--zone", "us-east5-a", "--venv", "/opt/venvs/phijax"],
    ("phi-4", "xpk"): IMAGE + ["--cluster", "v5p-cluster", "--zone", "us-east5-a"],
    ("phi-4", "jobset"): IMAGE + ["--max-restarts", "5"],
    ("phi-4", "skypilot"): [],
    ("phi-4", "local"): [],
    ("phi-4-gpu", "slurm"): ["--partition", "h100", "--time", "48:00:00"],
    ("phi-4-gpu", "k8s-job"): IMAGE,
    ("phi-4-gpu", "skypilot"): IMAGE,
}
SUFFIX = {"local": "local.sh", "tpu-vm": "tpu-vm.sh", "xpk": "xpk.sh", "jobset": "jobset.yaml",
          "k8s-job": "k8s-job.yaml", "slurm": "slurm.sbatch", "skypilot": "skypilot.yaml"}


def golden(case: str, target: str) -> Path:
    return GOLDEN / case / f"{case}.{SUFFIX[target]}"


def launch(capsys, *args) -> tuple[int, str, str]:
    """`phijax launch ARGS` in this process, from the repository root: (status, stdout, stderr)."""
    status = main(["launch", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("case,target", list(CASES))
def test_rendered_files_match_goldens(case, target, capsys, monkeypatch, request):
    monkeypatch.chdir(ROOT)
    status, text, err = launch(capsys, target, *CONFIGS[case], "--name", case, *CASES[case, target])
    assert status == 0, err
    path = golden(case, target)
    if request.config.getoption("--update-goldens"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs (pytest --update-goldens rewrites it)"
    assert "phijax train configs/" in text  # the config and overrides, verbatim
    assert "--submit runs " in err


def sweep_spec(**fields) -> LaunchSpec:
    """A spec as the sweep helper makes one: N workers of `phijax sweep work`."""
    return LaunchSpec(name="sweep", command=["phijax", "sweep", "work", "sweep.yaml"], **fields)


def extra_renders() -> dict[str, str]:
    """Multislice and workers, rendered from specs: name -> text."""
    specs = [sweep_spec(target="jobset", topology="v5p-128", slices=2, image="img:1"),
             sweep_spec(target="jobset", nodes=2, gpus_per_node=8, workers=3, image="img:1"),
             sweep_spec(target="k8s-job", nodes=2, workers=3, image="img:1"),
             sweep_spec(target="tpu-vm", topology="v6e-16", slices=2, image="img:1"),
             sweep_spec(target="slurm", nodes=1, workers=4),
             sweep_spec(target="k8s-job", nodes=1, workers=3, image="img:1")]
    return {f"{s.target}-{i}": f.text for i, s in enumerate(specs) for f in render(s)}


def k8s_documents() -> list[tuple[str, dict]]:
    files = [p for p in GOLDEN.glob("*/*.yaml") if p.name.endswith(("jobset.yaml", "k8s-job.yaml"))]
    docs = [(p.name, d) for p in files for d in yaml.safe_load_all(p.read_text())]
    docs += [(name, d) for name, text in extra_renders().items() if "-" in name and
             name.split("-")[0] in ("jobset", "k8s") for d in yaml.safe_load_all(text)]
    assert {d["kind"] for _, d in docs} == {"JobSet", "Job", "Service"}
    return docs


def test_kubernetes_objects_validate_strictly(tmp_path):
    """Services and Jobs as they are; a JobSet's job template as the Job it becomes."""
    paths = []
    for i, (name, doc) in enumerate(k8s_documents()):
        if doc["kind"] == "JobSet":
            for rjob in doc["spec"]["replicatedJobs"]:
                doc = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rjob["name"]},
                       "spec": rjob["template"]["spec"]}
        paths.append(tmp_path / f"{i}-{name}")
        paths[-1].write_text(yaml.safe_dump(doc))
    out = subprocess.run([KUBERNETES_VALIDATE, "--strict", *paths], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == len(paths), out.stdout


def closed(schema):
    """The CRD schema with unknown fields refused (as the API server's strict field validation
    does) wherever it lists the fields an object has."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and \
                "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema = {**schema, "additionalProperties": False}
        return {k: closed(v) for k, v in schema.items()}
    return [closed(v) for v in schema] if isinstance(schema, list) else schema


def test_jobsets_match_the_crd():
    if not CRD.is_file():
        pytest.skip(f"the JobSet CRD folder {CRD.parent} is absent (CI provides it)")
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    validator = jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))
    jobsets = [(name, d) for name, d in k8s_documents() if d["kind"] == "JobSet"]
    assert len(jobsets) == 4
    for name, doc in jobsets:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, (name, errors)
    broken = jobsets[0][1]
    broken["spec"]["failurePolicy"]["maxRestart"] = 1  # the check sees a misspelt field
    assert any("maxRestart" in e.message for e in validator.iter_errors(broken))


def test_scripts_parse():
    scripts = [p for p in GOLDEN.glob("*/*") if p.suffix in (".sh", ".sbatch")]
    texts = [p.read_text() for p in scripts] + \
        [t for name, t in extra_renders().items() if name.startswith(("tpu-vm", "slurm"))]
    assert len(texts) == 8
    for text in texts:
        out = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr + text


def test_multislice_and_workers():
    texts = extra_renders()
    multislice = yaml.safe_load(texts["jobset-0"])
    slice_job = multislice["spec"]["replicatedJobs"][0]
    assert slice_job["replicas"] == 2 and slice_job["template"]["spec"]["parallelism"] == 16
    (container,) = slice_job["template"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "sweep-slice-0-0.sweep:8080"
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert "job-index" in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    gpu_workers = yaml.safe_load(texts["jobset-1"])["spec"]["replicatedJobs"][0]
    assert gpu_workers["replicas"] == 3
    job = [d for d in yaml.safe_load_all(texts["k8s-job-2"]) if d["kind"] == "Job"][0]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 6
    tpu_vm = texts["tpu-vm-3"]
    assert "--node-count=2" in tpu_vm and "--accelerator-type=v6e-16" in tpu_vm
    assert "MEGASCALE_SLICE_ID=$slice" in tpu_vm
    assert "#SBATCH --array=0-3" in texts["slurm-4"]
    # single-host pods of an indexed Job run alone, not as one JAX job
    job = [d for d in yaml.safe_load_all(texts["k8s-job-5"]) if d["kind"] == "Job"][0]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {"name": "JAX_NUM_PROCESSES", "value": "1"} in container["env"]
    sky = sweep_spec(target="skypilot", nodes=1, workers=3)
    assert [c[4] for c in submit_commands(sky, Path("s.yaml"))] == ["sweep-0", "sweep-1", "sweep-2"]


@pytest.mark.parametrize("args,message", [
    (["bogus", "configs/tiny.yaml"], "target: 'bogus' is not one of local, tpu-vm"),
    (["local", "configs/tiny.yaml", "--topology", "v5p-8", "--nodes", "2"],
     "give --topology or --nodes"),
    (["tpu-vm", *CONFIGS["tiny"]],
     "tpu-vm runs on a TPU slice (--topology v5p-128), not 2 CPU nodes"),
    (["slurm", *CONFIGS["phi-4"]], "slurm runs on GPU or CPU nodes"),
    (["jobset", *CONFIGS["tiny"]], "jobset runs containers: give --image"),
    (["xpk", *CONFIGS["phi-4"], *IMAGE], "xpk needs --cluster"),
    (["local", "configs/tiny.yaml", "--nodes", "2"],
     "mesh data*fsdp*tensor = 1*1*1 = 1 does not match the 2 available devices on 2 CPU nodes"),
    (["tpu-vm", *CONFIGS["phi-4"][:-2]], "add run.distributed=on"),
    (["local", *CONFIGS["tiny"], "--slices", "2"], "multislice is for TPU slices"),
    (["local", *CONFIGS["tiny"], "--name", "Bad_Name"], "--name 'Bad_Name': lowercase"),
    (["tpu-vm", *CONFIGS["phi-4"], "--bucket", "phijax-runs"],
     "--bucket phijax-runs: give gs://BUCKET or s3://BUCKET"),
])
def test_mistakes_are_one_line(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    status, _, err = launch(capsys, *args, *(["--name", "x"] if "--name" not in args else []))
    assert status == 2 and err.count("\n") == 1, err
    assert message in err, err


def test_relative_run_dir_on_several_hosts_warns(capsys, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    status, _, _ = launch(capsys, "jobset", *CONFIGS["tiny"][:-1], "--name", "x", *IMAGE)
    assert status == 0
    assert "run.dir runs/tiny is relative: each of the 2 hosts" in caplog.text


@pytest.mark.parametrize("target,extra", [("tpu-vm", ["--zone", "us-east5-a"]),
                                          ("xpk", IMAGE + ["--cluster", "v5p-cluster"]),
                                          ("jobset", IMAGE)])
def test_a_pod_run_goes_to_the_bucket_or_warns(target, extra, capsys, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    pod = [target, *CONFIGS["phi-4"][:-1], "--name", "phi4", *extra]  # run.dir: runs/phi-4
    status, text, _ = launch(capsys, *pod, "--bucket", "gs://phijax-runs")
    assert status == 0
    assert "# run.dir defaults to gs://phijax-runs/runs/phi4 (--bucket)" in text
    assert "run.distributed=on run.dir=gs://phijax-runs/runs/phi4" in text  # what hosts run
    assert "WARNING" not in caplog.text

    _, text, _ = launch(capsys, *pod)
    assert "run.dir" not in text.split("run.distributed=on")[1].split("\n")[0]
    warning = ("run.dir runs/phi-4 is a local path: the 16 hosts of a TPU slice share no file "
               "system (unless each mounts one there); give --bucket gs://BUCKET (run.dir "
               "gs://BUCKET/runs/phi4) or run.dir=gs://...")
    assert caplog.text.count("run.dir runs/phi-4") == 1 and warning in caplog.text, caplog.text

    _, text, _ = launch(capsys, *pod, "--bucket", "gs://phijax-runs", "run.dir=gs://other/x")
    assert "phijax-runs" not in text and "run.dir=gs://other/x" in text  # an override wins


@pytest.mark.parametrize("args,message", [
    (["bogus", "configs/tiny.yaml", "--name", "x"], "error: target: 'bogus' is not one of"),
    (["local", "configs/tiny.yaml", "--name", "x", "--topology", "v5p-8", "--nodes", "2"],
     "error: give --topology or --nodes (with --gpus-per-node), not both"),
    (["slurm", *CONFIGS["tiny"], "--name", "x", "--submit"],
     "error: sbatch is not on PATH: --submit for slurm runs your own sbatch"),
    (["local", *CONFIGS["tiny"], "--name", "x", "--submit"], "error: phijax is not on PATH"),
])
def test_cli_errors_exit_2_in_one_line(args, message, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no sbatch, no phijax: a fresh shell without them
    out = run_cli("launch", *args, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr and out.stdout == ""


def test_without_its_source_tree_launch_says_so(tmp_path):
    """A phijax installed without the repository (no launch/ beside the package)."""
    shutil.copytree(ROOT / "phijax", tmp_path / "phijax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "phijax", "launch", "local",
                          ROOT / "configs" / "tiny.yaml", "--name", "x"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"the launch templates folder {tmp_path / 'launch'} is missing" in out.stderr


def exits(statuses: dict[int, str]) -> list[str]:
    """A command whose process JAX_PROCESS_ID=i runs the Python statement statuses[i]."""
    program = textwrap.dedent(f"""
        import os, sys, time
        rank = int(os.environ["JAX_PROCESS_ID"])
        print("rank", rank, "of", os.environ["JAX_NUM_PROCESSES"], os.environ["XLA_FLAGS"])
        exec({statuses!r}[rank])""")
    return [sys.executable, "-c", program]


def test_local_exit_status_is_the_worst(capfd):
    preempted = LaunchSpec(name="t", nodes=2, gpus_per_node=4, port=free_port(),
                           command=exits({0: "sys.exit(0)", 1: "sys.exit(42)"}))
    assert submit(preempted) == 42
    out = capfd.readouterr().out
    assert "[0] rank 0 of 2 --xla_force_host_platform_device_count=4" in out
    assert "[1] rank 1 of 2" in out
    failed = LaunchSpec(name="t", nodes=3, port=free_port(),
                        command=exits({0: "time.sleep(60)", 1: "sys.exit(3)", 2: "sys.exit(42)"}))
    assert submit(failed) == 3  # rank 0 is stopped at once, not waited for


@pytest.mark.slow
def test_local_runs_a_two_process_training_job(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("launch", "local", "configs/tiny.yaml", "--nodes", "2", "--gpus-per-node", "2",
                  "--name", "tiny", "--venv", sys.prefix, "--port", free_port(), "--submit",
                  "mesh.fsdp=4", "data.synthetic=true", "train.steps=2", "train.log_every=1",
                  "train.eval_every=1000", "checkpoint.every=1000", f"run.dir={run_dir}",
                  check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    # each process alone would have 2 devices for a mesh of 4, and fail
    assert "[0] " in out.stdout and "[1] " in out.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "2").is_dir()
