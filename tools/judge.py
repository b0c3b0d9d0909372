"""Judge-guided DPO pairs (DESIGN.md §1, "DPO round 2 judge-guided").

For each prompt the model being trained samples two answers; the teacher compares them in both
orders (answer 1 as A and answer 2 as B, then swapped) with `tools/templates/judge.txt`, at
temperature 0. When both verdicts prefer the same answer it is `chosen` and the other `rejected`;
a verdict that flips with the order (position bias), an unparseable verdict, a failed teacher call
and two identical answers give no pair and are counted by reason.

Pairs are sequence pairs of token ids, read directly by `phijax dpo`:

    {"id": "<prompt id>/judge", "prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...],
     "kind": "judge", "prompt_id": <prompt id>, "verdicts": ["A", "B"], "judge_model": "<name>"}

`chosen_ids` / `rejected_ids` are exactly the sampled ids (the stop token included when the
sample stopped), never re-tokenized text; `verdicts` are the raw verdicts of order 1 and order 2
(["A", "B"] and ["B", "A"] are the consistent ones).

Prompt records are the `tools.oracles` question format with kind and answer optional, or chats:
`{"id", "prompt": text}` (a user turn of the chat template), `{"id", "prompt_ids": [...]}` (used
as given) or `{"id", "messages": [...]}` (a chat ending in a user turn, without the reply).

    python -m tools.judge --model RUN_DIR --prompts P.jsonl --out PAIRS.jsonl \\
        --teacher-url URL --teacher-model NAME [--api-key-env NAME] [--temperature 1.0] \\
        [--max-new-tokens 256] [--seed 0] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tools import jsonl
from tools.jsonl import write_jsonl
from phijax.eval.questions import question_seed

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "judge.txt"
SKIP_REASONS = ("identical", "unparseable", "inconsistent", "teacher_error")

__all__ = ["TEMPLATE_PATH", "SKIP_REASONS", "JudgeConfig", "Prompt", "Sampled", "record_error",
           "load_prompts", "load_template", "parse_verdict", "render_judge", "sample_answers",
           "judge_pairs", "make_pairs", "main"]


@dataclass
class JudgeConfig:
    max_new_tokens: int = 256       # per sampled answer
    temperature: float = 1.0        # sampling the model (the judge always runs at 0)
    top_p: float = 1.0
    seed: int = 0                   # with the prompt id, fixes each prompt's two samples
    chunk_size: int = 64            # prompts per `Sampler.generate` call
    judge_max_tokens: Optional[int] = None
    template: str = field(default_factory=lambda: TEMPLATE_PATH.read_text())


@dataclass
class Prompt:
    id: str | int
    prompt_ids: list[int]  # what the model continues
    question: str          # what the judge reads


@dataclass
class Sampled:
    prompt: Prompt
    answers: list[list[int]]  # the two samples' token ids, stop token included when it stopped


# ---------------------------------------------------------------- prompts

def record_error(r: dict) -> Optional[str]:
    """Why `r` is not a usable prompt record, or None (kind, answer and other fields are free)."""
    if not isinstance(r.get("id"), (str, int)) or isinstance(r.get("id"), bool):
        return "no id (a string or an integer)"
    given = [k for k in ("prompt", "prompt_ids", "messages") if r.get(k) is not None]
    if len(given) != 1:
        return "give exactly one of prompt (text), prompt_ids and messages"
    if given == ["prompt"] and not (isinstance(r["prompt"], str) and r["prompt"].strip()):
        return "prompt must be a non-empty string"
    ids = r.get("prompt_ids")
    if given == ["prompt_ids"] and (not isinstance(ids, list) or not ids or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        return "prompt_ids must be a non-empty list of integers"
    msgs = r.get("messages")
    if given == ["messages"]:
        if not isinstance(msgs, list) or not msgs:
            return "messages must be a non-empty list"
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return "a message has no string content"
            if m.get("role") not in ("system", "user", "assistant"):
                return "a message role is not one of system, user, assistant"
        if msgs[-1]["role"] != "user":
            return "messages must end with a user turn (the reply is what gets sampled)"
    return None


def _transcript(messages: list[dict]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def load_prompts(path: str | Path, tokenizer, *, vocab_size: int, max_len: int,
                 max_new_tokens: int) -> list[Prompt]:
    """Every record of `path` validated and tokenized; ValueError naming `file:line` for the
    first bad one (structure, duplicate id, ids outside the vocabulary, too long a prompt)."""
    prompts, seen = [], {}
    for line, r in jsonl.records(path):
        why = record_error(r)
        if why is None and r["id"] in seen:
            why = f"duplicate id {r['id']!r} (first on line {seen[r['id']]})"
        if why is None:
            if r.get("prompt_ids") is not None:
                ids, limit = list(r["prompt_ids"]), min(vocab_size, tokenizer.vocab_size)
                if min(ids) < 0 or max(ids) >= limit:
                    why = f"prompt_ids has token ids outside [0, {limit})"
                else:
                    question = tokenizer.decode(ids)
            else:
                msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
                ids, question = tokenizer.encode_prompt(msgs), _transcript(msgs)
            if why is None and len(ids) + max_new_tokens > max_len:
                why = (f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the "
                       f"context length {max_len}")
        if why is not None:
            raise ValueError(f"{path}:{line}: {why}")
        seen[r["id"]] = line
        prompts.append(Prompt(r["id"], ids, question))
    if not prompts:
        raise ValueError(f"{path}: no prompt records")
    return prompts


# ---------------------------------------------------------------- the judge

def load_template(path: str | Path | None = None) -> str:
    """The judge template; it must use {question}, {answer_a} and {answer_b}."""
    path = Path(path) if path is not None else TEMPLATE_PATH
    if not path.is_file():
        raise ValueError(f"judge template {path} does not exist")
    text = path.read_text()
    probe = {"question": "\x00q", "answer_a": "\x00a", "answer_b": "\x00b"}
    try:
        out = render_judge(text, probe["question"], probe["answer_a"], probe["answer_b"])
    except Exception as e:
        raise ValueError(f"judge template {path}: {e}") from None
    if not all(v in out for v in probe.values()):
        raise ValueError(f"judge template {path} must use {{question}}, {{answer_a}} and "
                         f"{{answer_b}}")
    return text


def render_judge(template: str, question: str, answer_a: str, answer_b: str) -> str:
    from tools.pipeline import render_template
    return render_template(template, {"id": "judge", "question": question,
                                      "answer_a": answer_a, "answer_b": answer_b})


_VERDICT_LINE = re.compile(r"^[\s*_#>`]*verdict[\s*_`]*:(.*)$", re.IGNORECASE)
_VERDICT = re.compile(r"^[\s*_`\[(\"']*([AB])[\s*_`\])\"'.]*$", re.IGNORECASE)


def parse_verdict(text: str) -> Optional[str]:
    """"A" / "B" from the last `Verdict: X` line of a reply (case and markdown emphasis
    tolerated); None when there is no such line or its value is anything else."""
    lines = [m[1] for m in map(_VERDICT_LINE.match, (text or "").splitlines()) if m]
    if not lines:
        return None
    m = _VERDICT.match(lines[-1])
    return m[1].upper() if m else None


def _answer_text(tokens: list[int], tokenizer) -> str:
    """The text the judge reads: no closing stop token, no ids the tokenizer lacks (a model's
    vocabulary may be padded past the tokenizer's)."""
    tokens = tokens[:-1] if tokens and tokens[-1] in tokenizer.stop_ids else tokens
    return tokenizer.decode([t for t in tokens if 0 <= t < tokenizer.vocab_size])


async def _verdict(teacher, content: str, cfg: JudgeConfig, version: str):
    """(verdict or None, error message or None) of one judge call."""
    from tools.teacher import TeacherError
    try:
        reply = await teacher.chat([{"role": "user", "content": content}], n=1, temperature=0.0,
                                   max_tokens=cfg.judge_max_tokens, template_version=version)
    except TeacherError as e:
        return None, str(e)
    return parse_verdict(reply[0]), None


def _new_stats() -> dict:
    return dict(prompts=0, pairs=0, skipped={r: 0 for r in SKIP_REASONS}, teacher_calls=0,
                verdicts={"A": 0, "B": 0, "unparseable": 0}, chosen_first=0, last_error=None)


async def _judge_one(s: Sampled, tokenizer, teacher, cfg: JudgeConfig, version: str,
                     judge_model: str, stats: dict) -> Optional[dict]:
    stats["prompts"] += 1
    x, y = (_answer_text(a, tokenizer) for a in s.answers)
    if x == y:
        stats["skipped"]["identical"] += 1
        return None
    q = s.prompt.question
    stats["teacher_calls"] += 2
    (v1, e1), (v2, e2) = await asyncio.gather(
        _verdict(teacher, render_judge(cfg.template, q, x, y), cfg, version),
        _verdict(teacher, render_judge(cfg.template, q, y, x), cfg, version))
    for v, e in ((v1, e1), (v2, e2)):
        if e is None:
            stats["verdicts"][v or "unparseable"] += 1
    if e1 or e2:
        stats["skipped"]["teacher_error"] += 1
        stats["last_error"] = e1 or e2
        return None
    if v1 is None or v2 is None:
        stats["skipped"]["unparseable"] += 1
        return None
    first = v1 == "A"          # order 1 shows answer 1 as A
    if first != (v2 == "B"):   # order 2 shows answer 1 as B
        stats["skipped"]["inconsistent"] += 1
        return None
    chosen, rejected = s.answers if first else s.answers[::-1]
    stats["pairs"] += 1
    stats["chosen_first"] += first
    pid = s.prompt.id
    return {"id": f"{pid}/judge", "prompt_ids": list(s.prompt.prompt_ids),
            "chosen_ids": list(chosen), "rejected_ids": list(rejected), "kind": "judge",
            "prompt_id": pid, "verdicts": [v1, v2], "judge_model": judge_model}


async def judge_pairs(samples: list[Sampled], tokenizer, teacher, cfg: JudgeConfig | None = None,
                      judge_model: str | None = None) -> tuple[list[dict], dict]:
    """Judge already-sampled answer pairs in both orders: (pairs in input order, stats).

    stats: prompts, pairs, skipped (by reason), teacher_calls (chat calls made, cache hits
    included), verdicts (counts of raw A / B / unparseable: a skew to A shows position bias),
    chosen_first (pairs won by the first sample), last_error (of a failed teacher call)."""
    cfg = cfg or JudgeConfig()
    for s in samples:
        if len(s.answers) != 2:
            raise ValueError(f"prompt {s.prompt.id!r}: expected 2 answers, got {len(s.answers)}")
    version = hashlib.sha256(cfg.template.encode()).hexdigest()[:16]
    judge_model = judge_model or teacher.cfg.model
    stats = _new_stats()
    out = await asyncio.gather(*(_judge_one(s, tokenizer, teacher, cfg, version, judge_model,
                                            stats) for s in samples))
    return [p for p in out if p is not None], stats


# ---------------------------------------------------------------- sampling, end to end

def sample_answers(sampler, tokenizer, prompts: list[Prompt], cfg: JudgeConfig) -> list[Sampled]:
    """Two answers per prompt, from one `generate` call."""
    from phijax.sampling import Request
    out = sampler.generate([Request(p.prompt_ids, n=2, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p,
                                    stop_ids=tokenizer.stop_ids, seed=question_seed(cfg.seed, p.id)) for p in prompts])
    return [Sampled(p, [s.tokens for s in samples]) for p, samples in zip(prompts, out)]


def _merge(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                total[k][kk] += vv
        elif k == "last_error":
            total[k] = v or total[k]
        else:
            total[k] += v


async def make_pairs(sampler, tokenizer, prompts: list[Prompt], teacher,
                     cfg: JudgeConfig | None = None) -> tuple[list[dict], dict]:
    """Sample two answers per prompt (in chunks of similar length, in a worker thread) and
    judge each chunk while the next one samples: (pairs in prompt order, stats)."""
    cfg = cfg or JudgeConfig()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].prompt_ids))
    jobs = []
    for start in range(0, len(order), cfg.chunk_size):
        chunk = [prompts[i] for i in order[start:start + cfg.chunk_size]]
        sampled = await asyncio.to_thread(sample_answers, sampler, tokenizer, chunk, cfg)
        jobs.append(asyncio.create_task(judge_pairs(sampled, tokenizer, teacher, cfg)))
    stats, pairs = _new_stats(), []
    for pairs_part, stats_part in await asyncio.gather(*jobs):
        pairs += pairs_part
        _merge(stats, stats_part)
    rank = {p.id: i for i, p in enumerate(prompts)}
    pairs.sort(key=lambda p: rank[p["prompt_id"]])
    return pairs, stats


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.judge",
                                 description="judge-guided DPO pairs (DESIGN.md §1)")
    ap.add_argument("--model", required=True, help="phijax run directory (the model trained)")
    ap.add_argument("--prompts", required=True, help="JSONL prompt records")
    ap.add_argument("--out", required=True, help="JSONL of DPO sequence pairs (token ids)")
    ap.add_argument("--teacher-url", required=True, help="OpenAI-compatible endpoint (.../v1)")
    ap.add_argument("--teacher-model", required=True)
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="NAME of the environment variable holding the API key")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling the model (> 0)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=16, help="teacher requests in flight")
    ap.add_argument("--chunk-size", type=int, default=64, help="prompts per sampling call")
    ap.add_argument("--judge-max-tokens", type=int, default=None)
    ap.add_argument("--template", default=None, help=f"judge template (default {TEMPLATE_PATH})")
    ap.add_argument("--cache", default=None, help="SQLite cache of teacher replies")
    return ap


def _check_args(a) -> None:
    if not a.temperature > 0:
        raise ValueError(f"--temperature {a.temperature}: must be > 0 (greedy answers are "
                         f"identical, so no pair could form)")
    if not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p {a.top_p}: must be in (0, 1]")
    for name in ("max_new_tokens", "concurrency", "chunk_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if a.judge_max_tokens is not None and a.judge_max_tokens < 1:
        raise ValueError(f"--judge-max-tokens {a.judge_max_tokens}: must be >= 1")


async def _run(a, cfg: JudgeConfig) -> dict:
    from phijax.data.tokenizer import Tokenizer
    from phijax.sampling import load_sampler
    from phijax.weights import load_config
    from tools.cache import Cache
    from tools.teacher import Teacher, TeacherConfig

    model = load_config(a.model).model  # everything is checked before the weights load
    tokenizer = Tokenizer(Path(a.model) / "tokenizer.model")
    prompts = load_prompts(a.prompts, tokenizer, vocab_size=model.vocab_size,
                           max_len=model.max_position_embeddings, max_new_tokens=cfg.max_new_tokens)
    teacher = Teacher(TeacherConfig(base_url=a.teacher_url, model=a.teacher_model,
                                    api_key_env=a.api_key_env, concurrency=a.concurrency),
                      Cache(a.cache) if a.cache else None)
    async with teacher:
        sampler, tokenizer = load_sampler(a.model)
        pairs, stats = await make_pairs(sampler, tokenizer, prompts, teacher, cfg)
    if stats["skipped"]["teacher_error"] == stats["prompts"] - stats["skipped"]["identical"] > 0:
        raise ValueError(f"every judged prompt failed at the teacher: {stats['last_error']}")
    write_jsonl(a.out, pairs)
    usage = teacher.usage
    return dict(stats, out=str(a.out), judge_model=a.teacher_model,
                teacher_requests=usage["requests"], teacher_cache_hits=usage["cache_hits"],
                prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from phijax.config import ConfigError
    from tools.teacher import TeacherError
    try:
        _check_args(a)
        cfg = JudgeConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_p=a.top_p, seed=a.seed, chunk_size=a.chunk_size,
                          judge_max_tokens=a.judge_max_tokens, template=load_template(a.template))
        stats = asyncio.run(_run(a, cfg))
    except (ValueError, ConfigError, TeacherError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items())
    print(f"judged {stats['prompts']} prompts -> {stats['pairs']} pairs (skipped: {skipped}; "
          f"{stats['teacher_calls']} teacher calls) -> {stats['out']}", file=sys.stderr)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
