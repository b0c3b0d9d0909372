"""Accuracy of a checkpoint on a question set, with its standard error.

Questions are `tools.oracles` records (`{"id", "kind", "prompt" | "prompt_ids", "answer" |
"tests"}`). Each prompt is rendered as a user turn of the chat template (`prompt_ids` are used
as given), sampled `samples` times at `temperature` until `<|im_end|>` or `<|endoftext|>`
through `phijax.sampling.Sampler.generate` (many questions per call), decoded and checked with
`tools.oracles.check`.

Accuracy is the mean over questions of each question's success rate (its samples averaged
first); the standard error is over questions, sqrt(var / n) with var the (population) variance
of the per-question rates. With one sample per question that is the binomial sqrt(p (1 - p) / n).
A question's sampling seed is a function of (seed, id), so results do not depend on batching.

    python -m tools.evaluate --model RUN_DIR --questions Q.jsonl [--temperature 0] [--samples 1]
        [--max-new-tokens 64] [--seed 0] [--batch 64] [--results OUT.jsonl]

prints a small table and then one JSON line (accuracy, stderr, n, ...). Every question record is
checked before the model is loaded; a bad one fails in one line naming file:line.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

from tools.jsonl import write_jsonl
from tools.oracles import answer_text, check, load_questions, prompt_ids, question_seed

log = logging.getLogger("tools.evaluate")


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / n), var the population variance (0, 0 if empty)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n / n)


def summarize(scores: list[list[bool]]) -> dict:
    """Accuracy and its standard error from per-question sample outcomes: each question's rate
    is the mean of its samples, accuracy the mean rate, and the standard error
    sqrt(var(rates) / n) over the n questions (binomial sqrt(p (1 - p) / n) with one sample)."""
    p, stderr = mean_stderr([sum(s) / len(s) for s in scores])
    return {"accuracy": p, "stderr": stderr, "n": len(scores)}


def evaluate(sampler, tokenizer, questions: list[dict], temperature: float = 0.0,
             samples: int = 1, max_new_tokens: int = 64, seed: int = 0, batch: int = 64,
             top_p: float = 1.0, details: bool = False) -> dict:
    """{"accuracy", "stderr", "n", "samples", "temperature", "seconds"[, "results"]}.

    `batch` is the number of sample rows per `generate` call (questions per call:
    batch // samples, at least one). `details` adds per-question results:
    {"id", "correct" (samples that succeeded), "samples", "completions"}."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    stop = tokenizer.stop_ids
    per_call = max(1, batch // samples)
    scores, results, t0 = [], [], time.perf_counter()
    for start in range(0, len(questions), per_call):
        chunk = questions[start:start + per_call]
        requests = [_request(q, tokenizer, temperature, samples, max_new_tokens, seed, top_p,
                             stop) for q in chunk]
        # Pad a short last call to the full size: the same compiled program, no new compile.
        padded = requests + [requests[0]] * (per_call - len(requests)) \
            if len(questions) > per_call else requests
        outputs = sampler.generate(padded)[:len(chunk)]
        for q, out in zip(chunk, outputs):
            texts = [answer_text(s.tokens, tokenizer) for s in out]
            ok = [check(q, text) for text in texts]
            scores.append(ok)
            if details:
                results.append({"id": q["id"], "correct": sum(ok), "samples": len(ok),
                                "completions": texts})
        done, elapsed = len(scores), time.perf_counter() - t0
        rate = done / elapsed
        log.info("evaluate: %d/%d questions, %.1f questions/s, accuracy so far %.3f, eta %.0fs",
                 done, len(questions), rate, summarize(scores)["accuracy"],
                 (len(questions) - done) / rate)
    out = {**summarize(scores), "samples": samples, "temperature": temperature,
           "seconds": round(time.perf_counter() - t0, 2)}
    if details:
        out["results"] = results
    return out


def _request(q, tokenizer, temperature, samples, max_new_tokens, seed, top_p, stop):
    from phijax.sampling import Request
    return Request(prompt_ids(q, tokenizer), n=samples, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, stop_ids=stop, seed=question_seed(seed, q["id"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate",
                                 description="accuracy of a checkpoint on a question set")
    ap.add_argument("--model", required=True, help="run directory (config, tokenizer, checkpoint)")
    ap.add_argument("--questions", required=True, help="question JSONL (tools.oracles format)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--samples", type=int, default=1, help="samples per question (default 1)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64, help="sample rows per generate call")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--results", help="write per-question results (JSONL) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.samples < 1 or args.max_new_tokens < 1 or args.batch < 1:
            raise ValueError("--samples, --max-new-tokens and --batch must be at least 1")
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        questions = load_questions(args.questions)  # before the (slow) model load
        from phijax.sampling import load_sampler
        sampler, tokenizer = load_sampler(args.model)
        out = evaluate(sampler, tokenizer, questions, args.temperature, args.samples,
                       args.max_new_tokens, args.seed, args.batch, args.top_p,
                       details=bool(args.results))
    except (ValueError, OSError) as e:
        print(f"tools.evaluate: error: {e}", file=sys.stderr)
        return 2
    results = out.pop("results", None)
    if args.results:
        write_jsonl(args.results, results)
    out = {"model": str(args.model), "questions": str(args.questions), **out}
    print(f"model        {args.model}")
    print(f"questions    {args.questions}  (n = {out['n']})")
    print(f"sampling     temperature {args.temperature:g}, {args.samples} per question, "
          f"max {args.max_new_tokens} new tokens, seed {args.seed}")
    print(f"accuracy     {out['accuracy']:.4f} ± {out['stderr']:.4f}  ({out['seconds']:.1f} s)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
