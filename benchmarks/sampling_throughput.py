"""Sampling throughput: phijax's batched KV-cache sampler against transformers `generate()`.

One run, on this machine, with the `configs/bench-cpu-53m.yaml` model (random weights, seed 0;
the same weights on both sides through `phijax convert`'s `to_hf`):
  1. batch of `--batch` random prompts of `--prompt` tokens, `--new` new tokens each, sampled at
     temperature 1 with no top-k/top-p and no stop token (every row makes all its tokens):
     phijax `Sampler.generate` against `Phi3ForCausalLM.generate(do_sample=True)` in PyTorch
     (float32, sdpa attention). New tokens/s = batch * new / wall time, prefill included, after
     one untimed warm-up call of the same shapes; best of `--repeats`.
  2. n=`--fan-n` samples of `--fan-new` tokens from one `--fan-prompt`-token prompt, with prefix
     sharing (one prefill, the cache fanned out) and without (every sample prefilled on its own);
     the same tokens either way.
It also measures the float32 matmul peak (large `jnp.dot`s, as the training benchmark) and prints
the ceiling: the new tokens/s of run 1 if every matmul of it (layers over all prompt tokens, layers
and LM head over every new token; attention scores not counted, so the ceiling is generous) ran at
that peak, and the ratio to transformers that would give (`ratio_at_peak`).
The last stdout line is one JSON object. Target: phijax >= 5x transformers.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from phijax.config import load_config
from phijax.model import init_model
from phijax.sampling import Request, Sampler
from phijax.train.metrics import measure_matmul_peak, param_counts

ROOT = Path(__file__).resolve().parents[1]
TARGET = 5.0


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hf_model(cfg, params, work: Path):
    import torch
    from transformers import Phi3ForCausalLM

    from phijax.convert import to_hf
    from phijax.weights import save_params

    save_params(work / "ckpt", cfg, params)
    to_hf(work / "ckpt", work / "hf")
    torch.manual_seed(0)
    model = Phi3ForCausalLM.from_pretrained(work / "hf", torch_dtype=torch.float32,
                                            attn_implementation="sdpa")
    return model.eval()


def matmul_flops(cfg, batch: int, prompt: int, new: int) -> float:
    """Matmul FLOPs of sampling `new` tokens after `prompt` for `batch` rows, the LM head only
    where a token is drawn (the last prompt position and each new token)."""
    c = param_counts(cfg)
    layers = c["attention"] + c["mlp"]
    head = cfg.vocab_size * cfg.hidden_size
    return 2.0 * batch * (prompt * layers + new * (layers + head))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench-cpu-53m.yaml"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fan-n", type=int, default=64)
    p.add_argument("--fan-prompt", type=int, default=256)
    p.add_argument("--fan-new", type=int, default=64)
    args = p.parse_args()

    cfg = load_config(args.config, [])
    params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, 0)))
    sampler = Sampler(cfg.model, params)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.model.vocab_size, (args.batch, args.prompt))
    requests = [Request(row.tolist(), max_new_tokens=args.new, temperature=1.0, seed=i)
                for i, row in enumerate(prompts)]
    ours_s = best_time(lambda: sampler.generate(requests), args.repeats)
    hf_s = time_hf(cfg, params, prompts, args)

    fan_prompt = rng.integers(0, cfg.model.vocab_size, args.fan_prompt).tolist()
    fan = [Request(fan_prompt, n=args.fan_n, max_new_tokens=args.fan_new, seed=1)]
    shared_s = best_time(lambda: sampler.generate(fan), args.repeats)
    separate_s = best_time(lambda: sampler.generate(fan, share_prefix=False), args.repeats)

    peak = measure_matmul_peak(n=4096, reps=3, tries=3)
    floor_s = matmul_flops(cfg.model, args.batch, args.prompt, args.new) / peak
    report(args, ours_s, hf_s, shared_s, separate_s, peak, floor_s)


def time_hf(cfg, params, prompts, args) -> float:
    """Best seconds of transformers' `generate()` on the same prompts and lengths."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = hf_model(cfg, params, Path(tmp))
    torch.set_num_threads(torch.get_num_threads())
    inputs = torch.tensor(prompts)

    def hf_generate():
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new,
                                 min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
        assert out.shape == (args.batch, args.prompt + args.new)

    torch.manual_seed(0)
    return best_time(hf_generate, args.repeats)


def report(args, ours_s, hf_s, shared_s, separate_s, peak, floor_s) -> None:
    """Print the table, the ratio lines and the JSON line."""
    import torch

    new_tokens = args.batch * args.new
    fan_tokens = args.fan_n * args.fan_new
    result = {
        "bench": "sampling_throughput", "config": Path(args.config).name,
        "batch": args.batch, "prompt": args.prompt, "new": args.new,
        "phijax_new_tokens_per_s": round(new_tokens / ours_s, 1),
        "transformers_new_tokens_per_s": round(new_tokens / hf_s, 1),
        "ratio": round(hf_s / ours_s, 2), "target": TARGET,
        "fan_n": args.fan_n, "fan_prompt": args.fan_prompt, "fan_new": args.fan_new,
        "shared_prefix_new_tokens_per_s": round(fan_tokens / shared_s, 1),
        "separate_prefill_new_tokens_per_s": round(fan_tokens / separate_s, 1),
        "prefix_sharing_ratio": round(separate_s / shared_s, 2),
        "peak_gflops": round(peak / 1e9, 1),
        "new_tokens_per_s_at_peak": round(new_tokens / floor_s, 1),
        "ratio_at_peak": round(hf_s / floor_s, 2),
        "jax": jax.__version__, "torch": torch.__version__,
    }
    rows = [(f"phijax, batch {args.batch}, prompt {args.prompt}, new {args.new}", ours_s,
             result["phijax_new_tokens_per_s"]),
            ("transformers generate(), same", hf_s, result["transformers_new_tokens_per_s"]),
            (f"phijax n={args.fan_n} from one {args.fan_prompt}-token prompt, shared prefix",
             shared_s, result["shared_prefix_new_tokens_per_s"]),
            ("  same, every sample prefilled alone", separate_s,
             result["separate_prefill_new_tokens_per_s"])]
    print(f"\n{'run':<66} {'seconds':>8} {'new tok/s':>10}")
    for name, seconds, rate in rows:
        print(f"{name:<66} {seconds:>8.2f} {rate:>10,.1f}")
    print(f"ratio phijax / transformers: {result['ratio']} (target >= {TARGET}); "
          f"prefix sharing: {result['prefix_sharing_ratio']}x")
    print(f"ceiling: every matmul at the float32 peak ({result['peak_gflops']} GFLOP/s) gives "
          f"{result['new_tokens_per_s_at_peak']:,.1f} new tok/s, ratio {result['ratio_at_peak']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
