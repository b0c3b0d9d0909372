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
* `rewrite`: a seed passage becomes an exercise, a discussion or a structured reasoning task
  with a worked solution (`kind`, one or a list: one record per kind); `instruction` and
  `response` are parsed from the reply's "### Problem" / "### Solution" sections.
* `qa_extract`: "Q: ... / A: ..." pairs from a passage, one record per pair.
* `reverse_instruction`: code -> instruction -> regenerated code; keeps (instruction, original
  code) when the fidelity (tests of the original on the regeneration, plus difflib similarity
  of normalised code) reaches `threshold`.
* `decontaminate`: drops records whose text hits a saved `tools.decontam` index, counting hits
  by benchmark.
* `quality_label`: the teacher scores the text 0-5 with `tools/templates/quality_score.txt`
  (= `tools.quality.SCORE_PROMPT`) -> `quality_score`; an unparsable reply drops the record.
* `quality_filter`: a saved `tools.quality.QualityClassifier` scores the text; records with
  P(high quality) >= `threshold` are kept with `quality_prob`.
* `chunk`: the text split by `tools.seeds.chunk_document` (`max_tokens`), one record per chunk
  (no teacher). Corpus-wide dedup is `python -m tools.seeds dedup`, not a stage.

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

from phijax.eval.answers import extract_python
from tools import jsonl
from tools.pipeline import (PipelineError, Stage, StageContext, StageError, _canonical, _check,
                            _child, _sha256, register_stage, render_template)

TEMPLATES = Path(__file__).resolve().parent / "templates"

__all__ = ["TEMPLATES", "DifficultyStage", "SelfReviseStage", "VerifyCodeStage", "parse_verdict",
           "extract_python", "RewriteStage", "QAExtractStage", "ReverseInstructionStage",
           "DecontaminateStage", "parse_problem_solution", "parse_qa_pairs", "normalise_code",
           "code_similarity", "REWRITE_KINDS", "QualityLabelStage", "QualityFilterStage",
           "ChunkStage"]


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
        return jsonl.lookup(record, field)
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
        from phijax.eval.answers import KINDS
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
        from tools.difficulty import difficulty_filter
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


# ---------------------------------------------------------------- rewriting seeds

REWRITE_KINDS = ("exercise", "discussion", "reasoning")
_SECTION = re.compile(r"^[ \t]*#{1,6}[ \t]*(Problem|Solution)[ \t]*:?[ \t]*$", re.I | re.M)


def parse_problem_solution(text: str) -> Optional[tuple[str, str]]:
    """(problem, solution) from a reply with a "### Problem" section followed by a
    "### Solution" section (any heading level; text before the first heading is ignored);
    None when either is missing, empty, repeated or out of order."""
    marks = list(_SECTION.finditer(text or ""))
    names = [m[1].lower() for m in marks]
    if names != ["problem", "solution"]:
        return None
    problem = text[marks[0].end():marks[1].start()].strip()
    solution = text[marks[1].end():].strip()
    return (problem, solution) if problem and solution else None


@register_stage("rewrite")
class RewriteStage(_TemplatedStage):
    """A seed becomes an exercise, a discussion or a structured reasoning task with a worked
    solution (one teacher call per kind).

    params: field ("text", the seed passage, `{text}` in the templates), kind ("reasoning";
    one of exercise | discussion | reasoning, or a list of them: one output record per kind,
    choice = its position in the list), exercise_file / discussion_file / reasoning_file
    (default tools/templates/rewrite_<kind>.txt), temperature (0.7), max_tokens, seed, params.
    Output fields: `instruction` (the problem), `response` (the solution), `rewrite_kind`.
    A reply without a "### Problem" then a "### Solution" section yields no record for that
    kind (`stats["dropped_unparsed"]`).
    """
    KEYS = {"field", "kind"} | {f"{k}_file" for k in REWRITE_KINDS} | _TemplatedStage.SAMPLING

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "rewrite")
        self.field = _field(params, "field", "text", key)
        kind = params.get("kind", "reasoning")
        kinds = [kind] if isinstance(kind, str) else kind
        _check(isinstance(kinds, list) and kinds and len(set(kinds)) == len(kinds)
               and all(k in REWRITE_KINDS for k in kinds), f"{key}.kind",
               f"expected one of {', '.join(REWRITE_KINDS)} or a list of distinct ones, "
               f"got {kind!r}")
        self.kinds = list(kinds)
        self._sampling(params, key, 0.7)
        self._templates(params, key, {k: (f"{k}_file", f"rewrite_{k}.txt") for k in self.kinds})

    @property
    def fingerprint(self) -> dict:
        return {**self._base_fingerprint(), "field": self.field, "kinds": self.kinds}

    async def _one(self, record: dict, ctx: StageContext, choice: int, kind: str,
                   text: str) -> list[dict]:
        (reply,) = await self._ask(ctx, kind, dict(record, text=text))
        parsed = parse_problem_solution(reply)
        if parsed is None:
            self.stats["dropped_unparsed"] += 1
            return []
        self.stats[f"kept_{kind}"] += 1
        out = _child(record, self, choice, template_sha256=self.template_sha256,
                     templates={kind: self.template_shas[kind]}, model=ctx.model, kind=kind)
        out.update(instruction=parsed[0], response=parsed[1], rewrite_kind=kind)
        return [out]

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        text = _get(record, self.field)
        outs = await asyncio.gather(*(self._one(record, ctx, i, kind, text)
                                      for i, kind in enumerate(self.kinds)))
        return [o for out in outs for o in out]


# ---------------------------------------------------------------- Q&A extraction

_QA_LINE = re.compile(r"^[ \t]*[*_]*(Q|A)[*_]*[ \t]*[:.)][*_]*[ \t]?(.*)$", re.I)


def parse_qa_pairs(text: str) -> Optional[list[tuple[str, str]]]:
    """[(question, answer)] from lines "Q: ..." / "A: ..." (either may continue on following
    lines; text before the first "Q:" is ignored). None when the reply is malformed: no pair,
    an answer without its question, a question without an answer, or an empty part."""
    pairs: list[list[str]] = []
    state = None   # None before the first Q, then "Q" or "A": where continuation lines go
    for line in (text or "").splitlines():
        m = _QA_LINE.match(line)
        if m:
            tag = m[1].upper()
            if tag == "Q":
                if state == "Q":
                    return None
                pairs.append([m[2], ""])
            else:
                if state != "Q":
                    return None
                pairs[-1][1] = m[2]
            state = tag
        elif state is not None:
            i = 0 if state == "Q" else 1
            pairs[-1][i] += "\n" + line
    if not pairs or state != "A":
        return None
    out = [(q.strip(), a.strip()) for q, a in pairs]
    return out if all(q and a for q, a in out) else None


@register_stage("qa_extract")
class QAExtractStage(_TemplatedStage):
    """Question/answer pairs from a passage: one teacher call, one record per pair.

    params: field ("text", `{text}` in the template), max_pairs (none: all), template_file
    (default tools/templates/qa_extract.txt), temperature (0.3), max_tokens, seed, params.
    Output fields `question`, `answer`; the record id ends in /<pair index> (stable across
    reruns of the same reply). A malformed reply (see `parse_qa_pairs`) yields nothing
    (`stats["dropped_malformed"]`).
    """
    KEYS = {"field", "max_pairs", "template_file"} | _TemplatedStage.SAMPLING

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "qa_extract")
        self.field = _field(params, "field", "text", key)
        self.max_pairs = None if params.get("max_pairs") is None else \
            _int(params, "max_pairs", 0, key, 1)
        self._sampling(params, key, 0.3)
        self._templates(params, key, {"qa_extract": ("template_file", "qa_extract.txt")})

    @property
    def fingerprint(self) -> dict:
        return {**self._base_fingerprint(), "field": self.field, "max_pairs": self.max_pairs}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        text = _get(record, self.field)
        (reply,) = await self._ask(ctx, "qa_extract", dict(record, text=text))
        pairs = parse_qa_pairs(reply)
        if pairs is None:
            self.stats["dropped_malformed"] += 1
            return []
        pairs = pairs[:self.max_pairs] if self.max_pairs else pairs
        self.stats["pairs"] += len(pairs)
        outs = []
        for i, (q, a) in enumerate(pairs):
            out = _child(record, self, i, template_sha256=self.template_sha256,
                         templates=dict(self.template_shas), model=ctx.model, pairs=len(pairs))
            out.update(question=q, answer=a)
            outs.append(out)
        return outs


# ---------------------------------------------------------------- instruction reversal

def normalise_code(code: str) -> str:
    """Python code without comments, docstring-free formatting differences or blank lines:
    `ast.unparse(ast.parse(code))` when it parses, else stripped non-empty lines with `#`
    comments removed; used for the similarity part of the fidelity score."""
    import ast
    try:
        return ast.unparse(ast.parse(code)).strip()
    except (SyntaxError, ValueError, RecursionError):
        lines = (re.sub(r"\s+#.*$|^\s*#.*$", "", l).rstrip() for l in code.splitlines())
        return "\n".join(l for l in lines if l.strip())


def code_similarity(a: str, b: str) -> float:
    """difflib ratio of the two normalised programs, in [0, 1]."""
    import difflib
    return difflib.SequenceMatcher(None, normalise_code(a), normalise_code(b),
                                   autojunk=False).ratio()


@register_stage("reverse_instruction")
class ReverseInstructionStage(_TemplatedStage):
    """Instruction reversal: code -> teacher writes the instruction -> teacher regenerates code
    from the instruction alone -> keep (instruction, original code) when the regeneration is
    faithful.

    params: code_field ("code"), tests_field ("tests"; optional in the record), threshold
    (0.7), test_weight (0.5), instruction_file / regenerate_file (default
    tools/templates/reverse_instruction.txt and reverse_regenerate.txt), cpu_seconds (10),
    wall_seconds (20), memory_mb (512), temperature (0.2), max_tokens, seed, params.

    fidelity = test_weight * tests_passed + (1 - test_weight) * similarity when the record has
    tests (the original's tests run on the regenerated code in the sandbox, 1 or 0), else the
    similarity alone (`code_similarity`, difflib on normalised code). Kept records get
    `instruction`, `response` (the original code) and `fidelity`; provenance keeps the
    regenerated code, similarity and tests_passed. A regeneration without a code block scores 0.
    """
    KEYS = {"code_field", "tests_field", "threshold", "test_weight", "instruction_file",
            "regenerate_file", "cpu_seconds", "wall_seconds", "memory_mb"} \
        | _TemplatedStage.SAMPLING

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "reverse_instruction")
        self.code_field = _field(params, "code_field", "code", key)
        self.tests_field = _field(params, "tests_field", "tests", key)
        self.threshold = _num(params, "threshold", 0.7, key)
        _check(self.threshold <= 1.0, f"{key}.threshold", "expected a number in [0, 1]")
        self.test_weight = _num(params, "test_weight", 0.5, key)
        _check(self.test_weight <= 1.0, f"{key}.test_weight", "expected a number in [0, 1]")
        from tools.sandbox import Limits
        self.limits = Limits(cpu_seconds=_num(params, "cpu_seconds", 10, key, positive=True),
                             wall_seconds=_num(params, "wall_seconds", 20, key, positive=True),
                             memory_mb=_int(params, "memory_mb", 512, key, 16))
        self._sampling(params, key, 0.2)
        self._templates(params, key, {
            "instruction": ("instruction_file", "reverse_instruction.txt"),
            "regenerate": ("regenerate_file", "reverse_regenerate.txt")})

    @property
    def fingerprint(self) -> dict:
        return {**self._base_fingerprint(), "code_field": self.code_field,
                "tests_field": self.tests_field, "threshold": self.threshold,
                "test_weight": self.test_weight,
                "limits": [self.limits.cpu_seconds, self.limits.wall_seconds,
                           self.limits.memory_mb]}

    async def _passes(self, code: str, tests: str) -> bool:
        from tools.sandbox import SandboxError, run_python
        try:
            result = await asyncio.to_thread(run_python, code + "\n\n" + tests,
                                             limits=self.limits)
        except SandboxError as e:
            raise StageError(f"sandbox: {e}") from None
        return result.ok

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        code = _get(record, self.code_field)
        tests = record.get(self.tests_field)
        if not isinstance(code, str) or not (tests is None or isinstance(tests, str)):
            raise StageError(f"record {record.get('id')!r}: {self.code_field!r} (and "
                             f"{self.tests_field!r}, when given) must be strings")
        has_tests = bool(tests and tests.strip())
        (instruction,) = await self._ask(ctx, "instruction", dict(record, code=code))
        instruction = instruction.strip()
        if not instruction:
            self.stats["dropped_no_instruction"] += 1
            return []
        (reply,) = await self._ask(ctx, "regenerate",
                                   dict(record, code=code, instruction=instruction))
        regenerated = extract_python(reply)
        if regenerated is None:
            similarity, passed = 0.0, False if has_tests else None
        else:
            similarity = code_similarity(code, regenerated)
            passed = await self._passes(regenerated, tests) if has_tests else None
        fidelity = (self.test_weight * float(passed) + (1 - self.test_weight) * similarity
                    if has_tests else similarity)
        if fidelity < self.threshold:
            self.stats["dropped_low_fidelity"] += 1
            return []
        self.stats["kept"] += 1
        out = self._out(record, ctx, regenerated=regenerated, similarity=round(similarity, 6),
                        tests_passed=passed, fidelity=round(fidelity, 6))
        out.update(instruction=instruction, response=code, fidelity=round(fidelity, 6))
        return [out]


# ---------------------------------------------------------------- decontamination

@register_stage("decontaminate")
class DecontaminateStage(Stage):
    """Drop records whose text hits a saved decontamination index (`tools.decontam`).

    params: index (required: a path written by `Index.save` / `python -m tools.decontam
    build`), field ("text", or a list of fields joined by newlines; lists inside a field are
    flattened). Kept records pass unchanged (same id). `stats`: kept, dropped_contaminated;
    `hits_by_benchmark` / `hits_by_kind` count the dropped records (this process's share).
    The index file's sha256 is part of the stage fingerprint.
    """
    KEYS = {"index", "field"}

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "decontaminate")
        path = params.get("index")
        _check(isinstance(path, str) and path, f"{key}.index",
               "required: path of a saved decontamination index")
        _check(Path(path).is_file(), f"{key}.index", f"file {path} does not exist")
        field = params.get("field", "text")
        self.fields = [field] if isinstance(field, str) else field
        _check(isinstance(self.fields, list) and self.fields
               and all(isinstance(f, str) and f and f not in ("id", "provenance")
                       for f in self.fields), f"{key}.field",
               "expected a field name or a list of them (not id/provenance)")
        from tools.decontam import Index
        try:
            self.index = Index.load(path)
        except Exception as e:  # noqa: BLE001 - a bad file is a config error
            raise PipelineError(f"{key}.index: cannot load {path}: {e}") from None
        import hashlib
        self.index_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.stats: Counter = Counter()
        self.hits_by_benchmark: Counter = Counter()
        self.hits_by_kind: Counter = Counter()

    @property
    def fingerprint(self) -> dict:
        return {"name": self.name, "type": self.type, "fields": self.fields,
                "index_sha256": self.index_sha256}

    def text(self, record: dict) -> str:
        parts = []
        for f in self.fields:
            v = _get(record, f)
            if isinstance(v, (list, tuple)):
                parts.extend(str(x) for x in v)
            elif v is not None:
                parts.append(v if isinstance(v, str) else str(v))
        return "\n".join(parts)

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        hit = self.index.check(self.text(record))
        if hit is None:
            self.stats["kept"] += 1
            return [record]
        self.stats["dropped_contaminated"] += 1
        self.hits_by_benchmark[hit.benchmark] += 1
        self.hits_by_kind[hit.kind] += 1
        return []


# ---------------------------------------------------------------- quality annotation / filter

@register_stage("quality_label")
class QualityLabelStage(_TemplatedStage):
    """The teacher scores a document 0-5 for educational/reasoning value (the labels that
    `tools.quality.QualityClassifier` is trained on).

    params: field ("text", `{text}` in the template), template_file (default
    tools/templates/quality_score.txt, the same file as `tools.quality.SCORE_PROMPT`),
    temperature (0.0), max_tokens, seed, params. Output field `quality_score` (int 0-5, parsed
    with `tools.quality.parse_score`); the provenance entry keeps the teacher's reply. A reply
    without a parsable score drops the record (`stats["dropped_unparsed"]`); kept records
    count as `kept` and per score as `score_<N>`.
    """
    KEYS = {"field", "template_file"} | _TemplatedStage.SAMPLING

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "quality_label")
        self.field = _field(params, "field", "text", key)
        self._sampling(params, key, 0.0)
        self._templates(params, key, {"quality_score": ("template_file", "quality_score.txt")})

    @property
    def fingerprint(self) -> dict:
        return {**self._base_fingerprint(), "field": self.field}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        from tools.quality import parse_score
        text = _get(record, self.field)
        (reply,) = await self._ask(ctx, "quality_score", dict(record, text=text))
        score = parse_score(reply)
        if score is None:
            self.stats["dropped_unparsed"] += 1
            return []
        self.stats["kept"] += 1
        self.stats[f"score_{score}"] += 1
        out = self._out(record, ctx, reply=reply)
        out["quality_score"] = score
        return [out]


@register_stage("quality_filter")
class QualityFilterStage(Stage):
    """Keep records whose text a saved `tools.quality.QualityClassifier` scores >= `threshold`.

    params: model (required: a path written by `QualityClassifier.save` / `python -m
    tools.quality train`; loaded and validated when the pipeline is built), field ("text"),
    threshold (0.5, in [0, 1]). Kept records get `quality_prob` (P(high quality), rounded to
    6 places) and a provenance entry (id `<id>/<stage>/0`); records below the threshold are
    dropped. `stats`: kept, dropped_low_quality. The model file's sha256 and the threshold
    are part of the stage fingerprint.
    """
    KEYS = {"model", "field", "threshold"}

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "quality_filter")
        path = params.get("model")
        _check(isinstance(path, str) and path, f"{key}.model",
               "required: path of a saved quality classifier (.npz)")
        _check(Path(path).is_file(), f"{key}.model", f"file {path} does not exist")
        self.field = _field(params, "field", "text", key)
        self.threshold = _num(params, "threshold", 0.5, key)
        _check(self.threshold <= 1.0, f"{key}.threshold", "expected a number in [0, 1]")
        from tools.quality import QualityClassifier
        try:
            self.model = QualityClassifier.load(path)
        except Exception as e:  # noqa: BLE001 - a bad file is a config error
            raise PipelineError(f"{key}.model: cannot load {path}: {e}") from None
        import hashlib
        self.model_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.stats: Counter = Counter()

    @property
    def fingerprint(self) -> dict:
        return {"name": self.name, "type": self.type, "field": self.field,
                "threshold": self.threshold, "model_sha256": self.model_sha256}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        text = _get(record, self.field)
        if not isinstance(text, str):
            raise StageError(f"field {self.field!r} of record {record.get('id')!r} is not a string")
        prob = float(self.model.score([text])[0])
        if prob < self.threshold:
            self.stats["dropped_low_quality"] += 1
            return []
        self.stats["kept"] += 1
        out = _child(record, self, 0, model_sha256=self.model_sha256, threshold=self.threshold)
        out["quality_prob"] = round(prob, 6)
        return [out]


# ---------------------------------------------------------------- chunking

@register_stage("chunk")
class ChunkStage(Stage):
    """Split a record's text into chunks within a token budget (`tools.seeds.chunk_document`,
    words as tokens); no teacher call.

    params: field ("text"), max_tokens (512). One output record per chunk, the chunk replacing
    the field; ids `<id>/<stage>/<chunk index>` (stable for the same text and budget); the
    provenance entry has `chunks` (how many) and `max_tokens`. A text with no content gives no
    record (`stats["dropped_empty"]`); `stats["chunks"]` counts the chunks written.
    (Deduplication needs the whole corpus, so it is not a stage: `python -m tools.seeds dedup`.)
    """
    KEYS = {"field", "max_tokens"}

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        _known(params, self.KEYS, key, "chunk")
        self.field = _field(params, "field", "text", key)
        self.max_tokens = _int(params, "max_tokens", 512, key, 1)
        self.stats: Counter = Counter()

    @property
    def fingerprint(self) -> dict:
        return {"name": self.name, "type": self.type, "field": self.field,
                "max_tokens": self.max_tokens}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        from tools.seeds import chunk_document
        text = _get(record, self.field)
        if not isinstance(text, str):
            raise StageError(f"field {self.field!r} of record {record.get('id')!r} is not a string")
        chunks = chunk_document(text, max_tokens=self.max_tokens)
        if not chunks:
            self.stats["dropped_empty"] += 1
            return []
        self.stats["chunks"] += len(chunks)
        outs = []
        for i, chunk in enumerate(chunks):
            out = _child(record, self, i, chunks=len(chunks), max_tokens=self.max_tokens)
            out[self.field] = chunk
            outs.append(out)
        return outs
