"""FLOP accounting, device peaks, and the metrics writers (JSONL + TensorBoard)."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from phijax import paths
from phijax.config import ModelConfig
from phijax.files import jsonl_line

# Dense bf16 peak FLOP/s per device for common accelerators.
DEVICE_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
                "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by component, from the shapes alone."""
    e, f, l, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.dim_per_head
    attn = e * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    counts = {"embedding": cfg.vocab_size * e, "attention": l * attn, "mlp": l * 3 * e * f,
              "norms": (2 * l + 1) * e,
              "lm_head": 0 if cfg.tie_word_embeddings else e * cfg.vocab_size}
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 * matmul params + 12 * L * H * Q * T."""
    c = param_counts(cfg)
    matmul = c["attention"] + c["mlp"] + cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.dim_per_head * seq_len
    return 6.0 * matmul + attention


def decode_flops_per_token(cfg: ModelConfig, cache_len: int) -> float:
    """FLOPs of one decoded token: 2 * matmul params (the forward alone) + 4 * L * H * Q * T,
    its query's scores and weighted values over a cache of T slots."""
    c = param_counts(cfg)
    matmul = c["attention"] + c["mlp"] + cfg.vocab_size * cfg.hidden_size
    return 2.0 * matmul + 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * \
        cfg.dim_per_head * cache_len


def measure_matmul_peak(n: int = 2048, reps: int = 5, tries: int = 1) -> float:
    """float32 FLOP/s of one large `jnp.dot` on the default device: the best of `tries` timings
    of `reps` calls each (on a shared machine the best is the least disturbed)."""
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(reps):
            out = dot(a, a)
        out.block_until_ready()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def device_peak(configured: float | None) -> float:
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    for name, peak in DEVICE_PEAKS.items():
        if name.lower() in kind.lower():
            return peak
    return measure_matmul_peak()


class MetricsWriter:
    """metrics.jsonl and TensorBoard events in the run directory (process 0 only: `enabled`).

    Locally the JSONL file is appended to and flushed at each record. A bucket has no append, so
    for a gs:// or s3:// run directory the records are kept in memory (starting from the ones
    already there, which the loop has cut back to the step it resumes from) and metrics.jsonl is
    rewritten whole at each record and at close; TensorBoard writes its event file to a local
    temporary directory, uploaded whole at each flush."""

    def __init__(self, run_dir, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        self.path = paths.as_path(run_dir) / "metrics.jsonl"
        if paths.is_url(run_dir):
            self.lines = paths.read_text(self.path).splitlines(keepends=True) \
                if paths.exists(self.path) else []
            self.jsonl = None
            self.tb_local = Path(tempfile.mkdtemp(prefix="phijax-tensorboard-"))
            self.tb_target = paths.as_path(run_dir) / "tensorboard"
            self.tb = SummaryWriter(str(self.tb_local))
        else:
            self.jsonl = open(self.path, "a")
            self.tb_local = None
            self.tb = SummaryWriter(str(paths.as_path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        for key, value in record.items():  # a NaN (a skipped step) stays in the JSONL only
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()
        if self.jsonl is not None:
            self.jsonl.write(jsonl_line(record))
            self.jsonl.flush()
        else:
            self.lines.append(jsonl_line(record))
            self._upload()

    def _upload(self) -> None:
        paths.write_text(self.path, "".join(self.lines))
        for name in os.listdir(self.tb_local):
            paths.upload(self.tb_local / name, self.tb_target / name)

    def close(self) -> None:
        if not self.enabled:
            return
        self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        else:
            self._upload()
            shutil.rmtree(self.tb_local, ignore_errors=True)
