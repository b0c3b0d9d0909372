"""Evaluation throughput: phijax's evaluation paths against lm-evaluation-harness's `hf` model.

One run, on this machine, with the `configs/bench-cpu-53m.yaml` model (random weights, seed 0;
the same weights on both sides through `phijax convert`'s `to_hf`), on the same text requests:
  1. log-likelihood, multiple-choice style: `--items` contexts of 200-400 tokens cut from the
     Python docs, 4 choices each (the true next 4-24 tokens and three spans of 4-24 tokens from
     elsewhere), so `--items` * 4 (context, continuation) requests. phijax: the path of
     `phijax eval`'s choice tasks, each item's pairs split from the encoding of the whole text
     (`harness._choice_pairs`, as lm-eval splits them) and scored by
     `LikelihoodScorer(batch=--batch).score` (a row per context, its choices after it);
     tokenization is timed on both sides. lm-eval: `HFLM.loglikelihood` on `Instance`s with
     arguments (context, continuation), `batch_size` `--batch` (a row per request).
     Requests/s = requests / wall time. The per-request log-likelihoods of the two must agree
     (max abs difference printed; float32) and the token ids of every pair must be the same,
     which guards against the two measuring different work. `--choices letters` makes it
     MMLU's format instead: the context + "\nAnswer:", continuations " A" .. " D"; both sides
     then run one row per item (lm-eval through its one-token-continuation cache).
  2. greedy generation: `--prompts` prompts of ~128 tokens of the same text, `--new` new tokens
     each, stopping only at the tokenizer's end-of-text ids on both sides (lm-eval adds the eos
     string to `until`, whose own string never occurs). phijax: `Sampler.generate` at
     temperature 0, `--batch` requests per call, prompts encoded and answers decoded with the
     run's tokenizer (timed). lm-eval: `HFLM.generate_until` with {"until": [...],
     "max_gen_toks": --new, "do_sample": False}, `batch_size` `--batch`. New tokens/s = tokens
     made / wall time; the completions' token ids are compared (random-weight float32 greedy can
     differ on near-ties).
Each side does one untimed warm-up pass of the same work (JAX compilation, allocator), then
`--repeats` timed passes; the best is reported. All phijax passes run before torch runs (torch's
spinning OpenMP threads slow JAX after them). The tokenizer is `serve_throughput.bench_tokenizer`
(a byte-level BPE tokenizer.json trained on the Python docs); its export names <|endoftext|> as
eos and <|pad|> as pad.
It also measures the float32 matmul peak (large `jnp.dot`s, as the training benchmark) and prints
the ceiling: each side's FLOP/s as a fraction of that peak (the matmuls of the work as that side
does it; attention scores not counted), and the ratio phijax would reach with every matmul of
its work at the peak (`ratio_at_peak`).
The last stdout line is one JSON object. Targets: phijax >= 1.5x lm-eval on log-likelihood,
>= 2x on generation. Needs lm-eval's `hf` model: `pip install "lm-eval[hf]"` (lm-eval[api] and
`accelerate` will do) beside the `bench` extra.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampling_throughput import matmul_flops  # noqa: E402
from serve_throughput import _count_compiles, bench_tokenizer  # noqa: E402

LOGLIK_TARGET, GEN_TARGET = 1.5, 2.0
CHOICES = 4
NEVER = "\x00never\x00"  # the `until` string of generation: never in the text
START = time.perf_counter()


def progress(what: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {what}", file=sys.stderr, flush=True)


def timed(fn, repeats: int, compiles: dict | None = None):
    """(best seconds of `repeats` calls after one untimed warm-up call, the last result, JAX
    compilations during the timed calls where `compiles` counts them)."""
    fn()
    before = compiles["compiles"] if compiles else 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out, (compiles["compiles"] - before if compiles else 0)


def workload(tok, args):
    """(items, prompts): `--items` (context, [4 continuations]) and `--prompts` prompt texts,
    cut at random places from the Python docs (encoded once, windows decoded back to text)."""
    from phijax.data.corpus import documents

    ids = np.array(tok.encode(["\n\n".join(documents(["builtin:python-docs"]))])[0])
    rng = np.random.default_rng(0)

    def text(start: int, n: int) -> str:
        return tok.decode(ids[start:start + n].tolist())

    def span() -> str:
        while True:
            n = int(rng.integers(4, 25))
            s = " " + text(int(rng.integers(0, len(ids) - n)), n).strip()
            if len(s) > 1:
                return s

    items = []
    for _ in range(args.items):
        n = int(rng.integers(200, 401))
        start = int(rng.integers(0, len(ids) - n - 32))
        context = text(start, n).rstrip()  # lm-eval moves trailing spaces to the continuation
        if args.choices == "letters":
            items.append((context + "\nAnswer:", [" A", " B", " C", " D"]))
            continue
        true = " " + text(start + n, int(rng.integers(4, 25))).strip()
        items.append((context, [true if len(true) > 1 else span()] +
                      [span() for _ in range(CHOICES - 1)]))
    prompts = [text(int(rng.integers(0, len(ids) - 128)), 128) for _ in range(args.prompts)]
    return items, prompts


def export(cfg, params, tokenizer_json: Path, work: Path) -> tuple[Path, Path]:
    """(run directory, HF directory): the params with the eval tokenizer, and `to_hf` of them."""
    from phijax.convert import to_hf
    from phijax.data.tokenizer import save_tokenizer
    from phijax.weights import save_params

    save_params(work / "ckpt", cfg, params)
    save_tokenizer(tokenizer_json, work / "ckpt")
    return work / "ckpt", to_hf(work / "ckpt", work / "hf")


# ---------------------------------------------------------------- phijax

def phijax_side(cfg, params, tok, items, prompts, args) -> dict:
    from phijax.eval.harness import _choice_pairs
    from phijax.eval.loglik import LikelihoodScorer
    from phijax.eval.tasks import Item
    from phijax.sampling import Request, Sampler

    scorer = LikelihoodScorer(cfg.model, params, batch=args.batch)
    pairs_of = {}

    def loglik():
        pairs = [p for i, (context, choices) in enumerate(items)
                 for p in _choice_pairs(tok, Item(str(i), context, None, choices))]
        pairs_of["pairs"] = pairs
        return scorer.score(pairs)

    # the model's whole vocabulary, as transformers' argmax: no vocab_limit
    sampler = Sampler(cfg.model, params)

    def generate():
        ids = tok.encode(prompts)
        out = []
        for start in range(0, len(ids), args.batch):
            requests = [Request(p, max_new_tokens=args.new, temperature=0.0,
                                stop_ids=tok.stop_ids) for p in ids[start:start + args.batch]]
            out += [got[0].tokens for got in sampler.generate(requests)]
        texts = [tok.decode(t) for t in out]  # the answers as text, as generate_until gives
        return ids, out, texts

    compiles = _count_compiles()
    progress("phijax log-likelihood")
    loglik_s, logps, late = timed(loglik, args.repeats, compiles)
    progress("phijax generation")
    gen_s, (prompt_ids, tokens, _), late_gen = timed(generate, args.repeats, compiles)
    return {"loglik_s": loglik_s, "logps": np.array(logps), "pairs": pairs_of["pairs"],
            "rows": scorer.rows(pairs_of["pairs"]),
            "gen_s": gen_s, "prompt_ids": prompt_ids, "tokens": tokens,
            "late_compiles": late + late_gen}


# ---------------------------------------------------------------- lm-evaluation-harness

def lm_eval_side(hf_dir: Path, items, prompts, args) -> dict:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    progress("lm-eval: loading HFLM")
    lm = HFLM(pretrained=str(hf_dir), batch_size=args.batch, device="cpu", dtype="float32")
    ll_requests = [Instance("loglikelihood", {}, (context, choice), len(choices) * i + j)
                   for i, (context, choices) in enumerate(items)
                   for j, choice in enumerate(choices)]
    gen_kwargs = {"until": [NEVER], "max_gen_toks": args.new, "do_sample": False}
    gen_requests = [Instance("generate_until", {}, (p, dict(gen_kwargs)), i)
                    for i, p in enumerate(prompts)]
    progress("lm-eval log-likelihood")
    loglik_s, out, _ = timed(lambda: lm.loglikelihood(ll_requests, disable_tqdm=True),
                             args.repeats)

    made = {}  # prompt ids (left padding removed) -> new ids, of every generated row
    model_generate, pad = lm._model_generate, lm.tokenizer.pad_token_id

    def capture(context, **kwargs):
        result = model_generate(context, **kwargs)
        for row, new in zip(context.tolist(), result[:, context.shape[1]:].tolist()):
            made[tuple(row[next(i for i, t in enumerate(row) if t != pad):])] = new
        return result

    lm._model_generate = capture
    progress("lm-eval generation")
    gen_s, _, _ = timed(lambda: lm.generate_until(gen_requests, disable_tqdm=True),
                        args.repeats)
    pairs = [lm._encode_pair(c, ch) for c, choices in items for ch in choices]
    return {"loglik_s": loglik_s, "logps": np.array([lp for lp, _ in out]), "pairs": pairs,
            "gen_s": gen_s, "made": made, "torch_threads": torch.get_num_threads()}


def hf_new_tokens(new: list[int], stop_ids) -> list[int]:
    """A generated row up to and including its first stop id (the rest is padding)."""
    for i, t in enumerate(new):
        if t in stop_ids:
            return new[:i + 1]
    return new


# ---------------------------------------------------------------- FLOPs

def loglik_flops(cfg, pairs, rows) -> tuple[float, float]:
    """Matmul FLOPs of scoring `pairs`: as phijax does it (`rows`, `LikelihoodScorer.rows`:
    each context once through the layers with its continuations' tokens but their last, the LM
    head only at the positions that predict a continuation token), and as lm-eval does it (one
    row per group of pairs whose context + continuation[:-1] is the same, through the layers
    and the LM head at every position)."""
    from phijax.train.metrics import param_counts

    c = param_counts(cfg)
    layers, head = c["attention"] + c["mlp"], cfg.vocab_size * cfg.hidden_size
    theirs: dict = {}
    for a, b in pairs:
        theirs[tuple(a) + tuple(b[:-1])] = len(a) + len(b) - 1
    done = sum(2.0 * (r.length * layers + r.scored * head) for r in rows)
    return done, sum(2.0 * n * (layers + head) for n in theirs.values())


def generation_flops(cfg, prompt: int, new: int) -> tuple[float, float]:
    """Matmul FLOPs of one greedy generation: as transformers does it, and as phijax does it
    (its prefill's last layer runs attention output and MLP at the prompt's last position
    only)."""
    theirs = matmul_flops(cfg, 1, prompt, new)
    o = cfg.hidden_size * cfg.num_attention_heads * cfg.dim_per_head
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return theirs, theirs - 2.0 * (prompt - 1) * (o + mlp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench-cpu-53m.yaml"))
    p.add_argument("--items", type=int, default=32, help="contexts, 4 choices each")
    p.add_argument("--choices", choices=("spans", "letters"), default="spans",
                   help="continuations: text spans of 4-24 tokens, or MMLU's ' A'..' D' after "
                        "'\\nAnswer:' (lm-eval then runs one forward per item)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    from flax import nnx

    from phijax.config import load_config
    from phijax.data.tokenizer import load_tokenizer
    from phijax.model import init_model
    from phijax.train.metrics import measure_matmul_peak

    progress("model, export")
    cfg = load_config(args.config, [])
    params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, 0)))
    with tempfile.TemporaryDirectory(prefix="phijax-bench-eval-") as tmp:
        run_dir, hf_dir = export(cfg, params, bench_tokenizer(cfg.model.vocab_size), Path(tmp))
        tok = load_tokenizer(run_dir)
        items, prompts = workload(tok, args)
        ours = phijax_side(cfg, params, tok, items, prompts, args)
        progress("matmul peak")
        peak = measure_matmul_peak(n=4096, reps=3, tries=3)  # before torch's threads spin
        hf = lm_eval_side(hf_dir, items, prompts, args)
    report(args, cfg, tok, ours, hf, peak, time.perf_counter() - START)


def report(args, cfg, tok, ours, hf, peak, wall) -> None:
    import jax
    import lm_eval
    import torch
    import transformers

    n_req = len(ours["pairs"])
    same_pairs = sum(list(a[0]) == list(b[0]) and list(a[1]) == list(b[1])
                     for a, b in zip(ours["pairs"], hf["pairs"]))
    diff = np.abs(ours["logps"] - hf["logps"])
    done, theirs_done = loglik_flops(cfg.model, ours["pairs"], ours["rows"])

    ours_new = [len(t) for t in ours["tokens"]]
    theirs = [hf_new_tokens(hf["made"].get(tuple(p), []), tok.stop_ids)
              for p in ours["prompt_ids"]]
    their_new = max(1, sum(len(hf_new_tokens(t, tok.stop_ids)) for t in hf["made"].values()))
    identical = sum(a == b for a, b in zip(ours["tokens"], theirs))
    stopped = sum(len(t) < args.new for t in ours["tokens"])
    gen_theirs, gen_done = np.sum([generation_flops(cfg.model, len(pr), n)
                                   for pr, n in zip(ours["prompt_ids"], ours_new)], axis=0)
    r = {"bench": "eval_throughput", "config": Path(args.config).name, "items": args.items,
         "choices": args.choices,
         "requests": n_req, "prompts": args.prompts, "new": args.new, "batch": args.batch,
         "repeats": args.repeats,
         "phijax_loglik_requests_per_s": round(n_req / ours["loglik_s"], 2),
         "lm_eval_loglik_requests_per_s": round(n_req / hf["loglik_s"], 2),
         "loglik_ratio": round(hf["loglik_s"] / ours["loglik_s"], 2),
         "loglik_target": LOGLIK_TARGET,
         "loglik_max_abs_diff": float(f"{diff.max():.3g}"),
         "pairs_same_ids": f"{same_pairs}/{n_req}",
         "phijax_gen_new_tokens_per_s": round(sum(ours_new) / ours["gen_s"], 1),
         "lm_eval_gen_new_tokens_per_s": round(their_new / hf["gen_s"], 1),
         "gen_ratio": round((sum(ours_new) / ours["gen_s"]) / (their_new / hf["gen_s"]), 2),
         "gen_target": GEN_TARGET, "gen_identical": f"{identical}/{args.prompts}",
         "gen_stopped_early": stopped,
         "peak_gflops": round(peak / 1e9, 1),
         "phijax_loglik_peak_fraction": round(done / ours["loglik_s"] / peak, 3),
         "lm_eval_loglik_peak_fraction": round(theirs_done / hf["loglik_s"] / peak, 3),
         "lm_eval_loglik_work_per_phijax_work": round(theirs_done / done, 3),
         "loglik_ratio_at_peak": round(hf["loglik_s"] / (done / peak), 2),
         "phijax_gen_peak_fraction": round(gen_done / ours["gen_s"] / peak, 3),
         "lm_eval_gen_peak_fraction": round(gen_theirs / hf["gen_s"] / peak, 3),
         "lm_eval_gen_work_per_phijax_work": round(gen_theirs / gen_done, 3),
         "gen_ratio_at_peak": round(hf["gen_s"] / (gen_done / peak), 2),
         "phijax_compiles_after_warmup": ours["late_compiles"],
         "wall_s": round(wall, 1), "torch_threads": hf["torch_threads"],
         "jax": jax.__version__, "torch": torch.__version__,
         "transformers": transformers.__version__, "lm_eval": lm_eval.__version__}
    rows = [(f"log-likelihood, {n_req} requests ({args.items} x {CHOICES}), batch {args.batch}",
             "", ""),
            ("  phijax LikelihoodScorer.score", ours["loglik_s"],
             f"{r['phijax_loglik_requests_per_s']:,.1f} req/s"),
            ("  lm-eval hf HFLM.loglikelihood", hf["loglik_s"],
             f"{r['lm_eval_loglik_requests_per_s']:,.1f} req/s"),
            (f"greedy generation, {args.prompts} prompts x {args.new} new, batch {args.batch}",
             "", ""),
            ("  phijax Sampler.generate", ours["gen_s"],
             f"{r['phijax_gen_new_tokens_per_s']:,.1f} tok/s"),
            ("  lm-eval hf HFLM.generate_until", hf["gen_s"],
             f"{r['lm_eval_gen_new_tokens_per_s']:,.1f} tok/s")]
    print(f"\n{'run':<66} {'seconds':>8} {'rate':>16}")
    for name, seconds, rate in rows:
        print(f"{name:<66} {seconds:>8.2f} {rate:>16}" if seconds != "" else name)
    print(f"log-likelihood ratio phijax / lm-eval: {r['loglik_ratio']} (target >= "
          f"{LOGLIK_TARGET}); max |logp difference| {r['loglik_max_abs_diff']}, pairs with the "
          f"same token ids {r['pairs_same_ids']}")
    print(f"generation ratio phijax / lm-eval: {r['gen_ratio']} (target >= {GEN_TARGET}); "
          f"identical completions {r['gen_identical']}, stopped before {args.new} tokens "
          f"(phijax) {stopped}")
    print(f"fraction of the float32 matmul peak ({r['peak_gflops']} GFLOP/s): log-likelihood "
          f"phijax {r['phijax_loglik_peak_fraction']}, lm-eval "
          f"{r['lm_eval_loglik_peak_fraction']}; generation phijax "
          f"{r['phijax_gen_peak_fraction']}, lm-eval {r['lm_eval_gen_peak_fraction']}")
    print(f"ceiling (every matmul of the work at the peak): log-likelihood ratio "
          f"{r['loglik_ratio_at_peak']}; generation ratio {r['gen_ratio_at_peak']}")
    if r["phijax_compiles_after_warmup"]:
        print(f"note: phijax compiled {r['phijax_compiles_after_warmup']} programs in a pass "
              f"after its warm-up")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
