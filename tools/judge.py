"""Judge-guided DPO pairs: two sampled answers per prompt, compared by a teacher.

For each prompt the model being trained samples two answers; the teacher compares them in both
orders (answer 1 as A and answer 2 as B, then swapped) with a judge template (default
`tools/templates/judge.txt`), at temperature 0. When both verdicts prefer the same answer it is
`chosen` and the other `rejected`; a verdict that flips with the order (position bias), an
unparseable verdict, a failed teacher call and two identical answers give no pair and are
counted by reason.

Pairs are sequence pairs of token ids, read directly by `phijax dpo`:

    {"id": "<prompt id>/judge", "prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...],
     "kind": "judge", "prompt_id": <prompt id>, "verdicts": ["A", "B"], "judge_model": "<name>"}

`chosen_ids` / `rejected_ids` are exactly the sampled ids (the stop token included when the
sample stopped), never re-tokenized text; `verdicts` are the raw verdicts of order 1 and order 2
(["A", "B"] and ["B", "A"] are the consistent ones).

Prompt records are the evaluation question format with kind and answer optional, or chats:
`{"id", "prompt": text}` (a user turn of the chat template), `{"id", "prompt_ids": [...]}` (used
as given) or `{"id", "messages": [...]}` (a chat ending in a user turn, without the reply).

    phijax-tools judge RUN_DIR PROMPTS.jsonl --out PAIRS.jsonl teacher.base_url=URL \\
        teacher.model=NAME [temperature=1.0 max_new_tokens=256 seed=0 cache=FILE ...]
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from phijax.config import positive, ranged
from phijax.errors import ConfigError, DataError, EndpointError
from phijax.eval.questions import question_seed
from phijax.files import read_jsonl, write_jsonl
from phijax.hashing import sha256_hex
from tools.teacher import TeacherConfig, TeacherError, TeacherRefused

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "judge.txt"
SKIP_REASONS = ("identical", "unparseable", "inconsistent", "teacher_error")

__all__ = ["TEMPLATE_PATH", "SKIP_REASONS", "JudgeConfig", "Prompt", "Sampled", "record_error",
           "load_prompts", "load_template", "parse_verdict", "render_judge", "sample_answers",
           "judge_pairs", "make_pairs", "run_judge"]


@dataclass
class JudgeConfig:
    """Everything `phijax-tools judge` needs; loaded by `phijax.config.load`."""
    teacher: TeacherConfig                # the judge: an OpenAI-compatible endpoint and model
    cache: Optional[str] = None           # SQLite cache of teacher replies
    template: Optional[str] = None        # judge template file; default tools/templates/judge.txt
    max_new_tokens: int = positive(256)   # per sampled answer
    temperature: float = 1.0              # sampling the model (> 0; the judge always runs at 0)
    top_p: float = ranged(1.0, gt=0, le=1)
    seed: int = 0                         # with the prompt id, fixes each prompt's two samples
    chunk_size: int = positive(64)        # prompts per `Sampler.generate` call
    judge_max_tokens: Optional[int] = positive(None)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature} (greedy answers "
                              f"are identical, so no pair could form)")


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
    for line, r in read_jsonl(path):
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
            raise DataError(f"{path}:{line}: {why}")
        seen[r["id"]] = line
        prompts.append(Prompt(r["id"], ids, question))
    if not prompts:
        raise DataError(f"{path}: no prompt records")
    return prompts


# ---------------------------------------------------------------- the judge

def load_template(path: str | Path | None = None) -> str:
    """The judge template; it must use {question}, {answer_a} and {answer_b}."""
    path = Path(path) if path is not None else TEMPLATE_PATH
    if not path.is_file():
        raise ConfigError(f"judge template {path} does not exist")
    text = path.read_text()
    probe = {"question": "\x00q", "answer_a": "\x00a", "answer_b": "\x00b"}
    try:
        out = render_judge(text, probe["question"], probe["answer_a"], probe["answer_b"])
    except Exception as e:
        raise ConfigError(f"judge template {path}: {e}") from None
    if not all(v in out for v in probe.values()):
        raise ConfigError(f"judge template {path} must use {{question}}, {{answer_a}} and "
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


def _new_stats() -> dict:
    return dict(prompts=0, pairs=0, skipped={r: 0 for r in SKIP_REASONS}, teacher_calls=0,
                verdicts={"A": 0, "B": 0, "unparseable": 0}, chosen_first=0, last_error=None)


@dataclass
class _Judge:
    """One judging run: the teacher, the template text and the stats it fills."""
    teacher: object
    tokenizer: object
    template: str
    max_tokens: Optional[int]
    judge_model: str
    stats: dict = field(default_factory=_new_stats)
    version: str = field(init=False)  # of the template: part of the teacher's cache key

    def __post_init__(self):
        self.version = sha256_hex(self.template)[:16]

    async def verdict(self, question: str, answer_a: str, answer_b: str):
        """(verdict or None, error message or None) of one judge call."""
        content = render_judge(self.template, question, answer_a, answer_b)
        try:
            reply = await self.teacher.chat([{"role": "user", "content": content}], n=1,
                                            temperature=0.0, max_tokens=self.max_tokens,
                                            template_version=self.version)
        except TeacherRefused:
            raise  # a refused endpoint or model: no other pair can succeed either
        except TeacherError as e:
            return None, str(e)
        return parse_verdict(reply[0]), None

    async def pair(self, s: Sampled) -> Optional[dict]:
        """The pair of one prompt's two answers, or None (the reason counted in the stats)."""
        stats = self.stats
        stats["prompts"] += 1
        x, y = (_answer_text(a, self.tokenizer) for a in s.answers)
        if x == y:
            stats["skipped"]["identical"] += 1
            return None
        stats["teacher_calls"] += 2
        (v1, e1), (v2, e2) = await asyncio.gather(self.verdict(s.prompt.question, x, y),
                                                  self.verdict(s.prompt.question, y, x))
        for v, e in ((v1, e1), (v2, e2)):
            if e is None:
                stats["verdicts"][v or "unparseable"] += 1
        first = v1 == "A"          # order 1 shows answer 1 as A
        why = ("teacher_error" if e1 or e2 else "unparseable" if v1 is None or v2 is None
               else "inconsistent" if first != (v2 == "B") else None)  # order 2: answer 1 is B
        if why is not None:
            stats["skipped"][why] += 1
            stats["last_error"] = e1 or e2 or stats["last_error"]
            return None
        chosen, rejected = s.answers if first else s.answers[::-1]
        stats["pairs"] += 1
        stats["chosen_first"] += first
        pid = s.prompt.id
        return {"id": f"{pid}/judge", "prompt_ids": list(s.prompt.prompt_ids),
                "chosen_ids": list(chosen), "rejected_ids": list(rejected), "kind": "judge",
                "prompt_id": pid, "verdicts": [v1, v2], "judge_model": self.judge_model}


async def judge_pairs(samples: list[Sampled], tokenizer, teacher, cfg: JudgeConfig | None = None,
                      judge_model: str | None = None,
                      template: str | None = None) -> tuple[list[dict], dict]:
    """Judge already-sampled answer pairs in both orders: (pairs in input order, stats).

    `template` is the judge template's text (default: read from `cfg.template`).
    stats: prompts, pairs, skipped (by reason), teacher_calls (chat calls made, cache hits
    included), verdicts (counts of raw A / B / unparseable: a skew to A shows position bias),
    chosen_first (pairs won by the first sample), last_error (of a failed teacher call)."""
    cfg = cfg or JudgeConfig(teacher=teacher.cfg)
    for s in samples:
        if len(s.answers) != 2:
            raise ValueError(f"prompt {s.prompt.id!r}: expected 2 answers, got {len(s.answers)}")
    judge = _Judge(teacher, tokenizer, template if template is not None else
                   load_template(cfg.template), cfg.judge_max_tokens,
                   judge_model or teacher.cfg.model)
    out = await asyncio.gather(*(judge.pair(s) for s in samples))
    return [p for p in out if p is not None], judge.stats


# ---------------------------------------------------------------- sampling, end to end

def sample_answers(sampler, tokenizer, prompts: list[Prompt], cfg: JudgeConfig) -> list[Sampled]:
    """Two answers per prompt, from one `generate` call."""
    from phijax.sampling import Request
    out = sampler.generate([Request(p.prompt_ids, n=2, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p,
                                    stop_ids=tokenizer.stop_ids, seed=question_seed(cfg.seed, p.id))
                            for p in prompts])
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
                     cfg: JudgeConfig | None = None,
                     template: str | None = None) -> tuple[list[dict], dict]:
    """Sample two answers per prompt (in chunks of similar length, in a worker thread) and
    judge each chunk while the next one samples: (pairs in prompt order, stats). `template`:
    the judge template's text (default: read once from `cfg.template`)."""
    cfg = cfg or JudgeConfig(teacher=teacher.cfg)
    template = template if template is not None else load_template(cfg.template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].prompt_ids))
    jobs = []
    for start in range(0, len(order), cfg.chunk_size):
        chunk = [prompts[i] for i in order[start:start + cfg.chunk_size]]
        sampled = await asyncio.to_thread(sample_answers, sampler, tokenizer, chunk, cfg)
        jobs.append(asyncio.create_task(judge_pairs(sampled, tokenizer, teacher, cfg,
                                                    template=template)))
    stats, pairs = _new_stats(), []
    for pairs_part, stats_part in await asyncio.gather(*jobs):
        pairs += pairs_part
        _merge(stats, stats_part)
    rank = {p.id: i for i, p in enumerate(prompts)}
    pairs.sort(key=lambda p: rank[p["prompt_id"]])
    return pairs, stats


async def run_judge(model_dir: str | Path, prompts_path: str | Path, out_path: str | Path,
                    cfg: JudgeConfig) -> dict:
    """Judge-guided pairs for the prompts of `prompts_path`, sampled from the run directory
    `model_dir`, written to `out_path` (atomically): the stats, with the output path, the judge
    model and the teacher's usage. The template, the model's config and every prompt record are
    checked before the weights load; ValueError when every judged prompt failed at the
    teacher (nothing is written then)."""
    from phijax.data.tokenizer import load_tokenizer
    from phijax.sampling import load_sampler
    from phijax.weights import load_config
    from tools.cache import Cache
    from tools.teacher import Teacher

    template = load_template(cfg.template)
    model = load_config(model_dir).model
    prompts = load_prompts(prompts_path, load_tokenizer(model_dir),
                           vocab_size=model.vocab_size, max_len=model.max_position_embeddings,
                           max_new_tokens=cfg.max_new_tokens)
    teacher = Teacher(cfg.teacher, Cache(cfg.cache) if cfg.cache else None)
    async with teacher:
        sampler, tokenizer = load_sampler(model_dir)
        pairs, stats = await make_pairs(sampler, tokenizer, prompts, teacher, cfg, template)
    if stats["skipped"]["teacher_error"] == stats["prompts"] - stats["skipped"]["identical"] > 0:
        raise EndpointError(f"every judged prompt failed at the teacher: {stats['last_error']}")
    write_jsonl(out_path, pairs)
    usage = teacher.usage
    return dict(stats, out=str(out_path), judge_model=cfg.teacher.model,
                teacher_requests=usage["requests"], teacher_cache_hits=usage["cache_hits"],
                prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])
