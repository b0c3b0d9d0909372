"""`phijax eval`: score a checkpoint on benchmark tasks (`phijax.eval.tasks`).

Every task's file is read and checked before the model loads. Generation tasks sample
`samples` answers per item (greedy at temperature 0); an item's score is the mean of its
answers' scores and a metric is the mean over items with its standard error over items.
Choice tasks are scored by likelihood (acc, acc_norm) and, for lettered options (mmlu, gpqa)
unless `choice_generate` is off, by a generated letter (acc_gen). Prompts are user turns of the
chat template; `chat=false` gives a base model the prompt text as it is. Code tasks report pass@k for every k in (1, 5, 10) up to
`samples`. Each item's record keeps the prompt, the answers, what was extracted and the score.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from phijax import paths
from phijax.config import positive, ranged
from phijax.errors import ConfigError
from phijax.eval.accuracy import mean_stderr
from phijax.eval.generate import fit_prompt, generate_texts
from phijax.eval.graders import (grade_letter, grade_math, grade_number, grade_program,
                                 grade_question, grade_short_answer, pass_at_k, program)
from phijax.eval.judge import JudgeEndpoint, judge_short_answers
from phijax.eval.tasks import Item, Task, load_task

log = logging.getLogger("phijax.eval")


@dataclass
class HarnessConfig:
    tasks: list[str] = field(default_factory=lambda: ["arith"])
    data_dir: Optional[str] = None  # holds each task's file under its default name
    paths: dict = field(default_factory=dict)  # task -> data file, over data_dir
    limit: Optional[int] = positive(None)  # the first N items of each task
    samples: int = positive(1)  # answers per item (pass@k up to this)
    temperature: float = ranged(0.0, ge=0)  # 0: greedy
    top_p: float = ranged(1.0, gt=0, le=1)
    max_new_tokens: Optional[int] = positive(None)  # default: each task's own
    seed: int = 0  # with an item's id, fixes its answers
    batch: int = positive(64)  # sample rows per sampling call, rows per likelihood batch
    choice_generate: bool = True  # lettered choice tasks also answered by a generated letter
    chat: bool = True  # prompts as a user turn of the chat template; false: the text as is

    judge: Optional[JudgeEndpoint] = None  # simpleqa graded by this judge model, not by matching


@dataclass
class Model:
    """What scoring needs of a checkpoint; the sampler and the likelihood scorer are built on
    first use."""
    cfg: object  # phijax.config.Config of the run
    params: dict
    tokenizer: object
    mesh: object
    batch: int = 64  # rows per likelihood batch
    _sampler: object = None
    _scorer: object = None

    @property
    def sampler(self):
        if self._sampler is None:
            from phijax.sampling import Sampler
            self._sampler = Sampler(self.cfg.model, self.params, self.mesh,
                                    vocab_limit=self.tokenizer.vocab_size)
        return self._sampler

    @property
    def scorer(self):
        if self._scorer is None:
            from phijax.eval.loglik import LikelihoodScorer
            self._scorer = LikelihoodScorer(self.cfg.model, self.params, self.batch,
                                            vocab_limit=self.tokenizer.vocab_size)
        return self._scorer


def metric(values: list[float]) -> dict:
    value, stderr = mean_stderr(values)
    return {"value": value, "stderr": stderr, "n": len(values)}


# ---------------------------------------------------------------- generation tasks

def _answers(model: Model, task: Task, items: list[Item], cfg: HarnessConfig,
             chat: bool = True, max_new: Optional[int] = None) -> list[list[str]]:
    tok, sampler = model.tokenizer, model.sampler
    new = max_new or cfg.max_new_tokens or task.max_new_tokens
    new = min(new, sampler.max_len - 1)
    chat = chat and cfg.chat
    if task.name == "arith" and (chat or any(it.reference.get("prompt_ids") for it in items)):
        from phijax.eval.questions import prompt_ids
        prompts = [prompt_ids(it.reference, tok) for it in items]
    elif chat:
        prompts = [tok.encode_prompt([{"role": "user", "content": it.prompt}]) for it in items]
    else:
        prompts = tok.encode([it.prompt for it in items])
    prompts = [fit_prompt(p, new, sampler.max_len) for p in prompts]
    return generate_texts(sampler, tok, prompts, [it.id for it in items], samples=cfg.samples,
                          temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=new,
                          seed=cfg.seed, batch=cfg.batch, label=task.name)


def _grade(task: Task, items: list[Item], answers: list[list[str]],
           cfg: HarnessConfig) -> list[list[dict]]:
    k = len(answers[0])
    if task.name == "simpleqa" and cfg.judge is not None:
        flat = judge_short_answers(cfg.judge, [it.prompt for it in items for _ in range(k)],
                                   [it.reference[0] for it in items for _ in range(k)],
                                   [a for per in answers for a in per])
        return [flat[i * k:(i + 1) * k] for i in range(len(items))]
    if task.name == "math":
        flat = grade_math([it.reference for it in items for _ in range(k)],
                          [a for per in answers for a in per])
        return [flat[i * k:(i + 1) * k] for i in range(len(items))]
    grader = {"gsm8k": grade_number, "simpleqa": grade_short_answer,
              "arith": grade_question}[task.name]
    return [[grader(it.reference, a) for a in per] for it, per in zip(items, answers)]


def run_generate(model: Model, task: Task, items: list[Item], cfg: HarnessConfig):
    answers = _answers(model, task, items, cfg)
    grades = _grade(task, items, answers, cfg)
    records = [_record(it, per, g) for it, per, g in zip(items, answers, grades)]
    metrics = {"accuracy": metric([r["score"] for r in records])}
    if task.name == "simpleqa":
        for grade in ("correct", "incorrect", "not_attempted"):
            metrics[grade] = metric([np.mean([x["grade"] == grade for x in g]) for g in grades])
    return metrics, records


def _record(item: Item, answers: list[str], grades: list[dict]) -> dict:
    reference = item.reference if not isinstance(item.reference, dict) else \
        item.reference.get("answer", item.reference.get("tests"))
    return {"id": item.id, "prompt": item.prompt, "reference": reference, "answers": answers,
            "extracted": [g.get("extracted") for g in grades],
            "grades": [g["grade"] for g in grades if "grade" in g] or None,
            "score": float(np.mean([g["score"] for g in grades]))}


# ---------------------------------------------------------------- choice tasks

def _choice_pairs(tok, item: Item) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per choice, split from the encoding of the whole text
    (so a merge across the boundary is encoded as it would be in running text)."""
    context = tok.encode([item.prompt])[0]
    wholes = tok.encode([item.prompt + c for c in item.choices])
    return [(context, whole[len(context):]) for whole in wholes]


def run_choice(model: Model, task: Task, items: list[Item], cfg: HarnessConfig):
    pairs = [_choice_pairs(model.tokenizer, it) for it in items]
    logps = model.scorer.score([p for per in pairs for p in per])
    records, acc, norm, k = [], [], [], 0
    for it, per in zip(items, pairs):
        lp = np.array(logps[k:k + len(per)])
        k += len(per)
        gold = it.meta["gold"]
        lengths = np.array([len(c.encode()) for c in it.choices])
        acc.append(float(np.argmax(lp) == gold))
        norm.append(float(np.argmax(lp / lengths) == gold))
        records.append({"id": it.id, "prompt": it.prompt, "reference": it.reference,
                        "choices": it.choices, "logprobs": lp.tolist(), "score": acc[-1],
                        "score_norm": norm[-1]})
    metrics = {"acc": metric(acc), "acc_norm": metric(norm)}
    if cfg.choice_generate and task.lettered:
        asked = [Item(it.id, it.prompt + "\nAnswer with the letter of the correct option.",
                      it.reference) for it in items]
        answers = _answers(model, task, asked, cfg, max_new=cfg.max_new_tokens or 16)
        for rec, it, per in zip(records, items, answers):
            grades = [grade_letter(it.reference, a) for a in per]
            rec.update(answers=per, extracted=[g["extracted"] for g in grades],
                       score_gen=float(np.mean([g["score"] for g in grades])))
        metrics["acc_gen"] = metric([r["score_gen"] for r in records])
    return metrics, records


# ---------------------------------------------------------------- code tasks

def run_code(model: Model, task: Task, items: list[Item], cfg: HarnessConfig):
    continues = task.name == "humaneval"
    answers = _answers(model, task, items, cfg, chat=not continues)
    records, passed = [], []
    for it, per in zip(items, answers):
        programs = [program(it.prompt, a, continues) for a in per]
        grades = [grade_program(p, it.reference) for p in programs]
        passed.append(int(sum(g["score"] for g in grades)))
        records.append({"id": it.id, "prompt": it.prompt, "answers": per, "programs": programs,
                        "passed": passed[-1], "score": passed[-1] / len(per)})
    n = cfg.samples
    metrics = {f"pass@{k}": metric([pass_at_k(n, c, k) for c in passed])
               for k in (1, 5, 10) if k <= n}
    return metrics, records


RUNNERS = {"generate": run_generate, "choice": run_choice, "code": run_code}


def evaluate_tasks(model: Model, tasks: list[tuple[Task, list[Item]]],
                   cfg: HarnessConfig) -> dict:
    """{task name: (metrics, per-item records)} for tasks already loaded."""
    out = {}
    for task, items in tasks:
        log.info("task %s: %d items (%s)", task.name, len(items), task.kind)
        out[task.name] = RUNNERS[task.kind](model, task, items, cfg)
    return out


def load_tasks(cfg: HarnessConfig) -> list[tuple[Task, list[Item]]]:
    """Every task of `cfg` with its items: all files read and checked before any model loads."""
    if not cfg.tasks:
        raise ConfigError("tasks: give at least one task")
    unknown = [p for p in cfg.paths if p not in cfg.tasks]
    if unknown:
        raise ConfigError(f"paths: {', '.join(unknown)} is not among tasks {', '.join(cfg.tasks)}")
    return [load_task(name, cfg.data_dir, cfg.paths, cfg.limit) for name in cfg.tasks]


def run_eval(run_dir, cfg: HarnessConfig, out=None) -> dict:
    """Evaluate a run directory's latest checkpoint on `cfg.tasks`; the results document
    (written with the per-item records to `out` when given)."""
    from dataclasses import asdict

    from phijax.eval.report import write_results
    from phijax.weights import latest_step, load_checkpoint

    tasks = load_tasks(cfg)  # every file checked before the (slow) model load
    if out is not None and paths.is_url(out):
        paths.check_writable(out, "--out")
    model_cfg, params, tokenizer, mesh = load_checkpoint(run_dir)
    results = evaluate_tasks(Model(model_cfg, params, tokenizer, mesh, cfg.batch), tasks, cfg)
    header = {"checkpoint": str(run_dir), "step": latest_step(run_dir), "config": asdict(cfg)}
    doc = {**header, "tasks": {t: metrics for t, (metrics, _) in results.items()}}
    if out is not None:
        write_results(out, results, header)
    return doc
