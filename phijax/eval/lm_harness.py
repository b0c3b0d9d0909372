"""`phijax eval CKPT --lm-eval TASKS`: lm-evaluation-harness against the checkpoint, served.

The run directory is served by `phijax serve` on a free loopback port in this process, and
lm-eval's `local-completions` model runs against it in a child process (`python -m lm_eval`,
so its output and progress bars stream as they come), with the server's tokenizer endpoints
as its tokenizer (`tokenizer_backend=remote`) and token-id prompts. Any task lm-eval knows, or
finds under `--lm-eval-include`, runs if its data is on this machine (lm-eval reads through
Hugging Face `datasets`; offline, a task's `dataset_kwargs.data_files` are local paths,
relative to the working directory). lm-eval's own results and samples land in `OUT/lm_eval/`
(for a gs:// or s3:// OUT, written locally first and uploaded when lm-eval has finished).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from phijax import paths
from phijax.errors import ConfigError, DataError

log = logging.getLogger("phijax.eval")


def lm_eval_command(url: str, model_name: str, max_len: int, tasks: str, out: Path,
                    limit: int | None = None, include: str | None = None,
                    concurrent: int = 8) -> list[str]:
    """The lm-eval command line for `local-completions` against `url` (.../v1)."""
    model_args = ",".join([f"model={model_name}", f"base_url={url}/completions",
                           "tokenizer_backend=remote", "tokenized_requests=True",
                           f"max_length={max_len}", f"num_concurrent={concurrent}",
                           "max_retries=1"])
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
           "--model_args", model_args, "--tasks", tasks, "--output_path", str(out),
           "--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if include:
        cmd += ["--include_path", str(Path(include).absolute())]
    return cmd


def _results(out: Path) -> dict:
    """lm-eval's newest results file under `out`: {task: {metric: value}}."""
    found = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DataError(f"lm-eval wrote no results under {out}")
    return json.loads(found[-1].read_text())["results"]


def run_lm_eval(run_dir, tasks: str, out=None, limit: int | None = None,
                include: str | None = None) -> dict:
    """Serve `run_dir`, run lm-eval's `tasks` against it, stop the server: lm-eval's results
    ({task: {"metric,filter": value}}), also kept in OUT/lm_eval/."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install 'lm-eval[api]'")
    if include and not Path(include).is_dir():
        raise ConfigError(f"--lm-eval-include {include} is not a directory of task YAMLs")
    from phijax.serve import make_server

    base = str(out) if out else f"{str(run_dir).rstrip('/')}/eval"
    target = f"{base.rstrip('/')}/lm_eval"
    if paths.is_url(target):
        paths.check_writable(target, "--out")
    out = Path(tempfile.mkdtemp(prefix="phijax-lm-eval-")) if paths.is_url(target) else \
        Path(target)
    server = make_server(run_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cmd = lm_eval_command(server.url, server.model_name, server.sampler.max_len, tasks,
                              out, limit, include)
        log.info("lm-eval %s against %s", tasks, server.url)
        code = subprocess.run(cmd).returncode
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
    if code != 0:
        raise DataError(f"lm-eval exited with status {code} on tasks {tasks} (its output is "
                        f"above)")
    results = _results(out)
    if paths.is_url(target):
        for file in sorted(p for p in out.rglob("*") if p.is_file()):
            paths.upload(file, f"{target}/{file.relative_to(out).as_posix()}")
        log.info("lm-eval's results and samples: %s", target)
    return results


def format_lm_eval(results: dict) -> str:
    """lm-eval's results as `task  metric  value  ± stderr` lines."""
    lines = [f"{'task':<28} {'metric':<24} {'value':>8} {'stderr':>8}"]
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or name == "alias":
                continue
            err = metrics.get(f"{name}_stderr,{filt}")
            err = f"{err:>8.4f}" if isinstance(err, (int, float)) else f"{'':>8}"
            lines.append(f"{task:<28} {name:<24} {value:>8.4f} {err}")
    return "\n".join(lines)
