"""Questions and their success oracles: math (final answer), code (tests in a sandbox) and
multiple choice (letter). One question format serves evaluation, PTS and judge pairs:

    {"id": "q1", "kind": "math" | "code" | "choice",
     "prompt": "text"  (rendered as a user turn of the chat template)
       or "prompt_ids": [int, ...]  (used as given),
     "answer": "3/4"  (math, choice)  |  "tests": "assert f(1) == 2"  (code)}

`check(question, completion_text)` says whether a completion succeeds: math answers go through
`normalize_answer` on both sides (integers, fractions, decimals, `\\boxed{}`), choice answers
compare letters, and code completions (their last ```python block, else the whole text) run
followed by the tests in a sandbox; exit status 0 is success.

Generated code never runs in this process: the sandbox is whatever an installed package
registers under the `phijax.sandbox` entry point (phijax's `tools` registers its namespace
sandbox), a function `(code, tests) -> bool`.
"""
from __future__ import annotations

import functools
import zlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from phijax.errors import ConfigError, DataError
from phijax.eval.answers import extract_python, normalize_answer
from phijax.files import read_jsonl

KINDS = ("math", "code", "choice")
CodeRunner = Callable[[str, str], bool]  # (code, tests) -> the tests pass


def question_error(q) -> str | None:
    """Why `q` is not a usable question record, or None."""
    if not isinstance(q, dict):
        return "not a JSON object"
    if not isinstance(q.get("id"), (str, int)):
        return "no id"
    if q.get("kind") not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {q.get('kind')!r}"
    ids = q.get("prompt_ids")
    if (q.get("prompt") is None) == (ids is None):
        return "give exactly one of prompt (text) and prompt_ids"
    if ids is not None and (not isinstance(ids, list) or not ids
                            or not all(isinstance(t, int) for t in ids)):
        return "prompt_ids must be a non-empty list of integers"
    if q.get("prompt") is not None and not isinstance(q["prompt"], str):
        return "prompt must be a string"
    field = "tests" if q["kind"] == "code" else "answer"
    if not isinstance(q.get(field), (str, int, float)) or isinstance(q.get(field), bool):
        return f"a {q['kind']} question needs a string {field}"
    if q["kind"] != "code" and normalize_answer(str(q["answer"]), q["kind"]) is None:
        return f"answer {q['answer']!r} does not normalise as a {q['kind']} answer"
    return None


@functools.cache
def installed_sandbox() -> CodeRunner:
    """The `phijax.sandbox` entry point's code runner."""
    found = entry_points(group="phijax.sandbox")
    if not found:
        raise ConfigError("code questions need a sandbox, and no package registers one under "
                          "the phijax.sandbox entry point (install phijax with `pip install -e .`)")
    return sorted(found, key=lambda e: e.name)[0].load()


def check(question: dict, completion: str, run_code: CodeRunner | None = None) -> bool:
    """Whether `completion` answers `question` correctly (code runs in `run_code`, by default
    the installed sandbox)."""
    kind = question["kind"]
    if kind == "code":
        code = extract_python(completion) or completion
        return (run_code or installed_sandbox())(code, question["tests"])
    got = normalize_answer(completion, kind)
    return got is not None and got == normalize_answer(str(question["answer"]), kind)


def load_questions(path: str | Path) -> list[dict]:
    """The question records of a JSONL file; ConfigError naming file:line for a bad or repeated
    one."""
    questions, seen = [], {}
    for lineno, q in read_jsonl(path):
        error = question_error(q)
        if error is None and str(q["id"]) in seen:
            error = f"id {q['id']!r} already used at line {seen[str(q['id'])]}"
        if error:
            raise DataError(f"{path}:{lineno}: {error}")
        seen[str(q["id"])] = lineno
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def question_seed(seed: int, qid) -> int:
    """A question's (or prompt's) sampling seed: fixed by (seed, id), so its samples do not
    depend on batching, chunking or file order."""
    return zlib.crc32(f"{seed}/{qid}".encode())


def prompt_ids(question: dict, tokenizer) -> list[int]:
    """What the model continues: `prompt_ids` as given, else the prompt as a user turn."""
    if question.get("prompt_ids") is not None:
        return list(question["prompt_ids"])
    return tokenizer.encode_prompt([{"role": "user", "content": question["prompt"]}])


def answer_text(tokens: list[int], tokenizer) -> str:
    """A sampled answer's text: its tokens decoded, without the stop token that ended it."""
    if tokens and tokens[-1] in tokenizer.stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)
