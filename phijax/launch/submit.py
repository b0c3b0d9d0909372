"""`--submit`: the rendered files handed to the user's own gcloud, xpk, kubectl, sbatch or sky
(no launcher library is imported); the `local` target's processes run here."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from phijax.errors import UserError
from phijax.files import atomic_write
from phijax.launch.local import local_processes, run_local
from phijax.launch.render import Rendered, host_argv, render
from phijax.launch.spec import LaunchSpec, check

TOOLS = {"tpu-vm": "gcloud", "xpk": "xpk", "jobset": "kubectl", "k8s-job": "kubectl",
         "slurm": "sbatch", "skypilot": "sky"}


def submit_commands(spec: LaunchSpec, path: Path) -> list[list[str]]:
    """The commands that submit the rendered file at `path` (none for `local`)."""
    target = spec.target
    if target in ("tpu-vm", "xpk"):
        return [["bash", str(path)]]
    if target in ("jobset", "k8s-job"):
        return [["kubectl", "create", "-f", str(path)]]
    if target == "slurm":
        return [["sbatch", str(path)]]
    if target == "skypilot":  # a managed job per copy
        names = [spec.name] if spec.workers == 1 else \
            [f"{spec.name}-{i}" for i in range(spec.workers)]
        return [["sky", "jobs", "launch", "--name", name, "--yes", str(path)] for name in names]
    return []


def write(files: list[Rendered], folder: str | Path) -> list[Path]:
    return [atomic_write(Path(folder) / f.name, f.text) for f in files]


def submit(spec: LaunchSpec, out: str | Path | None = None) -> int:
    """Render `spec` (into `out`, else a temporary folder) and submit it with the target's own
    tool, or run the local processes; returns the exit status of the last command run (local:
    the job's, see `phijax.launch.local.worst_status`). A missing tool is one line naming it."""
    files = render(spec)
    if spec.target == "local":
        if out:
            write(files, out)
        return run_local(local_processes(spec, check(spec), host_argv(spec)))
    tool = TOOLS[spec.target]
    if shutil.which(tool) is None:
        raise UserError(f"{tool} is not on PATH: --submit for {spec.target} runs your own {tool}; "
                        f"install it, or render without --submit and submit the files yourself")
    with tempfile.TemporaryDirectory(prefix="phijax-launch-") as tmp:
        paths = write(files, out or tmp)
        for argv in submit_commands(spec, paths[0]):
            print(f"phijax launch: {shlex.join(argv)}", file=sys.stderr, flush=True)
            status = subprocess.run(argv).returncode
            if status:
                return status
    return 0
