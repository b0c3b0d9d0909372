"""PTS throughput: our Pivotal Token Search (`tools.pts`, batched phijax sampling) against the
same search with transformers `generate()` per prefix at batch 5.

    python benchmarks/pts_throughput.py [--model RUN_DIR --questions Q.jsonl] [options]

Both sides run `tools.pts.run_pts` (Algorithm 1: the same driver, memo, seeds, oracle and
`PTSConfig`) with the same model and questions; only the sampler behind `SamplerEstimator`
differs:
  ours  `phijax.sampling.Sampler`: every prefix a round needs, of every question, in one call of
        up to `--batch-rows` rollouts, prefilled once per prefix and fanned out.
  hf    `Phi3ForCausalLM.generate(do_sample=True)` (PyTorch, float32, sdpa) on the run converted
        with `phijax.convert.to_hf`: one prefix at a time, `num_return_sequences=5` per call,
        repeated until the prefix has its n rollouts (how the open PTS implementation samples),
        at the config's temperature with no top-k/top-p, stopping at <|im_end|>/<|endoftext|>;
        log-probs (log-softmax of the raw logits, from `output_logits`) only for the rollouts of
        the empty prefix, the only ones the search reads them from. torch threads: the faster
        of 1 and all cores, timed first (`--hf-threads`): on a loaded machine two intra-op
        threads decoded this tiny model ~10x slower than one.
Rollouts/s = rollouts sampled / wall seconds of the run, oracle checks included. Ours runs twice
on the same questions and seeds: cold (a fresh process: JAX compilation included) and warm (every
shape already compiled). The headline `ratio` uses the cold run (the conservative one: a real run
over many questions pays the same compilations once); `ratio_warm` is printed beside it. The HF
side is much slower, so it runs the first `--hf-questions` of the questions, stopping at
`--hf-seconds` (counted over what it did); ours is also timed on that subset alone (warm),
which shows how much of the gap is batching across questions.

Default model and questions (no network): the toy arithmetic task.
`experiments/pts_arith/arith.py` writes the task and `configs/experiments/arith-base.yaml`
trains the base model on it, once, cached under
`--cache` (default ~/.cache/phijax/bench-pts, keyed by a hash of those two files; about 7
minutes of training on 2 CPU cores the first time); the questions are the first `--n-questions`
of its pts.jsonl. The last stdout line is one JSON object. Target: ours >= 10x transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/pts_throughput.py` from anywhere

from experiments.pts_arith.arith import write_task  # noqa: E402
from phijax.eval.questions import load_questions, prompt_ids  # noqa: E402
from phijax.hashing import sha256_hex  # noqa: E402
from tools.pts import PTSConfig, run_pts  # noqa: E402

TARGET = 10.0
ARITH_CONFIG = ROOT / "configs" / "experiments" / "arith-base.yaml"
ARITH_TASK = ROOT / "experiments" / "pts_arith" / "arith.py"
DEFAULT_CACHE = Path.home() / ".cache" / "phijax" / "bench-pts"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the default task

def _complete(run_dir: Path) -> bool:
    """Whether `run_dir` holds a checkpoint of its config's last training step."""
    import yaml
    try:
        steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
        want = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return bool(steps) and max(steps) >= want and (run_dir / "tokenizer.model").is_file()


def arith_task(cache: Path) -> tuple[Path, Path]:
    """(run dir, pts.jsonl) of the toy arithmetic task: written and trained once, then cached."""
    for path in (ARITH_TASK, ARITH_CONFIG):
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing; pass --model and --questions")
    key = sha256_hex(ARITH_TASK.read_bytes() + ARITH_CONFIG.read_bytes())[:12]
    base = cache / f"arith-{key}"
    data, run = base / "data", base / "base"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not all((data / f).is_file() for f in ("train.jsonl", "pts.jsonl")):
        log(f"writing the arithmetic task to {data}")
        write_task(data)
    if not _complete(run):
        log(f"training the arith base model into {run} (once; cached for later runs)")
        subprocess.run([sys.executable, "-m", "phijax", "train", str(ARITH_CONFIG),
                        f"data.corpus=[{data / 'train.jsonl'}]", f"run.dir={run}"],
                       cwd=ROOT, env=env, check=True, stdout=sys.stderr)
    else:
        log(f"using the cached arith base model {run}")
    return run, data / "pts.jsonl"


# ------------------------------------------------------------------ the transformers side

class OutOfTime(Exception):
    pass


class HFSampler:
    """What `SamplerEstimator` needs of a `phijax.sampling.Sampler`, done the per-prefix way:
    each request's n samples come from `generate()` calls of `batch` return sequences of its
    prompt, one request at a time. Log-probs only for requests whose prompt is in
    `logprob_prompts` (the questions' own prompts: the empty prefix)."""

    def __init__(self, model, max_len: int, vocab_limit: int, logprob_prompts, batch: int = 5,
                 pad_id: int = 0, deadline: float | None = None):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        self.model, self.batch, self.pad_id, self.deadline = model, batch, pad_id, deadline
        self.max_len, self.cfg = max_len, SimpleNamespace(vocab_size=model.config.vocab_size)
        self.logprob_prompts = {tuple(p) for p in logprob_prompts}
        self.vocab_limit = vocab_limit
        self.processors = None
        if vocab_limit < model.config.vocab_size:  # like phijax: never draw past the tokenizer

            class Limit(LogitsProcessor):
                def __call__(self, input_ids, scores):
                    scores[:, vocab_limit:] = -torch.inf
                    return scores

            self.processors = LogitsProcessorList([Limit()])
        self.rows = self.calls = 0
        self.last_report = time.perf_counter()

    def generate(self, requests):
        import torch

        from phijax.sampling import Sample

        results = []
        for r in requests:
            want_lp = tuple(r.prompt) in self.logprob_prompts
            inputs = torch.tensor([r.prompt])
            torch.manual_seed(r.seed)
            samples = []
            while len(samples) < r.n:
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    raise OutOfTime
                k = min(self.batch, r.n - len(samples))
                with torch.no_grad():
                    out = self.model.generate(
                        inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                        temperature=r.temperature, top_k=0, top_p=1.0,
                        max_new_tokens=r.max_new_tokens, num_return_sequences=k,
                        eos_token_id=list(r.stop_ids), pad_token_id=self.pad_id,
                        logits_processor=self.processors, return_dict_in_generate=True,
                        output_logits=want_lp)
                rows = out.sequences[:, inputs.shape[1]:].tolist()
                if want_lp:  # model log-probs at temperature 1, as phijax reports them
                    logits = torch.stack(out.logits, 1).float()[..., :self.vocab_limit]
                    new = out.sequences[:, inputs.shape[1]:]
                    lps = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0].tolist()
                for i, row in enumerate(rows):
                    end = next((t + 1 for t, tok in enumerate(row) if tok in r.stop_ids),
                               len(row))
                    stopped = bool(row[:end]) and row[end - 1] in r.stop_ids
                    samples.append(Sample(row[:end], lps[i][:end] if want_lp else [],
                                          "stop" if stopped else "length"))
                self.rows += k
                self.calls += 1
            results.append(samples)
            now = time.perf_counter()
            if now - self.last_report > 15:
                self.last_report = now
                log(f"  hf: {self.rows} rollouts in {self.calls} generate() calls so far")
        return results


def hf_model(run_dir: Path, work: Path):
    import torch
    from transformers import Phi3ForCausalLM

    from phijax.convert import to_hf

    to_hf(run_dir, work / "hf")
    model = Phi3ForCausalLM.from_pretrained(work / "hf", torch_dtype=torch.float32,
                                            attn_implementation="sdpa")
    return model.eval()


# ------------------------------------------------------------------ the runs

def pick_threads(hf: HFSampler, prompt: list[int], cfg: PTSConfig, tokenizer) -> int:
    """The faster torch thread count for the transformers side, 1 or all cores: on a loaded
    machine torch's intra-op threads can slow small models' decoding by an order of magnitude."""
    import torch

    from phijax.sampling import Request

    request = Request(prompt, n=3 * hf.batch, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature,
                      stop_ids=tokenizer.stop_ids)
    best = None
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        hf.generate([request])  # warm-up
        start = time.perf_counter()
        hf.generate([request])
        seconds = time.perf_counter() - start
        log(f"  hf: torch threads {threads}: {seconds:.2f}s for {request.n} rollouts")
        if best is None or seconds < best[1]:
            best = (threads, seconds)
    return best[0]


def timed_pts(sampler, tokenizer, questions, cfg, name: str):
    """(stats or None if out of time, rollouts sampled, wall seconds) of one PTS run."""
    start = time.perf_counter()
    try:
        _, stats = run_pts(sampler, tokenizer, questions, cfg,
                           log=lambda line: log(f"  {name}: {line}"))
    except OutOfTime:
        seconds = time.perf_counter() - start
        log(f"  {name}: out of time after {seconds:.1f}s, {sampler.rows} rollouts")
        return None, sampler.rows, seconds
    return stats, stats.rollouts, time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    d = PTSConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="run directory (default: the cached arith base model)")
    p.add_argument("--questions", help="question JSONL (default: the arith task's pts.jsonl)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the default task lives")
    p.add_argument("--n-questions", type=int, default=48, help="questions ours searches")
    p.add_argument("--hf-questions", type=int, default=8,
                   help="the first this many of them, searched by the transformers side")
    p.add_argument("--hf-seconds", type=float, default=120.0,
                   help="time budget of the transformers side (it stops at the next generate())")
    p.add_argument("--hf-batch", type=int, default=5, help="return sequences per generate()")
    p.add_argument("--hf-threads", type=int, default=0,
                   help="torch threads (default: the faster of 1 and all cores, timed)")
    p.add_argument("--rollouts", type=int, default=d.rollouts)
    p.add_argument("--recheck", type=int, default=d.recheck)
    p.add_argument("--p-gap", type=float, default=d.p_gap)
    p.add_argument("--p-min", type=float, default=d.p_min)
    p.add_argument("--p-max", type=float, default=d.p_max)
    p.add_argument("--max-new-tokens", type=int, default=96,
                   help="answer length (arith solutions stay under ~45 tokens)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-rows", type=int, default=d.batch_rows)
    args = p.parse_args()
    if (args.model is None) != (args.questions is None):
        p.error("give both --model and --questions, or neither (the arith task)")
    if args.hf_questions > args.n_questions:
        p.error("--hf-questions must be at most --n-questions")
    return args


def run_hf(run_dir: Path, sampler, tokenizer, questions, cfg: PTSConfig, args):
    """The transformers side: (HFSampler, torch threads, stats or None, rollouts, seconds)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = hf_model(run_dir, Path(tmp))
    prompts = [prompt_ids(q, tokenizer) for q in questions]
    hf = HFSampler(model, sampler.max_len, tokenizer.vocab_size, prompts, args.hf_batch,
                   tokenizer.pad_id)
    threads = args.hf_threads or pick_threads(hf, prompts[0], cfg, tokenizer)
    torch.set_num_threads(threads)
    hf.rows = hf.calls = 0
    log(f"transformers generate(), batch {args.hf_batch} per prefix, {len(questions)} "
        f"questions, budget {args.hf_seconds:.0f}s")
    hf.deadline = time.perf_counter() + args.hf_seconds
    return (hf, threads, *timed_pts(hf, tokenizer, questions, cfg, "hf"))


def main() -> None:
    args = parse_args()
    if args.model is None:
        run_dir, questions_path = arith_task(Path(args.cache).expanduser())
    else:
        run_dir, questions_path = Path(args.model), Path(args.questions)
    cfg = PTSConfig(rollouts=args.rollouts, recheck=args.recheck, p_gap=args.p_gap,
                    p_min=args.p_min, p_max=args.p_max, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed, batch_rows=args.batch_rows)
    cfg.validate()
    questions = load_questions(questions_path)[:args.n_questions]
    hf_questions = questions[:args.hf_questions]

    from phijax.sampling import load_sampler

    sampler, tokenizer = load_sampler(run_dir)
    log(f"model {run_dir}: {sampler.cfg.num_hidden_layers} layers, hidden "
        f"{sampler.cfg.hidden_size}; {len(questions)} questions from {questions_path}")
    log("ours, cold (JAX compilation included)")
    cold = timed_pts(sampler, tokenizer, questions, cfg, "ours cold")
    log("ours, warm (the same run again, every shape compiled)")
    warm = timed_pts(sampler, tokenizer, questions, cfg, "ours warm")
    log(f"ours, warm, on the {len(hf_questions)} questions of the transformers side")
    sub = timed_pts(sampler, tokenizer, hf_questions, cfg, "ours subset")
    hf, threads, *hf_run = run_hf(run_dir, sampler, tokenizer, hf_questions, cfg, args)
    report(args, cfg, run_dir, questions_path, len(questions), len(hf_questions), cold, warm,
           sub, hf_run, hf.calls, threads)


def report(args, cfg: PTSConfig, run_dir, questions_path, n_questions: int, n_hf: int,
           cold, warm, sub, hf_run, hf_calls: int, threads: int) -> None:
    """Print the table, the summary lines and the JSON line."""
    import jax
    import torch
    import transformers

    (cold, cold_n, cold_s), (_, warm_n, warm_s), (_, sub_n, sub_s) = cold, warm, sub
    hf_stats, hf_n, hf_s = hf_run
    rate = lambda n, s: round(n / s, 1) if s else 0.0
    ours, ours_warm, hf_rate = rate(cold_n, cold_s), rate(warm_n, warm_s), rate(hf_n, hf_s)
    ratio = lambda a: round(a / hf_rate, 2) if hf_rate else None
    result = {
        "bench": "pts_throughput", "model": str(run_dir), "questions": str(questions_path),
        "n_questions": n_questions, "hf_questions": n_hf,
        "rollouts": cfg.rollouts, "recheck": cfg.recheck, "p_gap": cfg.p_gap,
        "p_min": cfg.p_min, "p_max": cfg.p_max, "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "seed": cfg.seed, "batch_rows": cfg.batch_rows,
        "hf_batch": args.hf_batch, "hf_budget_s": args.hf_seconds,
        "pts_rollouts_per_s": ours, "pts_rollouts_per_s_warm": ours_warm,
        "pts_subset_rollouts_per_s_warm": rate(sub_n, sub_s),
        "hf_rollouts_per_s": hf_rate,
        "ratio": ratio(ours), "ratio_warm": ratio(ours_warm),
        "ratio_subset_warm": ratio(rate(sub_n, sub_s)), "target": TARGET,
        "pts_rollouts": cold_n, "pts_seconds": round(cold_s, 2),
        "pts_seconds_warm": round(warm_s, 2), "pts_compile_s": round(cold_s - warm_s, 2),
        "pts_calls": cold.calls, "pts_rounds": cold.rounds, "pts_prefixes": cold.prefixes,
        "pts_searched": cold.searched, "pts_candidates": cold.candidates,
        "pts_kept": cold.kept, "pts_pairs": cold.pairs,
        "hf_rollouts": hf_n, "hf_seconds": round(hf_s, 2), "hf_generate_calls": hf_calls,
        "hf_completed": hf_stats is not None,
        "hf_prefixes": hf_stats.prefixes if hf_stats else None,
        "hf_searched": hf_stats.searched if hf_stats else None,
        "hf_torch_threads": threads, "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    hf_what = ("completed" if hf_stats else f"stopped at the {args.hf_seconds:.0f}s budget")
    rows = [(f"ours, {n_questions} questions, cold (compile included)", cold_n, cold_s, ours),
            ("  same, warm (compiled)", warm_n, warm_s, ours_warm),
            (f"  same, warm, first {n_hf} questions only", sub_n, sub_s,
             result["pts_subset_rollouts_per_s_warm"]),
            (f"transformers generate() x{args.hf_batch}, {n_hf} questions, "
             f"{threads} thr, {hf_what}", hf_n, hf_s, hf_rate)]
    print(f"\n{'run':<66} {'rollouts':>9} {'seconds':>8} {'rollouts/s':>11}")
    for name, n, seconds, r in rows:
        print(f"{name:<66} {n:>9,} {seconds:>8.2f} {r:>11,.1f}")
    print(f"ours: {cold.searched}/{cold.questions} questions searched, {cold.prefixes} prefixes "
          f"in {cold.rounds} rounds ({cold.calls} sampler calls), {cold.pairs} pairs; "
          f"compilation ~{result['pts_compile_s']:.1f}s")
    print(f"ratio ours / transformers: {result['ratio']} cold, {result['ratio_warm']} warm, "
          f"{result['ratio_subset_warm']} on the same {n_hf} questions warm "
          f"(target >= {TARGET})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
