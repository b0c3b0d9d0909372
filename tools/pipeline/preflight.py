"""What a pipeline checks before its first request, each mistake one line naming the stage key.

* `check_record_fields` (when the pipeline is loaded, no network): every record field a stage
  reads (`field: ...`) and every `{field}` of its prompt templates must be a field of the
  records it gets: the first seed record's fields, plus those the earlier stages add, plus (in
  a template) the names the stage itself provides (`{question}`, `{critique}`, ...).
* `check_endpoint` (when the run starts): the endpoint's model card (`GET {base_url}/models`;
  a refusal there stops the run as a refused chat request would), and each stage's
  `max_tokens` plus a rough prompt length against the context length it reports.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Optional

from tools.pipeline.rundir import iter_seeds
from tools.pipeline.stage import (RESERVED, PipelineError, Stage, template_fields,
                                  template_literal)

CONTEXT_KEYS = ("max_model_len", "context_length", "max_context_length")   # vLLM's name first


def first_seed(path: Path) -> Optional[dict]:
    """The input's first seed record; None for an empty input."""
    for _, seed in iter_seeds(path):
        return seed
    return None


def _unknown(name: str, known: set[str], quote: str) -> Optional[str]:
    """Why `name` (dotted: its first part counts) is not among `known`; None when it is."""
    if name.split(".")[0] in known:
        return None
    shown = sorted(known - {"provenance"})
    close = difflib.get_close_matches(name, shown, n=1)
    hint = f"; did you mean {quote % close[0]}?" if close else ""
    return f"({', '.join(shown)}){hint}"


def check_record_fields(stages: list[Stage], seed: Optional[dict]) -> None:
    """Each stage's record fields and template placeholders, checked along the stages from the
    first seed record's fields (no seed: nothing to check against)."""
    if seed is None:
        return
    known = set(seed) | set(RESERVED)
    for stage in stages:
        for param, name in stage.reads():
            why = _unknown(name, known, "'%s'")
            if why:
                raise PipelineError(f"{stage.key}.{param}: {name!r} is not a field of the "
                                    f"records this stage gets {why}")
        for where, text, own in stage.prompt_templates():
            for name in template_fields(text):
                why = _unknown(name, known | set(own), "{%s}")
                if why:
                    raise PipelineError(f"{stage.key}.{where}: {{{name}}} is not a field this "
                                        f"template can use {why}")
        known |= set(stage.adds())


def context_length(card: Optional[dict]) -> Optional[int]:
    """The context length a model card reports (vLLM's `max_model_len` and the like)."""
    for key in CONTEXT_KEYS:
        value = (card or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def prompt_estimate(stage: Stage) -> int:
    """A rough lower bound of a stage's prompt tokens: its longest template's own text (the
    fields it fills in not counted) at 4 characters a token, at least 1."""
    chars = max((len(template_literal(text)) for _, text, _ in stage.prompt_templates()),
                default=0)
    return max(1, math.ceil(chars / 4))


async def check_endpoint(stages: list[Stage], teacher: Any) -> Optional[int]:
    """Ask the endpoint for the model's card once and check every stage's `max_tokens` against
    the context length it reports; returns that length (None when unknown). A teacher without
    `model_card` (a test's stand-in) is not asked."""
    ask = getattr(teacher, "model_card", None)
    if ask is None:
        return None
    limit = context_length(await ask())
    if limit is None:
        return None
    for stage in stages:
        max_tokens = getattr(stage.cfg, "max_tokens", None)
        if max_tokens is None or not stage.prompt_templates():
            continue
        prompt = prompt_estimate(stage)
        if max_tokens + prompt > limit:
            cfg = teacher.cfg
            raise PipelineError(f"{stage.key}.max_tokens: {max_tokens} (plus ~{prompt} for the "
                                f"prompt) exceeds the context length {limit} of model "
                                f"{cfg.model!r} at {cfg.base_url}")
    return limit
