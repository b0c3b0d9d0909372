"""Success oracles for sampled answers: math (final answer), code (tests in the sandbox) and
multiple choice (letter). One question format serves PTS, judge pairs and evaluation:

    {"id": "q1", "kind": "math" | "code" | "choice",
     "prompt": "text"  (rendered as a user turn of the chat template)
       or "prompt_ids": [int, ...]  (used as given),
     "answer": "3/4"  (math, choice)  |  "tests": "assert f(1) == 2"  (code)}

`check(question, completion_text)` says whether a completion succeeds: math answers go through
`tools.answers.normalize_answer` on both sides (integers, fractions, decimals, `\\boxed{}`),
choice answers compare letters, and code completions run (their last ```python block, else the
whole text) followed by the tests in `tools.sandbox`; exit status 0 is success.
"""
from __future__ import annotations

import zlib

from tools.answers import normalize_answer
from tools.jsonl import records

KINDS = ("math", "code", "choice")


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


def check(question: dict, completion: str, limits=None) -> bool:
    """Whether `completion` answers `question` correctly."""
    kind = question["kind"]
    if kind == "code":
        from tools.sandbox import Limits, run_python
        from tools.stages import extract_python
        code = extract_python(completion) or completion
        result = run_python(code + "\n\n" + question["tests"], limits=limits or Limits(
            cpu_seconds=5, wall_seconds=10, memory_mb=256))
        return result.ok
    got = normalize_answer(completion, kind)
    return got is not None and got == normalize_answer(str(question["answer"]), kind)


def load_questions(path) -> list[dict]:
    """The question records of a JSONL file; ValueError naming file:line for a bad or repeated one."""
    questions, seen = [], {}
    for lineno, q in records(path):
        error = question_error(q)
        if error is None and str(q["id"]) in seen:
            error = f"id {q['id']!r} already used at line {seen[str(q['id'])]}"
        if error:
            raise ValueError(f"{path}:{lineno}: {error}")
        seen[str(q["id"])] = lineno
        questions.append(q)
    if not questions:
        raise ValueError(f"{path}: no questions")
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
