import os

# Sharding tests run on 8 virtual CPU devices; this must be set before JAX is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The S3 and GCS emulator fixtures (`object_store`, `s3_server`, `gcs_server`), one server of each
# for the whole session whichever modules use them.
pytest_plugins = ["object_stores"]


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite the golden files under tests/data/ from what the code gives now")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/token-store cache for the whole session."""
    return tmp_path_factory.mktemp("phijax-cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """configs/tiny.yaml trained 20 steps on its text: a checkpoint with a tokenizer, for the
    tests that serve or evaluate one (read it, never write it)."""
    run = tmp_path_factory.mktemp("tiny-run") / "tiny-serve"
    run_cli("train", ROOT / "configs" / "tiny.yaml", "train.steps=20", f"run.dir={run}",
            f"data.cache_dir={cache_dir}")
    return run


def run_cli(*args, devices: int = 1, check: bool = True, **popen):
    """Run `python -m phijax ARGS` in a fresh process with `devices` virtual CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "phijax", *map(str, args)]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def run_script(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an installed console script of this project (`phijax-tools`, `phijax-experiment`)
    from the repository root, with one virtual CPU device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    return subprocess.run([str(Path(sys.executable).parent / name), *map(str, args)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# Tests marked `tpu_plan` compile for TPU slices through libtpu (the tpu-plan extra).
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='needs libtpu: pip install -e ".[tpu-plan]" (CI runs these)')


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


SEVEN_EIGHT_MODEL = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def seven_or_eight_run(run: Path) -> Path:
    """A run directory whose model ignores its input: every embedding is the same vector and
    the blocks add nothing, so the last hidden state is constant, and the LM head puts the
    pieces "7" and "8" far above every other token (logits 32 and 31.7). Greedy decoding says
    "7", sampling "7" (p = 0.58) or "8" (p = 0.42). Model shape: SEVEN_EIGHT_MODEL."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from phijax.config import Config, ModelConfig
    from phijax.data.tokenizer import Tokenizer, train_tokenizer
    from phijax.model import init_model
    from phijax.weights import save_params
    from experiments.pts_arith import arith

    cfg = ModelConfig(**SEVEN_EIGHT_MODEL)
    texts = [p["question"] + " " + p["solution"] for p in arith.generate("train", 300)]
    path = train_tokenizer(texts, run / "tokenizer", vocab_size=320, multiple=128)
    tok = Tokenizer(path)
    seven, eight = (tok.encode([d])[0] for d in ("7", "8"))
    assert len(seven) == len(eight) == 1
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0)))
    params["embed"] = jnp.ones_like(params["embed"])
    params["layers"]["attn"]["o"] = jnp.zeros_like(params["layers"]["attn"]["o"])
    params["layers"]["mlp"]["down"] = jnp.zeros_like(params["layers"]["mlp"]["down"])
    head = np.zeros(params["lm_head"].shape, np.float32)
    head[:, seven[0]], head[:, eight[0]] = 1.0, 0.99  # the hidden state is all ones
    params["lm_head"] = jnp.asarray(head)
    save_params(run, Config(model=cfg), params)
    path.rename(run / "tokenizer.model")
    return run
