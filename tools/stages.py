"""Phi-4 synthetic-data stages for tools.pipeline (DESIGN.md §1, "Synthetic data").

Registered in `tools.pipeline.STAGES` on import (tools.pipeline imports this module):

* `difficulty`: sample k answers to the record's question (one teacher call, n=k), normalise
  them (`tools.answers`) and drop questions where all agree (too easy) or none agree (too
  hard); kept records get `reference_answer` (the plurality answer, normalised),
  `reference_solution` (the first sampled solution with that answer) and `agreement`.
* `self_revise`: critique -> revise rounds on a field (default `answer`) until the critique
  ends with "VERDICT: ACCEPT" or `max_rounds` revisions were made; the final answer replaces
  the field, every critique and revision is kept in the stage's provenance (`revisions`).
* `verify_code`: run the record's `code` + `tests` together in the sandbox
  (`tools.sandbox.run_python`); pass -> `verified: true`; fail -> up to `repair_rounds`
  teacher repairs (the error output in, a ```python block out), re-run; still failing -> drop.

Prompt templates are data files in `tools/templates/` (`difficulty.txt`, `critique.txt`,
`revise.txt`, `repair.txt`; each stage takes `*_file` params to use other files). They are
rendered with `tools.pipeline.render_template` over the record plus the stage's own names
(`{question}`, `{answer}`, `{critique}`, `{code}`, `{tests}`, `{error}`, `{reason}`); their
sha256 goes into provenance (`template_sha256`, and per file in `templates`), into the stage
fingerprint and into the teacher cache key.

Every stage counts what it did in `stage.stats` (a Counter: kept, dropped_all_agree,
dropped_none_agree, accepted, max_rounds, verified, repaired, dropped_failing, ...) for the
records processed by this process; the records themselves are the durable output.
"""
from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from tools.pipeline import (Stage, StageContext, StageError, _canonical, _check,
                            _child, _lookup, _sha256, register_stage, render_template)

TEMPLATES = Path(__file__).resolve().parent / "templates"

__all__ = ["TEMPLATES", "DifficultyStage", "SelfReviseStage", "VerifyCodeStage", "parse_verdict",
           "extract_python"]


# ---------------------------------------------------------------- helpers

def _load_template(params: dict, file_key: str, default: str, key: str) -> str:
    path = params.get(file_key)
    if path is None:
        return (TEMPLATES / default).read_text()
    _check(isinstance(path, str) and path, f"{key}.{file_key}", "expected a path")
    p = Path(path)
    _check(p.is_file(), f"{key}.{file_key}", f"file {p} does not exist")
    return p.read_text()


def _int(params: dict, name: str, default: int, key: str, minimum: int) -> int:
    v = params.get(name, default)
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, f"{key}.{name}",
           f"expected an integer >= {minimum}, got {v!r}")
    return v


def _num(params: dict, name: str, default: Optional[float], key: str, *, positive: bool = False,
         allow_none: bool = False) -> Optional[float]:
    v = params.get(name, default)
    if v is None and allow_none:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if positive else v >= 0)
    _check(ok, f"{key}.{name}", f"expected a number {'>' if positive else '>='} 0, got {v!r}")
    return float(v)


def _field(params: dict, name: str, default: str, key: str) -> str:
    v = params.get(name, default)
    _check(isinstance(v, str) and v and v not in ("id", "provenance"), f"{key}.{name}",
           "expected a field name (not id/provenance)")
    return v


def _known(params: dict, known: set, key: str, kind: str) -> None:
    for k in params:
        _check(k in known, f"{key}.{k}",
               f"unknown parameter for a {kind} stage (known: {', '.join(sorted(known))})")


def _get(record: dict, field: str) -> Any:
    try:
        return _lookup(record, field)
    except KeyError:
        raise StageError(f"field {field!r} is missing from record {record.get('id')!r}") from None


class _TemplatedStage(Stage):
    """Common parts: the teacher sampling params and the templates with their hashes."""
    SAMPLING = {"temperature", "max_tokens", "seed", "params"}

    def _sampling(self, params: dict, key: str, temperature: float) -> None:
        self.temperature = _num(params, "temperature", temperature, key)
        self.max_tokens = params.get("max_tokens")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int)
                                           and not isinstance(self.max_tokens, bool)
                                           and self.max_tokens > 0),
               f"{key}.max_tokens", f"expected a positive integer, got {self.max_tokens!r}")
        self.seed = params.get("seed")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
               f"{key}.seed", f"expected an integer, got {self.seed!r}")
        self.extra = params.get("params") or {}
        _check(isinstance(self.extra, dict), f"{key}.params", "expected a mapping")

    def _templates(self, params: dict, key: str, files: dict[str, tuple[str, str]]) -> None:
        """files: name -> (param key, default file name in tools/templates)."""
        self.templates = {name: _load_template(params, fk, default, key)
                          for name, (fk, default) in files.items()}
        self.template_shas = {name: _sha256(t) for name, t in self.templates.items()}
        self.template_sha256 = _sha256(_canonical(self.templates))
        self.stats: Counter = Counter()

    def _base_fingerprint(self) -> dict:
        return {"name": self.name, "type": self.type, "template_sha256": self.template_sha256,
                "temperature": self.temperature, "max_tokens": self.max_tokens,
                "seed": self.seed, "params": self.extra}

    async def _ask(self, ctx: StageContext, template: str, view: dict, n: int = 1) -> list[str]:
        prompt = render_template(self.templates[template], view)
        return await ctx.teacher.chat([{"role": "user", "content": prompt}], n=n,
                                      temperature=self.temperature, max_tokens=self.max_tokens,
                                      seed=self.seed,
                                      template_version=self.template_shas[template][:16],
                                      **self.extra)

    def _out(self, record: dict, ctx: StageContext, **prov) -> dict:
        return _child(record, self, 0, template_sha256=self.template_sha256,
                      templates=dict(self.template_shas), model=ctx.model, **prov)


# ---------------------------------------------------------------- difficulty

@register_stage("difficulty")
class DifficultyStage(_TemplatedStage):
    """Phi-4's question-difficulty filter.

    params: field ("question"), k (8), kind ("auto" | "math" | "choice"), min_agree (2),
    max_agreement (1.0), percent_as_fraction (false), template_file (default
    tools/templates/difficulty.txt, `{question}` is the field), temperature (1.0), max_tokens,
    seed, params. Output fields: `reference_answer`, `reference_solution`, `agreement`.
    """
    KEYS = {"field", "k", "kind", "min_agree", "max_agreement", "percent_as_fraction",
            "template_file"} | _TemplatedStage.SAMPLING

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "difficulty")
        from tools.answers import KINDS
        self.field = _field(params, "field", "question", key)
        self.k = _int(params, "k", 8, key, 2)
        self.kind = params.get("kind", "auto")
        _check(self.kind in KINDS, f"{key}.kind", f"expected one of {', '.join(KINDS)}")
        self.min_agree = _int(params, "min_agree", 2, key, 1)
        self.max_agreement = _num(params, "max_agreement", 1.0, key, positive=True)
        _check(self.max_agreement <= 1.0, f"{key}.max_agreement", "expected a number in (0, 1]")
        self.percent_as_fraction = params.get("percent_as_fraction", False)
        _check(isinstance(self.percent_as_fraction, bool), f"{key}.percent_as_fraction",
               "expected true/false")
        self._sampling(params, key, 1.0)
        self._templates(params, key, {"difficulty": ("template_file", "difficulty.txt")})

    @property
    def fingerprint(self) -> dict:
        return {**self._base_fingerprint(), "field": self.field, "k": self.k, "kind": self.kind,
                "min_agree": self.min_agree, "max_agreement": self.max_agreement,
                "percent_as_fraction": self.percent_as_fraction}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        from tools.answers import difficulty_filter
        question = _get(record, self.field)
        view = dict(record, question=question)
        answers = await self._ask(ctx, "difficulty", view, n=self.k)
        d = difficulty_filter(answers, self.kind, min_agree=self.min_agree,
                              max_agreement=self.max_agreement, min_k=2,
                              percent_as_fraction=self.percent_as_fraction)
        if not d.keep:
            self.stats[f"dropped_{d.reason}"] += 1
            return []
        self.stats["kept"] += 1
        out = self._out(record, ctx, k=d.k, counts=d.counts, tie=d.tie,
                        reference_index=d.reference_index)
        out.update(reference_answer=d.reference, reference_solution=answers[d.reference_index],
                   agreement=d.agreement)
        return [out]


# ---------------------------------------------------------------- self-revision

_VERDICT = re.compile(r"VERDICT\s*:\s*[*_`]*\s*(ACCEPT|REVISE)\b[\s*_`.!]*\Z", re.I)


def parse_verdict(text: str) -> Optional[str]:
    """"ACCEPT" / "REVISE" from a critique ending with "VERDICT: ..." (markdown emphasis and a
    trailing period tolerated); None when the reply does not end with a verdict."""
    m = _VERDICT.search((text or "").strip())
    return m[1].upper() if m else None


@register_stage("self_revise")
class SelfReviseStage(_TemplatedStage):
    """Critique -> revise until ACCEPT or `max_rounds` revisions.

    params: field ("answer", the text revised in place), question_field ("question"),
    max_rounds (3), critique_file / revise_file (default tools/templates/critique.txt and
    revise.txt), temperature (0.7), max_tokens, seed, params.

    A critique whose reply does not end with a verdict drops the record (counted as
    `dropped_no_verdict`). Provenance entry: `original`, `rounds` (revisions made),
    `accepted` (the last critique accepted), `revisions`: [{round, critique, verdict,
    revision?}] (one per critique; `revision` present where one was made).
    """
    KEYS = {"field", "question_field", "max_rounds", "critique_file", "revise_file"} \
        | _TemplatedStage.SAMPLING

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "self_revise")
        self.field = _field(params, "field", "answer", key)
        self.question_field = _field(params, "question_field", "question", key)
        self.max_rounds = _int(params, "max_rounds", 3, key, 1)
        self._sampling(params, key, 0.7)
        self._templates(params, key, {"critique": ("critique_file", "critique.txt"),
                                      "revise": ("revise_file", "revise.txt")})

    @property
    def fingerprint(self) -> dict:
        return {**self._base_fingerprint(), "field": self.field,
                "question_field": self.question_field, "max_rounds": self.max_rounds}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        question = _get(record, self.question_field)
        original = answer = _get(record, self.field)
        revisions: list[dict] = []
        accepted = False
        rounds = 0
        while True:
            view = dict(record, question=question, answer=answer)
            (critique,) = await self._ask(ctx, "critique", view)
            verdict = parse_verdict(critique)
            step = {"round": rounds + 1, "critique": critique, "verdict": verdict}
            revisions.append(step)
            if verdict is None:
                self.stats["dropped_no_verdict"] += 1
                return []
            if verdict == "ACCEPT":
                accepted = True
                break
            (answer,) = await self._ask(ctx, "revise", dict(view, critique=critique))
            step["revision"] = answer
            rounds += 1
            if rounds >= self.max_rounds:
                break
        self.stats["accepted" if accepted else "max_rounds"] += 1
        out = self._out(record, ctx, original=original, rounds=rounds, accepted=accepted,
                        revisions=revisions)
        out[self.field] = answer
        return [out]


# ---------------------------------------------------------------- code verification

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_python(text: str) -> Optional[str]:
    """The last ```python (or ```py) block of a reply, else its last unlabelled ``` block;
    None when there is none."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text or "")]
    for langs in (("python", "py", "python3"), ("",)):
        found = [body for lang, body in blocks if lang in langs]
        if found:
            return found[-1].rstrip() + "\n"
    return None


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


@register_stage("verify_code")
class VerifyCodeStage(_TemplatedStage):
    """Execution loop: code + tests in the sandbox, teacher repairs on failure.

    params: code_field ("code"), tests_field ("tests"), repair_rounds (1; 0 = no repair),
    repair_file (default tools/templates/repair.txt), error_chars (4000: the tail of stderr
    and stdout shown to the teacher), cpu_seconds (10), wall_seconds (20), memory_mb (512),
    temperature (0.2), max_tokens, seed, params.

    The program is `code + "\\n\\n" + tests` run as one file with `run_python`; it passes
    when it exits 0 within the limits. Passing records get `verified: true` (a repaired
    record's code field holds the fixed code); provenance keeps `repairs` and every
    failed `attempts` entry {reason, exit_code, error, code (when it was repaired)}.
    A failing pair after the last repair is dropped (`stats["dropped_failing"]`).
    """
    KEYS = {"code_field", "tests_field", "repair_rounds", "repair_file", "error_chars",
            "cpu_seconds", "wall_seconds", "memory_mb"} | _TemplatedStage.SAMPLING

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "verify_code")
        self.code_field = _field(params, "code_field", "code", key)
        self.tests_field = _field(params, "tests_field", "tests", key)
        self.repair_rounds = _int(params, "repair_rounds", 1, key, 0)
        self.error_chars = _int(params, "error_chars", 4000, key, 1)
        from tools.sandbox import Limits
        self.limits = Limits(cpu_seconds=_num(params, "cpu_seconds", 10, key, positive=True),
                             wall_seconds=_num(params, "wall_seconds", 20, key, positive=True),
                             memory_mb=_int(params, "memory_mb", 512, key, 16))
        self._sampling(params, key, 0.2)
        self._templates(params, key, {"repair": ("repair_file", "repair.txt")})

    @property
    def fingerprint(self) -> dict:
        return {**self._base_fingerprint(), "code_field": self.code_field,
                "tests_field": self.tests_field, "repair_rounds": self.repair_rounds,
                "error_chars": self.error_chars, "limits": [self.limits.cpu_seconds,
                                                            self.limits.wall_seconds,
                                                            self.limits.memory_mb]}

    async def _execute(self, code: str, tests: str):
        from tools.sandbox import SandboxError, run_python
        try:
            return await asyncio.to_thread(run_python, code + "\n\n" + tests, limits=self.limits)
        except SandboxError as e:
            raise StageError(f"sandbox: {e}") from None

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        code, tests = _get(record, self.code_field), _get(record, self.tests_field)
        if not isinstance(code, str) or not isinstance(tests, str):
            raise StageError(f"record {record.get('id')!r}: {self.code_field!r} and "
                             f"{self.tests_field!r} must be strings")
        attempts: list[dict] = []
        repairs = 0
        result = await self._execute(code, tests)
        while not result.ok:
            error = _tail((result.stderr or "") + (("\n" + result.stdout) if result.stdout else ""),
                          self.error_chars)
            attempts.append({"reason": result.reason, "exit_code": result.exit_code,
                             "error": error, **({"code": code} if repairs else {})})
            while True:
                if repairs >= self.repair_rounds:
                    self.stats["dropped_failing"] += 1
                    return []
                view = dict(record, code=code, tests=tests, error=error, reason=result.reason)
                (reply,) = await self._ask(ctx, "repair", view)
                repairs += 1
                fixed = extract_python(reply)
                if fixed is not None:
                    break
                attempts.append({"reason": "no_code_block", "exit_code": None, "error": ""})
            code = fixed
            result = await self._execute(code, tests)
        self.stats["repaired" if repairs else "verified"] += 1
        out = self._out(record, ctx, repairs=repairs, attempts=attempts)
        out[self.code_field] = code
        out["verified"] = True
        return [out]
