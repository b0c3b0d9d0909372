"""The two general stages: `prompt` (ask the teacher with a template of your own) and `filter`
(keep records whose field meets conditions)."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from phijax.config import positive, ranged
from phijax.errors import ConfigError
from phijax.hashing import canonical_json, sha256_hex
from tools.pipeline.stage import (PipelineError, Stage, StageConfig, StageContext, as_text,
                                  child_record, file_field, lookup, record_field,
                                  register_stage, render_template)
from tools.stages.templated import SamplingConfig, sample


@dataclass(kw_only=True)
class PromptConfig(SamplingConfig):
    template: Optional[str] = None        # `{field}` placeholders; or template_file
    template_file: Optional[str] = file_field()
    system: Optional[str] = None          # a system message (template too); or system_file
    system_file: Optional[str] = file_field()
    output_field: str = record_field("response")
    n: int = positive(1)                  # samples: one output record each


def looks_like_path(text: str) -> bool:
    """One line without `{` that names an existing file or ends like a template file's name."""
    t = text.strip()
    if not t or "\n" in t or "{" in t or len(t) > 1024:
        return False
    return t.lower().endswith((".txt", ".md", ".jinja", ".j2")) or Path(t).is_file()


def _text(cfg: PromptConfig, inline: str, key: str) -> Optional[str]:
    text, path = getattr(cfg, inline), getattr(cfg, f"{inline}_file")
    if text is not None and path is not None:
        raise PipelineError(f"{key}.{inline}: give either {inline} or {inline}_file, not both")
    if text is not None and looks_like_path(text):
        raise PipelineError(f"{key}.{inline}: {text!r} looks like a file path, not a template; "
                            f"use {inline}_file to read a template from a file")
    return Path(path).read_text() if path is not None else text


@register_stage("prompt")
class PromptStage(Stage):
    """Render the template over the record, ask the teacher for `n` samples and emit one record
    per sample with the text under `output_field` (ids end in /0 ... /n-1)."""
    Config = PromptConfig

    def __init__(self, cfg: PromptConfig, key: str):
        super().__init__(cfg, key)
        self.template = _text(cfg, "template", key)
        self.system = _text(cfg, "system", key)
        if self.template is None:
            raise PipelineError(f"{key}.template: required (or template_file)")
        # Templates are data: their hash goes into provenance and the teacher cache key.
        self.template_sha256 = sha256_hex(canonical_json({"system": self.system,
                                                          "template": self.template}))
        self.hashes["template_sha256"] = self.template_sha256

    def reads(self) -> list[tuple[str, str]]:
        return []   # the templates say what it reads; output_field is written

    def adds(self) -> list[str]:
        return [self.cfg.output_field]

    def prompt_templates(self) -> list[tuple[str, str, tuple[str, ...]]]:
        return [(name if getattr(self.cfg, name) is not None else
                 f"{name}_file: {getattr(self.cfg, f'{name}_file')}", text, ())
                for name, text in (("system", self.system), ("template", self.template))
                if text is not None]

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": render_template(self.system, record)})
        messages.append({"role": "user", "content": render_template(self.template, record)})
        texts = await sample(ctx, self.cfg, messages, self.template_sha256[:16], n=self.cfg.n)
        return [dict(child_record(record, self, i, template_sha256=self.template_sha256,
                                  model=ctx.model), **{self.cfg.output_field: text})
                for i, text in enumerate(texts)]


class _Unset(enum.Enum):
    UNSET = "unset"   # `equals: null` tests for null; a condition not given is UNSET


UNSET = _Unset.UNSET


@dataclass(kw_only=True)
class FilterConfig(StageConfig):
    field: str                            # the record field tested (dotted: a.b, list.0)
    equals: Any = UNSET
    not_equals: Any = UNSET
    in_: Optional[list] = None            # `in:` in the file (a keyword in Python)
    not_in: Optional[list] = None
    contains: Any = None                  # substring of the value (as JSON unless a string)
    not_contains: Any = None
    regex: Optional[str] = None           # re.search on the value (as JSON unless a string)
    min_length: Optional[int] = ranged(None, ge=0)   # of a string, list or mapping
    max_length: Optional[int] = ranged(None, ge=0)
    exists: Optional[bool] = None


CONDITIONS = ("equals", "not_equals", "in", "not_in", "contains", "not_contains", "regex",
              "min_length", "max_length", "exists")


@register_stage("filter")
class FilterStage(Stage):
    """Keep a record when `field` satisfies every condition given: equals, not_equals, in,
    not_in, contains, not_contains, regex (re.search), min_length, max_length, exists (true or
    false). A missing field fails every condition but `exists: false`. Kept records are
    unchanged (same id)."""
    Config = FilterConfig

    @classmethod
    def config_from(cls, raw: dict, key: str) -> FilterConfig:
        raw = {("in_" if k == "in" else k): v for k, v in raw.items()}
        try:
            return super().config_from(raw, key)
        except ConfigError as e:
            raise PipelineError(str(e).replace(f"{key}.in_", f"{key}.in")) from None

    def __init__(self, cfg: FilterConfig, key: str):
        super().__init__(cfg, key)
        self.conds = {k: getattr(cfg, "in_" if k == "in" else k) for k in CONDITIONS}
        self.conds = {k: v for k, v in self.conds.items()
                      if v is not UNSET and (v is not None or k.endswith("equals"))}
        if not self.conds:
            raise PipelineError(f"{key}: a filter needs a condition ({', '.join(CONDITIONS)})")
        if cfg.regex is not None:
            try:
                self.regex = re.compile(cfg.regex)
            except re.error as e:
                raise PipelineError(f"{key}.regex: invalid regular expression: {e}") from None

    def params(self) -> dict:
        return {"field": self.cfg.field, "conds": self.conds}

    def reads(self) -> list[tuple[str, str]]:
        return [] if "exists" in self.conds else [("field", self.cfg.field)]

    def keep(self, record: dict) -> bool:
        c = self.conds
        try:
            value = lookup(record, self.cfg.field)
        except KeyError:
            return c.get("exists") is False and len(c) == 1
        text = as_text(value)
        size = len(value) if isinstance(value, (str, list, dict)) else len(text)
        tests = {"exists": lambda want: want,
                 "equals": lambda want: value == want,
                 "not_equals": lambda want: value != want,
                 "in": lambda want: value in want,
                 "not_in": lambda want: value not in want,
                 "contains": lambda want: str(want) in text,
                 "not_contains": lambda want: str(want) not in text,
                 "regex": lambda want: self.regex.search(text) is not None,
                 "min_length": lambda want: size >= want,
                 "max_length": lambda want: size <= want}
        return all(tests[k](want) for k, want in c.items())

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        return [record] if self.keep(record) else []
