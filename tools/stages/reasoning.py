"""Stages that make and refine reasoning data with the teacher.

* `difficulty`: sample k answers to the record's question (one teacher call, n=k), normalise
  them (`phijax.eval.answers`) and drop questions where all agree (too easy) or none agree (too
  hard); kept records get `reference_answer` (the plurality answer, normalised),
  `reference_solution` (the first sampled solution with that answer) and `agreement`.
* `self_revise`: critique -> revise rounds on a field (default `answer`) until the critique
  ends with "VERDICT: ACCEPT" or `max_rounds` revisions were made; the final answer replaces
  the field, every critique and revision is kept in the stage's provenance (`revisions`).
* `rewrite`: a seed passage becomes an exercise, a discussion or a structured reasoning task
  with a worked solution (`kind`, one or a list: one record per kind); `instruction` and
  `response` are parsed from the reply's "### Problem" / "### Solution" sections.
* `qa_extract`: "Q: ... / A: ..." pairs from a passage, one record per pair.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from phijax.config import one_of, positive, ranged
from phijax.eval.answers import ANSWER_KINDS, normalize_answer
from tools.pipeline.stage import (PipelineError, StageContext, file_field, get_field,
                                  record_field, register_stage)
from tools.stages.templated import SamplingConfig, TemplatedStage

# ---------------------------------------------------------------- difficulty


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str                 # "kept", "all_agree", "none_agree" or "too_few"
    reference: str | None       # the plurality answer (normalised), None if nothing parsed
    agreement: float            # plurality count / k (unparseable answers count in k)
    count: int                  # plurality count
    k: int                      # answers sampled
    reference_index: int | None  # first answer whose normalised form is the reference
    counts: dict                # normalised answer -> count (unparseable left out)
    tie: bool = False           # another answer had the same plurality count


def difficulty_filter(answers: Sequence[str | None], kind: str = "auto", *, min_agree: int = 2,
                      max_agreement: float = 1.0, min_k: int = 2,
                      percent_as_fraction: bool = False) -> Decision:
    """Phi-4's difficulty filter for one question from its k independent teacher answers.

    Drop as too easy ("all_agree") when the plurality share reaches `max_agreement` (default 1.0:
    all k answers parse and agree). Drop as too hard ("none_agree") when the plurality count is
    below `min_agree` (default 2: with k >= 2 no two answers agree, including when none parse).
    Fewer than `min_k` answers: dropped as "too_few". Otherwise keep, with the plurality answer as
    the reference and its share as `agreement`. Unparseable answers (None) never agree with
    anything but count in k. Ties for plurality go to the smallest normalised string, so the
    decision does not depend on the order the samples arrived in (`tie` flags them).
    """
    norm = [normalize_answer(a, kind, percent_as_fraction=percent_as_fraction)
            if a is not None else None for a in answers]
    k = len(norm)
    counts = Counter(a for a in norm if a is not None)
    if counts:
        top = max(counts.values())
        leaders = sorted(a for a, c in counts.items() if c == top)
        reference, count, tie = leaders[0], top, len(leaders) > 1
        ref_index = norm.index(reference)
    else:
        reference, count, tie, ref_index = None, 0, False, None
    agreement = count / k if k else 0.0
    if k < min_k:
        reason = "too_few"
    elif count < min_agree:
        reason = "none_agree"
    elif agreement >= max_agreement:
        reason = "all_agree"
    else:
        reason = "kept"
    return Decision(reason == "kept", reason, reference, agreement, count, k, ref_index,
                    dict(counts), tie)


@dataclass(kw_only=True)
class DifficultyConfig(SamplingConfig):
    field: str = record_field("question")   # `{question}` in the template
    k: int = ranged(8, ge=2)                # answers sampled
    kind: str = one_of(*ANSWER_KINDS)
    min_agree: int = ranged(2, ge=1)
    max_agreement: float = ranged(1.0, gt=0, le=1)
    percent_as_fraction: bool = False
    template_file: Optional[str] = file_field()   # default tools/templates/difficulty.txt


@register_stage("difficulty")
class DifficultyStage(TemplatedStage):
    """Phi-4's question-difficulty filter (`difficulty_filter` over k sampled answers)."""
    Config = DifficultyConfig
    TEMPLATE_FILES = {"difficulty": ("template_file", "difficulty.txt")}
    VIEWS = {"difficulty": ("question",)}
    ADDS = ("reference_answer", "reference_solution", "agreement")

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        c = self.cfg
        view = dict(record, question=get_field(record, c.field))
        answers = await self.ask(ctx, "difficulty", view, n=c.k)
        d = difficulty_filter(answers, c.kind, min_agree=c.min_agree,
                              max_agreement=c.max_agreement, min_k=2,
                              percent_as_fraction=c.percent_as_fraction)
        if not d.keep:
            self.stats[f"dropped_{d.reason}"] += 1
            return []
        self.stats["kept"] += 1
        out = self.output(record, ctx, k=d.k, counts=d.counts, tie=d.tie,
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


@dataclass(kw_only=True)
class SelfReviseConfig(SamplingConfig):
    temperature: float = ranged(0.7, ge=0)
    field: str = record_field("answer")              # the text revised in place
    question_field: str = record_field("question")
    max_rounds: int = ranged(3, ge=1)                # revisions at most
    critique_file: Optional[str] = file_field()      # default tools/templates/critique.txt
    revise_file: Optional[str] = file_field()        # default tools/templates/revise.txt


@register_stage("self_revise")
class SelfReviseStage(TemplatedStage):
    """Critique -> revise until ACCEPT or `max_rounds` revisions.

    A critique whose reply does not end with a verdict drops the record (counted as
    `dropped_no_verdict`). Provenance entry: `original`, `rounds` (revisions made),
    `accepted` (the last critique accepted), `revisions`: [{round, critique, verdict,
    revision?}] (one per critique; `revision` present where one was made).
    """
    Config = SelfReviseConfig
    TEMPLATE_FILES = {"critique": ("critique_file", "critique.txt"),
                      "revise": ("revise_file", "revise.txt")}
    VIEWS = {"critique": ("question", "answer"), "revise": ("question", "answer", "critique")}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        question = get_field(record, self.cfg.question_field)
        original = answer = get_field(record, self.cfg.field)
        revisions: list[dict] = []
        accepted = False
        rounds = 0
        while True:
            view = dict(record, question=question, answer=answer)
            (critique,) = await self.ask(ctx, "critique", view)
            verdict = parse_verdict(critique)
            step = {"round": rounds + 1, "critique": critique, "verdict": verdict}
            revisions.append(step)
            if verdict is None:
                self.stats["dropped_no_verdict"] += 1
                return []
            if verdict == "ACCEPT":
                accepted = True
                break
            (answer,) = await self.ask(ctx, "revise", dict(view, critique=critique))
            step["revision"] = answer
            rounds += 1
            if rounds >= self.cfg.max_rounds:
                break
        self.stats["accepted" if accepted else "max_rounds"] += 1
        out = self.output(record, ctx, original=original, rounds=rounds, accepted=accepted,
                          revisions=revisions)
        out[self.cfg.field] = answer
        return [out]


# ---------------------------------------------------------------- rewriting seeds

REWRITE_KINDS = ("exercise", "discussion", "reasoning")
_SECTION = re.compile(r"^[ \t]*#{1,6}[ \t]*(Problem|Solution)[ \t]*:?[ \t]*$", re.I | re.M)


def parse_problem_solution(text: str) -> Optional[tuple[str, str]]:
    """(problem, solution) from a reply with a "### Problem" section followed by a
    "### Solution" section (any heading level; text before the first heading is ignored);
    None when either is missing, empty, repeated or out of order."""
    marks = list(_SECTION.finditer(text or ""))
    if [m[1].lower() for m in marks] != ["problem", "solution"]:
        return None
    problem = text[marks[0].end():marks[1].start()].strip()
    solution = text[marks[1].end():].strip()
    return (problem, solution) if problem and solution else None


@dataclass(kw_only=True)
class RewriteConfig(SamplingConfig):
    temperature: float = ranged(0.7, ge=0)
    field: str = record_field("text")        # the seed passage, `{text}` in the templates
    kind: list[str] = dataclasses.field(default_factory=lambda: ["reasoning"])   # one record per kind
    exercise_file: Optional[str] = file_field()     # default tools/templates/rewrite_<kind>.txt
    discussion_file: Optional[str] = file_field()
    reasoning_file: Optional[str] = file_field()


@register_stage("rewrite")
class RewriteStage(TemplatedStage):
    """A seed becomes an exercise, a discussion or a structured reasoning task with a worked
    solution (one teacher call per kind; choice = the kind's position in `kind`).

    Output fields: `instruction` (the problem), `response` (the solution), `rewrite_kind`.
    A reply without a "### Problem" then a "### Solution" section yields no record for that
    kind (`stats["dropped_unparsed"]`).
    """
    Config = RewriteConfig
    VIEWS = {kind: ("text",) for kind in REWRITE_KINDS}
    ADDS = ("instruction", "response", "rewrite_kind")

    def __init__(self, cfg: RewriteConfig, key: str):
        kinds = cfg.kind
        if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(REWRITE_KINDS):
            raise PipelineError(f"{key}.kind: expected one of {', '.join(REWRITE_KINDS)} or a "
                                f"list of distinct ones, got {kinds!r}")
        super().__init__(cfg, key)

    def template_files(self) -> dict[str, tuple[str, str]]:
        return {k: (f"{k}_file", f"rewrite_{k}.txt") for k in self.cfg.kind}

    async def _one(self, record: dict, ctx: StageContext, choice: int, kind: str,
                   text: str) -> list[dict]:
        _, parsed = await self.ask_parsed(ctx, kind, dict(record, text=text),
                                          parse_problem_solution, "dropped_unparsed")
        if parsed is None:
            return []
        self.stats[f"kept_{kind}"] += 1
        out = self.output(record, ctx, choice, templates={kind: self.template_shas[kind]},
                          kind=kind)
        out.update(instruction=parsed[0], response=parsed[1], rewrite_kind=kind)
        return [out]

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        text = get_field(record, self.cfg.field)
        outs = await asyncio.gather(*(self._one(record, ctx, i, kind, text)
                                      for i, kind in enumerate(self.cfg.kind)))
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
            pairs[-1][0 if state == "Q" else 1] += "\n" + line
    if not pairs or state != "A":
        return None
    out = [(q.strip(), a.strip()) for q, a in pairs]
    return out if all(q and a for q, a in out) else None


@dataclass(kw_only=True)
class QAExtractConfig(SamplingConfig):
    temperature: float = ranged(0.3, ge=0)
    field: str = record_field("text")              # `{text}` in the template
    max_pairs: Optional[int] = positive(None)      # default: all
    template_file: Optional[str] = file_field()    # default tools/templates/qa_extract.txt


@register_stage("qa_extract")
class QAExtractStage(TemplatedStage):
    """Question/answer pairs from a passage: one teacher call, one record per pair.

    Output fields `question`, `answer`; the record id ends in /<pair index> (stable across
    reruns of the same reply). A malformed reply (see `parse_qa_pairs`) yields nothing
    (`stats["dropped_malformed"]`).
    """
    Config = QAExtractConfig
    TEMPLATE_FILES = {"qa_extract": ("template_file", "qa_extract.txt")}
    VIEWS = {"qa_extract": ("text",)}
    ADDS = ("question", "answer")

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        view = dict(record, text=get_field(record, self.cfg.field))
        _, pairs = await self.ask_parsed(ctx, "qa_extract", view, parse_qa_pairs,
                                         "dropped_malformed")
        if pairs is None:
            return []
        pairs = pairs[:self.cfg.max_pairs] if self.cfg.max_pairs else pairs
        self.stats["pairs"] += len(pairs)
        outs = []
        for i, (q, a) in enumerate(pairs):
            out = self.output(record, ctx, i, pairs=len(pairs))
            out.update(question=q, answer=a)
            outs.append(out)
        return outs
