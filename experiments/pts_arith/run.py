"""The post-training toy experiment: does PTS-DPO beat sequence DPO on held-out questions?

    phijax-experiment pts-arith configs/experiments/pts-arith.yaml [key=value ...]

One command runs every stage, each skipped when its output already exists (rerun to resume):

  1. data      `arith` word problems: train chats, held-out and validation questions
               (held-out story templates), PTS questions (train templates, fresh numbers)
                                                                                -> OUT/data/
  2. base      `phijax train` on the chats from scratch                        -> OUT/base
               (or `base_run`: an existing run directory)
  3. PTS       `tools.pts` on the PTS questions with the base model            -> OUT/pairs-pts.jsonl
  4. sequence  as many full-sequence pairs (a correct sampled answer chosen, an incorrect one
               rejected), round-robin over the questions PTS found pairs in    -> OUT/pairs-seq.jsonl
  5. DPO       `phijax dpo` from the base on each pair set, same config and steps
                                                                                -> OUT/dpo-pts, OUT/dpo-seq
  6. eval      held-out accuracy of the three models with its standard error, greedy and
               sampled (`eval.samples` answers per question at `eval.temperature`)
                                                                                -> OUT/results.json
               With `eval.split=valid` the models are scored on the validation questions
               instead (-> OUT/results-valid.json): choose DPO settings there, then report the
               held-out split once.

It prints a table (accuracy ± standard error per model, lift over the base in points) and one
JSON line. Overrides are dotted keys of this config (`out=runs/x`, `pts.rollouts=16`,
`dpo_overrides=[train.steps=50]`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from phijax.config import load, one_of, positive, ranged
from phijax.errors import ConfigError, DataError
from tools.pts import PTSConfig

log = logging.getLogger("phijax")


@dataclass
class TaskConfig:
    train: int = ranged(20000, ge=0)
    heldout: int = ranged(1000, ge=0)
    valid: int = ranged(1000, ge=0)  # held-out-template questions for choosing settings
    pts: int = ranged(1000, ge=0)


@dataclass
class ScoringConfig:
    """Every model is scored twice on the held-out questions: greedy (one answer each) and
    sampled (`samples` answers each at `temperature`, the distribution PTS acts on)."""
    temperature: float = positive(1.0)
    samples: int = positive(4)
    max_new_tokens: int = positive(64)
    split: str = one_of("heldout", "valid")  # valid: for choosing settings


@dataclass
class ExperimentConfig:
    out: str = "runs/pts-arith"
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    base_config: str = "configs/experiments/arith-base.yaml"
    base_overrides: list[str] = field(default_factory=list)
    base_run: Optional[str] = None  # an existing run directory to use instead of training one
    pts: PTSConfig = field(default_factory=PTSConfig)
    sequence_samples: int = 16  # answers sampled per question to find a correct/incorrect pair
    dpo_config: str = "configs/experiments/arith-dpo.yaml"
    dpo_overrides: list[str] = field(default_factory=list)
    eval: ScoringConfig = field(default_factory=ScoringConfig)


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    cfg = load(ExperimentConfig, path, overrides, what="experiment file")
    cfg.pts.validate("pts.")
    for name in ("base_config", "dpo_config"):
        if not Path(getattr(cfg, name)).is_file():
            raise ConfigError(f"{name}: {getattr(cfg, name)} does not exist")
    return cfg


# ---------------------------------------------------------------- stages

def _data(cfg: ExperimentConfig, out: Path) -> Path:
    from experiments.pts_arith.arith import write_task
    data = out / "data"
    if not all((data / f"{n}.jsonl").is_file() for n in ("train", "pts", cfg.eval.split)):
        write_task(data, train=cfg.task.train, heldout=cfg.task.heldout, pts=cfg.task.pts,
                   valid=cfg.task.valid, seed=cfg.seed)
    return data


def _train(config: str, overrides: list[str], task=None) -> None:
    from phijax.config import load_config
    from phijax.train.loop import train
    from phijax.train.tasks import lm_task
    train(load_config(config, overrides), task or lm_task)


def _sequence_pairs(sampler, tokenizer, questions: list[dict], first_ids: list, count: int,
                    cfg: ExperimentConfig) -> list[dict]:
    """`count` full-sequence pairs (correct sampled answer chosen, incorrect rejected), taken
    round-robin over questions, those in `first_ids` first. Every question in `first_ids` (those
    PTS found pairs in) is sampled before sampling stops, so the pairs spread over the same
    questions as PTS's rather than piling up on the first few hundred."""
    from phijax.sampling import Request
    from phijax.eval.questions import answer_text, check, prompt_ids
    rank = {qid: i for i, qid in enumerate(first_ids)}
    ordered = sorted(questions, key=lambda q: rank.get(q["id"], len(rank)))
    stops = tokenizer.stop_ids
    prompts = [prompt_ids(q, tokenizer) for q in ordered]
    outcomes = []  # per question: (correct answers, incorrect answers)
    t0 = time.perf_counter()
    for start in range(0, len(ordered), 32):
        requests = [Request(p, n=cfg.sequence_samples, max_new_tokens=cfg.pts.max_new_tokens,
                            temperature=cfg.pts.temperature, stop_ids=stops, seed=cfg.seed + i)
                    for i, p in enumerate(prompts[start:start + 32], start)]
        for q, samples in zip(ordered[start:start + 32], sampler.generate(requests)):
            good, bad = [], []
            for s in samples:
                (good if check(q, answer_text(s.tokens, tokenizer)) else bad).append(s.tokens)
            outcomes.append((good, bad))
        found = sum(min(len(g), len(b)) for g, b in outcomes)
        log.info("sequence pairs: %d/%d questions sampled, %d of %d pairs found, %.0f rollouts/s",
                 len(outcomes), len(ordered), min(found, count), count,
                 len(outcomes) * cfg.sequence_samples / (time.perf_counter() - t0))
        if found >= count and len(outcomes) >= len(rank):
            break
    pairs, used = [], {}
    while len(pairs) < count:
        added = False
        for q, p, (good, bad) in zip(ordered, prompts, outcomes):
            k = used.get(q["id"], 0)
            if k < min(len(good), len(bad)) and len(pairs) < count:
                pairs.append({"id": f"{q['id']}/seq/{k}", "prompt_ids": p, "chosen_ids": good[k],
                              "rejected_ids": bad[k], "question_id": q["id"], "kind": "sequence"})
                used[q["id"]] = k + 1
                added = True
        if not added:
            break
    return pairs


MODES = ("greedy", "sampled")


def _evaluate(run_dir: Path, questions: list[dict], cfg: ExperimentConfig) -> dict:
    from phijax.sampling import load_sampler
    from phijax.eval.accuracy import EvalConfig, evaluate
    sampler, tokenizer = load_sampler(run_dir)
    e = cfg.eval

    def score(temperature, samples):
        out = evaluate(sampler, tokenizer, questions, EvalConfig(
            temperature=temperature, samples=samples, max_new_tokens=e.max_new_tokens,
            seed=cfg.seed, batch=512), details=True)
        out["rates"] = [r["correct"] / r["samples"] for r in out.pop("results")]
        return out
    return {"greedy": score(0.0, 1), "sampled": score(e.temperature, e.samples)}


def lift(after: dict, before: dict) -> tuple[float, float | None]:
    """(accuracy after - before, its standard error paired over the same questions), in points;
    the error is None where per-question rates are missing (results of older runs)."""
    diff = 100 * (after["accuracy"] - before["accuracy"])
    a, b = after.get("rates"), before.get("rates")
    if not a or not b or len(a) != len(b):
        return diff, None
    from phijax.eval.accuracy import mean_stderr
    return diff, mean_stderr([100 * (x - y) for x, y in zip(a, b)])[1]


def run(cfg: ExperimentConfig) -> dict:
    from phijax.eval.questions import load_questions
    from phijax.files import atomic_write, read_jsonl, write_jsonl
    from phijax.posttrain.dpo import dpo_task
    from phijax.sampling import load_sampler
    from tools.pts import run_pts

    out = Path(cfg.out)
    t0 = time.perf_counter()
    data = _data(cfg, out)
    scored = load_questions(data / f"{cfg.eval.split}.jsonl")
    pts_questions = load_questions(data / "pts.jsonl")
    if cfg.base_run:
        base = Path(cfg.base_run)
    else:
        base = out / "base"
        _train(cfg.base_config, [f"data.corpus=[{data / 'train.jsonl'}]", f"run.dir={base}",
                                 *cfg.base_overrides])
    pairs_pts, pairs_seq = out / "pairs-pts.jsonl", out / "pairs-seq.jsonl"
    results_path = out / ("results.json" if cfg.eval.split == "heldout" else
                          f"results-{cfg.eval.split}.json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not pairs_pts.is_file() or not pairs_seq.is_file():
        sampler, tokenizer = load_sampler(base)
        if not pairs_pts.is_file():
            pairs, stats = run_pts(sampler, tokenizer, pts_questions, cfg.pts,
                                   log=lambda m: log.info("pts: %s", m))
            if not pairs:
                raise DataError(f"PTS found no pairs ({stats.summary()}); see {base}")
            results["pts_search"] = stats.summary()
            write_jsonl(pairs_pts, pairs)
        pts = [pair for _, pair in read_jsonl(pairs_pts)]
        first = list(dict.fromkeys(p["question_id"] for p in pts))
        seq = _sequence_pairs(sampler, tokenizer, pts_questions, first, len(pts), cfg)
        write_jsonl(pairs_seq, seq)
        del sampler
    counts = {name: sum(1 for _ in read_jsonl(path))
              for name, path in (("pts", pairs_pts), ("sequence", pairs_seq))}
    for name, pairs in (("pts", pairs_pts), ("seq", pairs_seq)):
        _train(cfg.dpo_config, [f"run.init_from={base}", f"dpo.pairs={pairs}",
                                f"run.dir={out / ('dpo-' + name)}", *cfg.dpo_overrides], dpo_task)
    for name, run_dir in (("base", base), ("sequence_dpo", out / "dpo-seq"),
                          ("pts_dpo", out / "dpo-pts")):
        if name not in results:
            results[name] = _evaluate(run_dir, scored, cfg)
            atomic_write(results_path, json.dumps(results, indent=1))
    results["pairs"] = counts
    results["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(results_path, json.dumps(results, indent=1))
    return results


def format_table(results: dict, cfg: ExperimentConfig) -> str:
    e = cfg.eval
    rows = [f"| model | DPO pairs | greedy accuracy ± stderr | lift (points ± paired stderr) | "
            f"T={e.temperature:g}, {e.samples}/question accuracy ± stderr | lift |",
            "|---|---|---|---|---|---|"]
    for name, label, pairs in (("base", "base (before DPO)", "–"),
                               ("sequence_dpo", "sequence DPO", results["pairs"]["sequence"]),
                               ("pts_dpo", "PTS DPO", results["pairs"]["pts"])):
        cells = []
        for mode in MODES:
            r = results[name][mode]
            diff, err = lift(r, results["base"][mode])
            shown = f"{diff:+.1f}" + ("" if err is None else f" ± {err:.1f}")
            cells += [f"{r['accuracy']:.3f} ± {r['stderr']:.3f}", "–" if name == "base" else shown]
        rows.append(f"| {label} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary(results: dict, cfg: ExperimentConfig) -> dict:
    """The experiment's figures as one JSON-able record: accuracy ± stderr per model and mode,
    and each DPO model's lift over the base."""
    def model(k: str) -> dict:
        out = {}
        for mode in MODES:
            r = results[k][mode]
            out[mode] = {"accuracy": r["accuracy"], "stderr": r["stderr"]}
            if k != "base":
                out[mode].update(zip(("lift_points", "lift_stderr"),
                                     lift(r, results["base"][mode])))
        return out
    return {"split": cfg.eval.split, "questions": results["base"]["greedy"]["n"],
            "sampled": {"temperature": cfg.eval.temperature, "samples": cfg.eval.samples},
            **{k: model(k) for k in ("base", "sequence_dpo", "pts_dpo")},
            "pairs": results["pairs"], "seconds": results["seconds"]}
