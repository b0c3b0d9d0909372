"""A plan as numbers (plan.json) and as the table `phijax plan` prints.

Roofline: a step takes at least the longest of its matmul FLOPs over the chip's peak, its HBM
traffic over the HBM bandwidth, and the bytes each device sends in collectives over half the
chip's bidirectional ICI bandwidth (ring algorithms; the three overlapping perfectly). The MFU
ceiling is the model's FLOPs (6N + attention per token, `phijax.train.metrics`) over that time
at peak. A decode step's HBM term is its parameters and KV cache, each read once a step (decoding
is bound by HBM bandwidth), its compute term adds the attention over the cache to its matmuls,
and its tokens/s is its rows over the step time.
"""
from __future__ import annotations

import math

from phijax.config import Config
from phijax.plan.chips import Topology

DAY = 86400.0


def per_device_bytes(tree) -> float:
    """Bytes one device holds of a tree of abstract arrays, from their shardings."""
    import jax
    import numpy as np

    return float(sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                     for a in jax.tree.leaves(tree)))


def state_bytes(state: dict) -> dict[str, float]:
    """Bytes per device of each part a program holds (params, optimizer, kv_cache)."""
    return {f"{name}_bytes": per_device_bytes(tree) for name, tree in state.items()}


def memory_fields(compiled) -> dict[str, float]:
    """memory_analysis() per device; `peak_bytes` is the compiler's peak where it reports one
    (TPU), else arguments + outputs - aliased + temporaries (CPU reports arguments only);
    `temporaries_bytes` what the peak holds beyond the arguments and outputs."""
    ma = compiled.memory_analysis()
    out = {k: float(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out = {f"{k}_bytes": v for k, v in out.items()}
    live = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    out["peak_bytes"] = max(float(getattr(ma, "peak_memory_in_bytes", 0) or 0),
                            live + out["temp_bytes"])
    # v6e's compiler reports its temporaries in the peak alone (temp_size 0)
    out["temporaries_bytes"] = max(out["temp_bytes"], out["peak_bytes"] - live)
    return out


def model_fields(cfg: Config, topo: Topology, tokens: int, per_token: float) -> dict:
    from phijax.train.metrics import param_counts

    return {"parameters": param_counts(cfg.model)["total"], "flops_per_token": per_token,
            "tokens_per_step": tokens, "model_flops_per_device": per_token * tokens / topo.devices}


def roofline(topo: Topology, model: dict, compute: dict, wire_bytes: float | None) -> dict:
    chip = topo.chip
    if not chip.peak_flops:
        return {}
    flops = compute["matmul_flops_per_device"] + compute.get("attention_flops_per_device", 0.0)
    times = {"compute_s": flops / chip.peak_flops}
    if compute.get("hbm_bytes_per_device") is not None and chip.hbm_bandwidth:
        times["hbm_s"] = compute["hbm_bytes_per_device"] / chip.hbm_bandwidth
    if wire_bytes is not None and chip.ici_bandwidth:
        times["ici_s"] = wire_bytes / (chip.ici_bandwidth / 2)
    step = max(times.values())
    bound = max(times, key=times.get).removesuffix("_s")
    return {**times, "step_s": step, "bound": bound,
            "mfu": model["model_flops_per_device"] / (step * chip.peak_flops),
            "tokens_per_s": model["tokens_per_step"] / step}


def cost(topo: Topology, roof: dict, tokens: float | None) -> dict | None:
    if not tokens or not roof:
        return None
    days = tokens / roof["tokens_per_s"] / DAY
    return {"tokens": tokens, "days": days, "chips": topo.chips, "chip_days": days * topo.chips}


# ---------------------------------------------------------------- the table

def _gib(b: float) -> str:
    return f"{b / 2 ** 30:,.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:,.1f} MiB"


def _si(x: float, unit: str) -> str:
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _seconds(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _memory_lines(plan: dict) -> list[str]:
    m = plan["memory"]
    lines = ["memory per device", f"  parameters         {_gib(m['params_bytes']):>12}"]
    if "optimizer_bytes" in m:
        lines.append(f"  optimizer state    {_gib(m['optimizer_bytes']):>12}")
    if "kv_cache_bytes" in m:
        d = plan["decode"]
        lines.append(f"  KV cache           {_gib(m['kv_cache_bytes']):>12}  ({d['batch']:,} rows "
                     f"x {d['cache_len']:,} slots, {d['dtype']})")
    if "temporaries_bytes" not in m:
        return lines + ["  activations        not estimated (analytic estimate: no GPU compile "
                        "on a CPU host)"]
    held = "parameters + KV cache + rows" if "kv_cache_bytes" in m else "train state + batch"
    lines += [f"  arguments          {_gib(m['argument_bytes']):>12}  ({held})",
              f"  outputs            {_gib(m['output_bytes']):>12}  "
              f"({_gib(m['alias_bytes'])} of them in donated buffers)",
              f"  temporaries        {_gib(m['temporaries_bytes']):>12}  "
              f"(activations, {'' if 'kv_cache_bytes' in m else 'gradients, '}workspace)",
              f"  generated code     {_gib(m['generated_code_bytes']):>12}"]
    if m.get("hbm_bytes"):
        lines.append(f"  peak               {_gib(m['peak_bytes']):>12}  of {_gib(m['hbm_bytes'])}"
                     f" {'HBM' if plan['kind'] == 'tpu' else 'budget'}: "
                     f"{100 * m['headroom']:.1f}% headroom")
    else:
        lines.append(f"  peak               {_gib(m['peak_bytes']):>12}")
    for name, before in plan.get("before", {}).items():
        lines.append(f"  before training    {_gib(before['peak_bytes']):>12}  peak of the {name}, "
                     f"run once ({_gib(before['params_bytes'])} of it parameters)")
    return lines


def _compute_lines(plan: dict) -> list[str]:
    c, model = plan["compute"], plan["model"]
    decode = "decode" in plan
    lines = ["compute per step, per device",
             f"  matmul FLOPs       {_si(c['matmul_flops_per_device'], 'FLOP'):>12}  " +
             ("(one step of the decode loop's jaxpr: projections and LM head)" if decode else
              "(the step's jaxpr: every layer, microbatch and rematerialised forward)")]
    if c.get("attention_flops_per_device"):
        lines.append(f"  attention FLOPs    {_si(c['attention_flops_per_device'], 'FLOP'):>12}  "
                     f"(scores and values over the {plan['decode']['cache_len']:,}-slot cache)")
    lines.append(f"  model FLOPs        {_si(model['model_flops_per_device'], 'FLOP'):>12}  "
                 f"({_si(model['flops_per_token'], 'FLOP')} per token x "
                 f"{model['tokens_per_step']:,} tokens / {plan['devices']} devices)")
    if "xla_flops" in c:
        lines.append(f"  XLA cost analysis  {_si(c['xla_flops'], 'FLOP'):>12}, "
                     f"{_si(c['xla_bytes_accessed'], 'B')} accessed (each loop body once)")
    if decode:
        m = plan["memory"]
        lines.append(f"  HBM reads          {_si(c['hbm_bytes_per_device'], 'B'):>12}  (parameters "
                     f"{_gib(m['params_bytes'])} + KV cache {_gib(m['kv_cache_bytes'])}, each "
                     f"read once a step)")
    elif c.get("hbm_bytes_per_device") is not None:
        lines.append(f"  HBM traffic        {_si(c['hbm_bytes_per_device'], 'B'):>12}  (XLA's bytes "
                     f"accessed x {c['loop_factor']:.2f} for the loops' trips)")
    if kernels := c.get("custom_calls", {}).get("tpu_custom_call"):
        lines.append(f"  Pallas kernels     {kernels:>12,.0f}  calls (tpu_custom_call: not in XLA's "
                     f"cost analysis)")
    return lines


def _collective_lines(plan: dict) -> list[str]:
    rows = plan.get("collectives")
    if rows is None:
        return []
    lines = ["collectives per step, per device (ring model: bytes each device sends)"]
    for r in rows:
        lines.append(f"  {r['op']:<19}{r['axes']:<14}{r['count']:>7,.0f} x  "
                     f"{_si(r['result_bytes'], 'B'):>10} results  {_si(r['wire_bytes'], 'B'):>10} sent")
    if not rows:
        lines.append("  none")
    return lines


def _roofline_lines(plan: dict) -> list[str]:
    r = plan.get("roofline")
    if not r:
        return []
    parts = [f"{k.removesuffix('_s')} {_seconds(r[k])}" for k in ("compute_s", "hbm_s", "ici_s")
             if k in r]
    lines = ["roofline (the slowest term, all overlapping perfectly)",
             f"  {' | '.join(parts)}  ->  step >= {_seconds(r['step_s'])} ({r['bound']}-bound)",
             f"  MFU ceiling {100 * r['mfu']:.1f}%, {r['tokens_per_s']:,.0f} tokens/s"]
    if c := plan.get("cost"):
        lines.append(f"  {_si(c['tokens'], 'tokens')}: {c['days']:,.1f} days on {c['chips']} chips "
                     f"= {c['chip_days']:,.0f} chip-days")
    return lines


def format_plan(plan: dict) -> str:
    mesh = plan["mesh"]
    head = (f"{plan['config']} ({plan['step']} step) on {plan['topology']}: {plan['chip']}, "
            f"{plan['devices']} devices"
            + (f" ({plan['libtpu_topology']})" if plan.get("libtpu_topology") else "")
            + f", mesh data {mesh['data']} x fsdp {mesh['fsdp']} x tensor {mesh['tensor']}")
    model = plan["model"]
    n = model["parameters"]
    lines = [head, f"model: {n / 1e9:.2f}B" if n >= 1e9 else f"model: {n / 1e6:.2f}M"]
    lines[-1] += f" parameters, {model['tokens_per_step']:,} tokens per step"
    if plan.get("analytic"):
        lines.append("analytic estimate: parameters and optimizer state from the shardings, "
                     "FLOPs from the step's jaxpr; no compile, so no activations, HBM traffic "
                     "or collectives")
    for section in (_memory_lines, _compute_lines, _collective_lines, _roofline_lines):
        lines += [""] + section(plan) if section(plan) else []
    for note in plan.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
