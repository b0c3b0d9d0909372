"""What a pipeline stage is: a typed config, a registry of stage types, and the record helpers
every stage uses (field lookup, prompt templates, child ids and provenance).

A stage type is a `Stage` subclass registered with `@register_stage("name")`. Its `Config` is a
dataclass of its parameters (a subclass of `StageConfig`, which adds the keys `name` and `type`
that every stage has), loaded by `phijax.config.from_dict`: an unknown key, a wrong type or an
out-of-range value fails with one line naming the key (`stages[2].temperature`). A stage is
built once from its config, `Stage(cfg, key)`, where checks that span fields or read files raise
`PipelineError` naming `key`; then `async run(record, ctx)` maps one record to zero, one or
several records. A stage also says which record fields it reads (`reads`), which it adds
(`adds`) and which prompt templates it renders (`prompt_templates`), so that a pipeline checks
every field name against the seed records and the stages before it, ahead of any request.

Records are flat JSON objects. A stage's output record (`child_record`) keeps its parent's
fields, gets the id `<parent id>/<stage name>/<choice>` and one more entry
`{stage, type, choice, ..., time}` in `provenance.stages`; `provenance.seed_id` names the seed.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from phijax.config import check_fields, from_dict
from phijax.errors import ConfigError, UserError
from phijax.hashing import canonical_json

RESERVED = ("id", "provenance")   # record fields the pipeline owns


class PipelineError(ConfigError):
    """A bad pipeline file, stage parameter or run directory; the message is one line naming
    the key."""


class PipelineFailed(UserError):
    """A run ended with more of its seeds failed than `max_failed_fraction` allows (or all of
    them); the message is one line with the counts by cause, `summary` the run's summary."""

    def __init__(self, message: str, summary: Optional[dict] = None):
        super().__init__(message)
        self.summary = summary or {}


class StageError(Exception):
    """A stage cannot process a record (e.g. a template field is missing): the seed fails."""


@dataclass
class StageContext:
    """What a stage gets besides its record: the shared async teacher and its model name."""
    teacher: Any
    model: str


# ---------------------------------------------------------------- declaring parameters

def record_field(default: Any = dataclasses.MISSING, *,
                 factory: Any = dataclasses.MISSING) -> Any:
    """A parameter naming a record field (or a list of them); `id` and `provenance` are not
    allowed, the pipeline owns them."""
    return field(default=default, default_factory=factory, metadata={"record_field": True})


def opt_in() -> Any:
    """A switch, off by default, left out of the stage's fingerprint while off: turning it on
    makes another pipeline, while adding it left earlier run directories resumable."""
    return field(default=False, metadata={"opt_in": True})


def file_field(default: Any = None, hint: str = "") -> Any:
    """A parameter naming a file that must exist; the fingerprint holds what the stage read from
    it (a content hash), not its path. `hint` (with `{path}`) says how to make a missing one."""
    return field(default=default, metadata={"file": True, "hint": hint})


@dataclass(kw_only=True)
class StageConfig:
    type: str
    name: Optional[str] = None   # letters, digits, _ . -; default: the type


def _check_declared(cfg: StageConfig, key: str) -> None:
    """The checks `record_field` and `file_field` declare."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("record_field"):
            names = value if isinstance(value, list) else [value]
            if not names or not all(isinstance(v, str) and v and v not in RESERVED
                                    for v in names):
                raise PipelineError(f"{key}.{f.name}: expected a record field name"
                                    f"{' or a list of them' if isinstance(value, list) else ''}"
                                    f" (not {' or '.join(RESERVED)}), got {value!r}")
        if f.metadata.get("file") and value is not None and not Path(value).is_file():
            hint = f.metadata.get("hint", "").format(path=value)
            raise PipelineError(f"{key}.{f.name}: file {value} does not exist"
                                + (f"; {hint}" if hint else ""))


# ---------------------------------------------------------------- stages and their registry

class Stage:
    """A stage built from its typed config; subclasses set `Config` and implement `run`.

    `stats` counts what the stage did in this process (kept, dropped_..., by the stage's own
    names); the records are the durable output. `hashes` holds the content hashes of what the
    stage read from files (templates, an index, a model); with the config's other values they
    make up the `fingerprint` kept in the run directory, so that a changed stage is not mixed
    with old outputs.
    """
    type = ""
    Config = StageConfig   # the dataclass of the stage type's parameters
    ADDS: tuple[str, ...] = ()   # the record fields the stage's output records gain

    def __init__(self, cfg: StageConfig, key: str):
        _check_declared(cfg, key)
        self.cfg = cfg
        self.name = cfg.name or self.type
        self.key = key
        self.hashes: dict[str, str] = {}
        self.stats: Counter = Counter()

    @classmethod
    def config_from(cls, raw: dict, key: str) -> StageConfig:
        """The typed config of one `stages[i]` mapping, every declared range checked."""
        cfg = from_dict(cls.Config, raw, key)
        check_fields(cfg, key)
        return cfg

    def params(self) -> dict:
        """The config's values that decide the stage's output (file paths left out: `hashes`
        stands for their content; `opt_in` switches while off)."""
        return {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg)
                if not f.metadata.get("file")
                and not (f.metadata.get("opt_in") and not getattr(self.cfg, f.name))}

    def reads(self) -> list[tuple[str, str]]:
        """(parameter, record field) for each field a record must have for this stage: by
        default every `record_field` parameter."""
        out = []
        for f in dataclasses.fields(self.cfg):
            if f.metadata.get("record_field"):
                value = getattr(self.cfg, f.name)
                out += [(f.name, v) for v in (value if isinstance(value, list) else [value])]
        return out

    def adds(self) -> list[str]:
        """The record fields this stage's output records have beyond its input's."""
        return list(self.ADDS)

    def prompt_templates(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(where, text, names) for each prompt template the stage renders: `where` names it
        after the stage key (`template`, `critique_file: PATH`), `names` are what the stage
        adds to the record for it (`{question}`, `{critique}`, ...)."""
        return []

    @property
    def fingerprint(self) -> dict:
        return json.loads(canonical_json({**self.params(), "name": self.name, "type": self.type,
                                          **self.hashes}))

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:  # pragma: no cover
        raise NotImplementedError


STAGES: dict[str, type[Stage]] = {}


def register_stage(type_name: str):
    """Class decorator: make a `Stage` subclass the stage type `type_name` of pipeline files."""
    def deco(cls: type[Stage]) -> type[Stage]:
        cls.type = type_name
        STAGES[type_name] = cls
        return cls
    return deco


# ---------------------------------------------------------------- records

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def lookup(record: dict, dotted: str) -> Any:
    """The value at a dotted path (`a.b`, `answers.0.text`) of a record; KeyError if absent."""
    node: Any = record
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def get_field(record: dict, dotted: str) -> Any:
    """`lookup`, with a missing field failing the seed (StageError)."""
    try:
        return lookup(record, dotted)
    except KeyError:
        raise StageError(f"field {dotted!r} is missing from record {record.get('id')!r}") from None


def get_text(record: dict, dotted: str) -> str:
    """A field that must hold a string (StageError otherwise)."""
    value = get_field(record, dotted)
    if not isinstance(value, str):
        raise StageError(f"field {dotted!r} of record {record.get('id')!r} is not a string")
    return value


def child_record(record: dict, stage: Stage, choice: int, **prov) -> dict:
    """A copy of `record` with the id `<id>/<stage>/<choice>` and one more provenance entry."""
    out = {k: v for k, v in record.items() if k not in RESERVED}
    parent = record["provenance"]
    out["id"] = f"{record['id']}/{stage.name}/{choice}"
    entry = {"stage": stage.name, "type": stage.type, "choice": choice, **prov, "time": now()}
    out["provenance"] = {"seed_id": parent["seed_id"], "stages": parent["stages"] + [entry]}
    return out


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


def template_fields(template: str) -> list[str]:
    """The field names a template's placeholders use (`{a.b}` -> "a.b"), in order."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1)]


def template_literal(template: str) -> str:
    """The template's own text: placeholders left out, `{{`/`}}` as single braces."""
    return _PLACEHOLDER.sub(lambda m: m.group(0)[0] if not m.group(1) else "", template)


def render_template(template: str, record: dict) -> str:
    """Replace `{field}` / `{a.b}` with record values; `{{`/`}}` are literal braces; any
    other brace (JSON, code) is left alone. A missing field raises StageError."""
    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        try:
            value = lookup(record, m.group(1))
        except KeyError:
            raise StageError(f"template field {m.group(1)!r} is missing from record "
                             f"{record.get('id')!r}") from None
        return as_text(value)
    return _PLACEHOLDER.sub(sub, template)


def as_text(value: Any) -> str:
    """A field's value as text: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
