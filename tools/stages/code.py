"""Stages for code data, checked by running it in the sandbox (`tools.sandbox.run_tests`).

* `verify_code`: run the record's `code` + `tests` together; pass -> `verified: true`; fail ->
  up to `repair_rounds` teacher repairs (the error output in, a ```python block out), re-run;
  still failing -> drop.
* `reverse_instruction`: code -> instruction -> regenerated code; keeps (instruction, original
  code) when the fidelity (tests of the original on the regeneration, plus difflib similarity
  of normalised code) reaches `threshold`.
"""
from __future__ import annotations

import ast
import asyncio
import difflib
import re
from dataclasses import dataclass
from typing import Optional

from phijax.config import positive, ranged
from phijax.eval.answers import extract_python
from tools.pipeline.stage import (StageContext, StageError, file_field, get_field,
                                  record_field, register_stage)
from tools.stages.templated import SamplingConfig, TemplatedStage


@dataclass(kw_only=True)
class CodeConfig(SamplingConfig):
    """The parameters every code stage has: which fields hold the code and its tests, and the
    sandbox limits of one run."""
    temperature: float = ranged(0.2, ge=0)
    code_field: str = record_field("code")
    tests_field: str = record_field("tests")
    cpu_seconds: float = positive(10.0)
    wall_seconds: float = positive(20.0)
    memory_mb: int = ranged(512, ge=16)


class CodeStage(TemplatedStage):
    """A templated stage that runs code with its tests in the sandbox."""

    def __init__(self, cfg: CodeConfig, key: str):
        super().__init__(cfg, key)
        from tools.sandbox import Limits
        self.limits = Limits(cpu_seconds=cfg.cpu_seconds, wall_seconds=cfg.wall_seconds,
                             memory_mb=cfg.memory_mb)

    async def execute(self, code: str, tests: str):
        """The sandbox's Result of `code` followed by `tests`, run as one file."""
        from tools.sandbox import SandboxError, run_tests
        try:
            return await asyncio.to_thread(run_tests, code, tests, self.limits)
        except SandboxError as e:
            raise StageError(f"sandbox: {e}") from None

    def code_and_tests(self, record: dict, tests_optional: bool) -> tuple[str, Optional[str]]:
        """The record's code and tests (strings; with `tests_optional` the tests may be absent
        or null)."""
        code = get_field(record, self.cfg.code_field)
        tests = record.get(self.cfg.tests_field) if tests_optional else \
            get_field(record, self.cfg.tests_field)
        if not isinstance(code, str) or not (isinstance(tests, str)
                                             or (tests_optional and tests is None)):
            raise StageError(f"record {record.get('id')!r}: {self.cfg.code_field!r} and "
                             f"{self.cfg.tests_field!r} must be strings")
        return code, tests


# ---------------------------------------------------------------- code verification

def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


@dataclass(kw_only=True)
class VerifyCodeConfig(CodeConfig):
    repair_rounds: int = ranged(1, ge=0)          # 0: no repair
    repair_file: Optional[str] = file_field()     # default tools/templates/repair.txt
    error_chars: int = positive(4000)             # the tail of stderr + stdout the teacher sees


@register_stage("verify_code")
class VerifyCodeStage(CodeStage):
    """Execution loop: code + tests in the sandbox, teacher repairs on failure.

    The program passes when it exits 0 within the limits. Passing records get `verified: true`
    (a repaired record's code field holds the fixed code); provenance keeps `repairs` and every
    failed `attempts` entry {reason, exit_code, error, code (when it was repaired)}. A failing
    pair after the last repair is dropped (`stats["dropped_failing"]`).
    """
    Config = VerifyCodeConfig
    TEMPLATE_FILES = {"repair": ("repair_file", "repair.txt")}
    VIEWS = {"repair": ("code", "tests", "error", "reason")}
    ADDS = ("verified",)

    async def _repair(self, record: dict, ctx: StageContext, view: dict, repairs: int,
                      attempts: list[dict]) -> tuple[Optional[str], int]:
        """A repaired program from the teacher, asking again while a reply has no code block;
        (None, repairs) once `repair_rounds` repairs were asked for."""
        while repairs < self.cfg.repair_rounds:
            (reply,) = await self.ask(ctx, "repair", dict(record, **view))
            repairs += 1
            fixed = extract_python(reply)
            if fixed is not None:
                return fixed, repairs
            attempts.append({"reason": "no_code_block", "exit_code": None, "error": ""})
        return None, repairs

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        code, tests = self.code_and_tests(record, tests_optional=False)
        attempts: list[dict] = []
        repairs = 0
        result = await self.execute(code, tests)
        while not result.ok:
            error = _tail((result.stderr or "") + (("\n" + result.stdout) if result.stdout else ""),
                          self.cfg.error_chars)
            attempts.append({"reason": result.reason, "exit_code": result.exit_code,
                             "error": error, **({"code": code} if repairs else {})})
            view = dict(code=code, tests=tests, error=error, reason=result.reason)
            fixed, repairs = await self._repair(record, ctx, view, repairs, attempts)
            if fixed is None:
                self.stats["dropped_failing"] += 1
                return []
            code = fixed
            result = await self.execute(code, tests)
        self.stats["repaired" if repairs else "verified"] += 1
        out = self.output(record, ctx, repairs=repairs, attempts=attempts)
        out[self.cfg.code_field] = code
        out["verified"] = True
        return [out]


# ---------------------------------------------------------------- instruction reversal

def normalise_code(code: str) -> str:
    """Python code without comments, docstring-free formatting differences or blank lines:
    `ast.unparse(ast.parse(code))` when it parses, else stripped non-empty lines with `#`
    comments removed; used for the similarity part of the fidelity score."""
    try:
        return ast.unparse(ast.parse(code)).strip()
    except (SyntaxError, ValueError, RecursionError):
        lines = (re.sub(r"\s+#.*$|^\s*#.*$", "", l).rstrip() for l in code.splitlines())
        return "\n".join(l for l in lines if l.strip())


def code_similarity(a: str, b: str) -> float:
    """difflib ratio of the two normalised programs, in [0, 1]."""
    return difflib.SequenceMatcher(None, normalise_code(a), normalise_code(b),
                                   autojunk=False).ratio()


@dataclass(kw_only=True)
class ReverseInstructionConfig(CodeConfig):
    threshold: float = ranged(0.7, ge=0, le=1)     # the fidelity a kept record needs
    test_weight: float = ranged(0.5, ge=0, le=1)
    instruction_file: Optional[str] = file_field()   # default reverse_instruction.txt
    regenerate_file: Optional[str] = file_field()    # default reverse_regenerate.txt


@register_stage("reverse_instruction")
class ReverseInstructionStage(CodeStage):
    """Instruction reversal: code -> teacher writes the instruction -> teacher regenerates code
    from the instruction alone -> keep (instruction, original code) when the regeneration is
    faithful.

    fidelity = test_weight * tests_passed + (1 - test_weight) * similarity when the record has
    tests (the original's tests run on the regenerated code in the sandbox, 1 or 0), else the
    similarity alone (`code_similarity`, difflib on normalised code). Kept records get
    `instruction`, `response` (the original code) and `fidelity`; provenance keeps the
    regenerated code, similarity and tests_passed. A regeneration without a code block scores 0.
    """
    Config = ReverseInstructionConfig
    TEMPLATE_FILES = {"instruction": ("instruction_file", "reverse_instruction.txt"),
                      "regenerate": ("regenerate_file", "reverse_regenerate.txt")}
    VIEWS = {"instruction": ("code",), "regenerate": ("code", "instruction")}
    ADDS = ("instruction", "response", "fidelity")

    def reads(self) -> list[tuple[str, str]]:
        return [("code_field", self.cfg.code_field)]   # the tests are optional

    async def _score(self, code: str, regenerated: Optional[str],
                     tests: Optional[str]) -> tuple[float, Optional[bool], float]:
        """(similarity, tests passed or None without tests, fidelity) of a regeneration."""
        has_tests = bool(tests and tests.strip())
        if regenerated is None:
            similarity, passed = 0.0, False if has_tests else None
        else:
            similarity = code_similarity(code, regenerated)
            passed = (await self.execute(regenerated, tests)).ok if has_tests else None
        w = self.cfg.test_weight
        fidelity = w * float(passed) + (1 - w) * similarity if has_tests else similarity
        return similarity, passed, fidelity

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        code, tests = self.code_and_tests(record, tests_optional=True)
        (instruction,) = await self.ask(ctx, "instruction", dict(record, code=code))
        instruction = instruction.strip()
        if not instruction:
            self.stats["dropped_no_instruction"] += 1
            return []
        (reply,) = await self.ask(ctx, "regenerate",
                                  dict(record, code=code, instruction=instruction))
        regenerated = extract_python(reply)
        similarity, passed, fidelity = await self._score(code, regenerated, tests)
        if fidelity < self.cfg.threshold:
            self.stats["dropped_low_fidelity"] += 1
            return []
        self.stats["kept"] += 1
        out = self.output(record, ctx, regenerated=regenerated, similarity=round(similarity, 6),
                          tests_passed=passed, fidelity=round(fidelity, 6))
        out.update(instruction=instruction, response=code, fidelity=round(fidelity, 6))
        return [out]
