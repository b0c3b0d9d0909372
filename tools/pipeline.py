"""Resumable, crash-safe teacher pipelines: seed records in, sharded JSONL records out.

A pipeline is a YAML file::

    teacher:                      # tools.teacher.TeacherConfig fields
      base_url: https://api.openai.com/v1
      model: gpt-4o
      api_key_env: OPENAI_API_KEY   # the *name* of the variable; the key never reaches a file
    input: data/seeds.jsonl       # one JSON object per line; `id` or a content-hash id
    output: runs/my-pipeline      # the run directory
    shards: 4                     # records-0000k-of-00004.jsonl, by hash of the seed id
    cache: null                   # default <output>/cache.sqlite; a path; or false (no cache)
    concurrency: null             # seeds in flight (default 2x teacher.concurrency)
    stages:
      - {name: answer, type: prompt, template: "Q: {question}\\nA:", n: 4, output_field: answer}
      - {name: nonempty, type: filter, field: answer, min_length: 1}

Relative paths (input, output, cache, template_file) are relative to the working directory.
`load_pipeline` validates everything (one-line `PipelineError` naming the key) before any
network call; `run_pipeline` runs it.

Stages map one record to zero, one or several records (`STAGES` registry: `prompt`,
`filter`; add your own with `@register_stage("name")`). A record is a flat JSON object
whose `id` is derived from its parent's id, the stage name and the choice index
(`<seed id>/<stage>/<i>`), with `provenance = {"seed_id", "stages": [{stage, type,
template_sha256, model, choice, time}, ...]}`. Seed fields are carried along.

Run directory::

    records-00000-of-00004.jsonl ...   output records (only records, nothing else)
    failures.jsonl                     {"seed_id", "stage", "reason", "time"} per failed seed
    usage.json                         requests, cache hits, retries, tokens, cost (cumulative)
    cache.sqlite                       teacher responses (tools.cache), so reruns never pay twice
    state/done.jsonl                   {"seed_id", "status": ok|failed, "records": n} per seed
    state/pipeline.json                fingerprint of shards + stages (reruns must match)
    state/lock                         flock: one runner per run directory

Crash safety (SIGKILL at any instant): records and failures are appended as whole lines,
flushed and fsynced per batch, and only then is the batch's `done` marker line appended and
fsynced. On start, any partial trailing line is truncated from every log, and records or
failures of seeds without a done marker are dropped (rewrite to a temp file + rename), so
those seeds are simply processed again (the teacher cache answers them for free). A seed with
a done marker is skipped. The result is exactly the set of records an uninterrupted run gives.
"""
from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from phijax import config as phijax_config

__all__ = ["PipelineError", "StageError", "Pipeline", "StageSpec", "Stage", "StageContext",
           "STAGES", "register_stage", "load_pipeline", "run_pipeline", "seed_id_of",
           "shard_of", "shard_path", "read_records"]


class PipelineError(Exception):
    """A bad pipeline file or run directory; the message is one line naming the key."""


class StageError(Exception):
    """A stage cannot process a record (e.g. a template field is missing): the seed fails."""


# ---------------------------------------------------------------- records and ids

def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seed_id_of(record: dict) -> str:
    """The seed's `id` (as a string), or `sha256:<16 hex>` of its canonical JSON."""
    if record.get("id") is not None:
        return str(record["id"])
    return "sha256:" + _sha256(_canonical(record))[:16]


def shard_of(seed_id: str, shards: int) -> int:
    return int(_sha256(seed_id)[:16], 16) % shards


def shard_path(output: Path, shard: int, shards: int) -> Path:
    return Path(output) / f"records-{shard:05d}-of-{shards:05d}.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_records(output: str | Path) -> list[dict]:
    """All output records of a run directory (every shard), in file order."""
    out = []
    for p in sorted(Path(output).glob("records-*-of-*.jsonl")):
        out.extend(json.loads(line) for line in p.read_text().splitlines() if line.strip())
    return out


# ---------------------------------------------------------------- stages

@dataclass
class StageSpec:
    name: str
    type: str
    params: dict


@dataclass
class StageContext:
    """What a stage gets besides its record: the shared async teacher and its model name."""
    teacher: Any
    model: str


class Stage:
    """Built once from its YAML params (validated there); `run` maps a record to records.

    Subclasses set `type`, validate in `__init__` (raise PipelineError naming `key`), and
    implement `async run(record, ctx) -> list[dict]`; `fingerprint` goes into the run's
    state so that a changed stage is not silently mixed with old outputs.
    """
    type = ""

    def __init__(self, name: str, params: dict, key: str):
        self.name = name
        self.key = key

    @property
    def fingerprint(self) -> dict:
        return {"name": self.name, "type": self.type}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:  # pragma: no cover
        raise NotImplementedError


StageFn = Callable[[str, dict, str], Stage]   # (name, params, key for errors) -> Stage
STAGES: dict[str, StageFn] = {}


def register_stage(type_name: str):
    def deco(cls):
        cls.type = type_name
        STAGES[type_name] = cls
        return cls
    return deco


def _child(record: dict, stage: Stage, choice: int, **prov) -> dict:
    """A copy of `record` with a derived id and one more provenance entry."""
    out = {k: v for k, v in record.items() if k not in ("id", "provenance")}
    parent = record["provenance"]
    out["id"] = f"{record['id']}/{stage.name}/{choice}"
    entry = {"stage": stage.name, "type": stage.type, "choice": choice, **prov, "time": _now()}
    out["provenance"] = {"seed_id": parent["seed_id"], "stages": parent["stages"] + [entry]}
    return out


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


def _lookup(record: dict, dotted: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def render_template(template: str, record: dict) -> str:
    """Replace `{field}` / `{a.b}` with record values; `{{`/`}}` are literal braces; any
    other brace (JSON, code) is left alone. A missing field raises StageError."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        try:
            value = _lookup(record, m.group(1))
        except KeyError:
            raise StageError(f"template field {m.group(1)!r} is missing from record "
                             f"{record.get('id')!r}") from None
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _PLACEHOLDER.sub(sub, template)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise PipelineError(f"{key}: {msg}")


def _text_param(params: dict, inline: str, file_key: str, key: str,
                required: bool) -> Optional[str]:
    has_inline, has_file = params.get(inline) is not None, params.get(file_key) is not None
    _check(not (has_inline and has_file), f"{key}.{inline}",
           f"give either {inline} or {file_key}, not both")
    if has_inline:
        _check(isinstance(params[inline], str), f"{key}.{inline}", "expected a string")
        return params[inline]
    if has_file:
        _check(isinstance(params[file_key], str), f"{key}.{file_key}", "expected a path")
        p = Path(params[file_key])
        _check(p.is_file(), f"{key}.{file_key}", f"file {p} does not exist")
        return p.read_text()
    _check(not required, f"{key}.{inline}", f"required (or {file_key})")
    return None


@register_stage("prompt")
class PromptStage(Stage):
    """Render a `{field}` template, ask the teacher for `n` samples, emit one record per
    choice with the text under `output_field`.

    params: template | template_file, system | system_file (optional), output_field
    (default "response"), n (1), temperature (1.0), max_tokens, seed, params (extra
    chat-completion parameters, e.g. {top_p: 0.95}).
    """
    KEYS = {"template", "template_file", "system", "system_file", "output_field", "n",
            "temperature", "max_tokens", "seed", "params"}

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        for k in params:
            _check(k in self.KEYS, f"{key}.{k}",
                   f"unknown parameter for a prompt stage (known: {', '.join(sorted(self.KEYS))})")
        self.template = _text_param(params, "template", "template_file", key, required=True)
        self.system = _text_param(params, "system", "system_file", key, required=False)
        self.output_field = params.get("output_field", "response")
        _check(isinstance(self.output_field, str) and self.output_field not in
               ("id", "provenance"), f"{key}.output_field", "expected a field name "
               "(not id/provenance)")
        self.n = params.get("n", 1)
        _check(isinstance(self.n, int) and not isinstance(self.n, bool) and self.n >= 1,
               f"{key}.n", f"expected an integer >= 1, got {self.n!r}")
        self.temperature = params.get("temperature", 1.0)
        _check(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
               and self.temperature >= 0, f"{key}.temperature",
               f"expected a number >= 0, got {self.temperature!r}")
        self.max_tokens = params.get("max_tokens")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens > 0),
               f"{key}.max_tokens", f"expected a positive integer, got {self.max_tokens!r}")
        self.seed = params.get("seed")
        _check(self.seed is None or isinstance(self.seed, int), f"{key}.seed",
               f"expected an integer, got {self.seed!r}")
        self.extra = params.get("params") or {}
        _check(isinstance(self.extra, dict), f"{key}.params", "expected a mapping")
        # Templates are data: their hash goes into provenance and the teacher cache key.
        self.template_sha256 = _sha256(_canonical({"system": self.system,
                                                   "template": self.template}))

    @property
    def fingerprint(self) -> dict:
        return {"name": self.name, "type": self.type, "template_sha256": self.template_sha256,
                "output_field": self.output_field, "n": self.n,
                "temperature": self.temperature, "max_tokens": self.max_tokens,
                "seed": self.seed, "params": self.extra}

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": render_template(self.system, record)})
        messages.append({"role": "user", "content": render_template(self.template, record)})
        texts = await ctx.teacher.chat(messages, n=self.n, temperature=self.temperature,
                                       max_tokens=self.max_tokens, seed=self.seed,
                                       template_version=self.template_sha256[:16], **self.extra)
        return [dict(_child(record, self, i, template_sha256=self.template_sha256,
                            model=ctx.model), **{self.output_field: text})
                for i, text in enumerate(texts)]


@register_stage("filter")
class FilterStage(Stage):
    """Keep a record when `field` satisfies every given condition: equals, not_equals,
    in, not_in, contains, not_contains, regex (re.search), min_length, max_length,
    exists (true/false). A missing field fails every condition but `exists: false`.
    Kept records are unchanged (same id)."""
    CONDITIONS = ("equals", "not_equals", "in", "not_in", "contains", "not_contains", "regex",
                  "min_length", "max_length", "exists")

    def __init__(self, name: str, params: dict, key: str):
        super().__init__(name, params, key)
        for k in params:
            _check(k == "field" or k in self.CONDITIONS, f"{key}.{k}",
                   f"unknown parameter for a filter stage (known: field, "
                   f"{', '.join(self.CONDITIONS)})")
        self.field = params.get("field")
        _check(isinstance(self.field, str) and self.field, f"{key}.field",
               "required: the record field to test")
        self.conds = {k: params[k] for k in self.CONDITIONS if k in params}
        _check(bool(self.conds), f"{key}", f"a filter needs a condition "
               f"({', '.join(self.CONDITIONS)})")
        for k in ("in", "not_in"):
            if k in self.conds:
                _check(isinstance(self.conds[k], list), f"{key}.{k}", "expected a list")
        for k in ("min_length", "max_length"):
            if k in self.conds:
                v = self.conds[k]
                _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{key}.{k}",
                       f"expected an integer >= 0, got {v!r}")
        if "exists" in self.conds:
            _check(isinstance(self.conds["exists"], bool), f"{key}.exists", "expected true/false")
        if "regex" in self.conds:
            try:
                self.regex = re.compile(str(self.conds["regex"]))
            except re.error as e:
                raise PipelineError(f"{key}.regex: invalid regular expression: {e}") from None

    @property
    def fingerprint(self) -> dict:
        return {"name": self.name, "type": self.type, "field": self.field, "conds": self.conds}

    def keep(self, record: dict) -> bool:
        try:
            value = _lookup(record, self.field)
        except KeyError:
            return self.conds.get("exists") is False and len(self.conds) == 1
        c = self.conds
        if c.get("exists") is False:
            return False
        if "equals" in c and value != c["equals"]:
            return False
        if "not_equals" in c and value == c["not_equals"]:
            return False
        if "in" in c and value not in c["in"]:
            return False
        if "not_in" in c and value in c["not_in"]:
            return False
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if "contains" in c and str(c["contains"]) not in text:
            return False
        if "not_contains" in c and str(c["not_contains"]) in text:
            return False
        if "regex" in c and not self.regex.search(text):
            return False
        size = len(value) if isinstance(value, (str, list, dict)) else len(text)
        if "min_length" in c and size < c["min_length"]:
            return False
        if "max_length" in c and size > c["max_length"]:
            return False
        return True

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        return [record] if self.keep(record) else []


# ---------------------------------------------------------------- pipeline config

@dataclass
class Pipeline:
    path: Optional[Path]
    teacher: dict               # TeacherConfig kwargs, validated
    input: Path
    output: Path
    shards: int
    stages: list[Stage]
    cache: Optional[Path]       # None: no cache
    concurrency: int            # seeds in flight
    batch_size: int = 64        # seeds per fsync batch
    flush_interval_s: float = 0.5

    def teacher_config(self):
        from tools.teacher import TeacherConfig
        return TeacherConfig(**self.teacher)

    def fingerprint(self) -> dict:
        return {"shards": self.shards, "stages": [s.fingerprint for s in self.stages]}


TOP_KEYS = ("teacher", "input", "output", "shards", "stages", "cache", "concurrency",
            "batch_size", "flush_interval_s")


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise PipelineError(f"override {dotted}: {part} is not a section")
        node = node.setdefault(part, {})
    if isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
        node[int(parts[-1])] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise PipelineError(f"override {dotted}: not a section")


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`key=value` strings (values parsed as YAML), as for `phijax train`."""
    try:
        return phijax_config.parse_overrides(items)
    except phijax_config.ConfigError as e:
        raise PipelineError(str(e)) from None


def _teacher_kwargs(raw: Any) -> dict:
    _check(isinstance(raw, dict), "teacher", "required: a mapping of TeacherConfig fields "
           "(base_url, model, ...)")
    from tools.teacher import TeacherConfig
    fields = {f.name: f for f in dataclasses.fields(TeacherConfig)}
    out = {}
    for k, v in raw.items():
        if k not in fields:
            raise PipelineError(f"teacher.{k}: unknown field (known: {', '.join(fields)})")
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            _check(isinstance(v, bool), f"teacher.{k}", f"expected true/false, got {v!r}")
        elif isinstance(default, int) and v is not None:
            _check(isinstance(v, int) and not isinstance(v, bool), f"teacher.{k}",
                   f"expected an integer, got {v!r}")
        elif isinstance(default, float) and v is not None:
            _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"teacher.{k}",
                   f"expected a number, got {v!r}")
            v = float(v)
        elif isinstance(default, str) or k in ("base_url", "model"):
            _check(isinstance(v, str) and v, f"teacher.{k}", f"expected a non-empty string, "
                   f"got {v!r}")
        elif v is not None and k in ("requests_per_minute", "tokens_per_minute"):
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                   f"teacher.{k}", f"expected a positive number, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise PipelineError(f"teacher.{k}: must be >= 0, got {v!r}")
        out[k] = v
    for k, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _check(k in out, f"teacher.{k}", "required")
    if "concurrency" in out:
        _check(out["concurrency"] >= 1, "teacher.concurrency", "must be >= 1")
    try:
        TeacherConfig(**out)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"teacher: {str(e).splitlines()[0]}") from None
    return out


def load_pipeline(path: str | Path | None = None, overrides: list[str] = (),
                  raw: Optional[dict] = None) -> Pipeline:
    """Parse and validate a pipeline (YAML file and/or a dict, plus dotted overrides)."""
    if raw is None:
        raw = {}
        if path is None:
            raise PipelineError("pipeline: give a YAML file")
        p = Path(path)
        if not p.is_file():
            raise PipelineError(f"pipeline file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PipelineError(f"pipeline file {p}: invalid YAML: "
                                f"{str(e).splitlines()[0]}") from None
    else:
        raw = json.loads(json.dumps(raw))  # private copy
    if not isinstance(raw, dict):
        raise PipelineError(f"pipeline: expected a mapping with keys {', '.join(TOP_KEYS)}")
    for k, v in parse_overrides(list(overrides)):
        _set_dotted(raw, k, v)
    for k in raw:
        _check(k in TOP_KEYS, str(k), f"unknown key (known: {', '.join(TOP_KEYS)})")

    teacher = _teacher_kwargs(raw.get("teacher"))

    inp = raw.get("input")
    _check(isinstance(inp, str) and inp, "input", "required: path of a JSONL file of seed "
           "records")
    _check(Path(inp).is_file(), "input", f"file {inp} does not exist")
    out = raw.get("output")
    _check(isinstance(out, str) and out, "output", "required: path of the run directory")
    _check(not Path(out).exists() or Path(out).is_dir(), "output", f"{out} is not a directory")

    shards = raw.get("shards", 1)
    _check(isinstance(shards, int) and not isinstance(shards, bool) and 1 <= shards <= 99999,
           "shards", f"expected an integer in [1, 99999], got {shards!r}")

    cache = raw.get("cache")
    if cache is None or cache is True:
        cache_path: Optional[Path] = Path(out) / "cache.sqlite"
    elif cache is False:
        cache_path = None
    else:
        _check(isinstance(cache, str) and cache, "cache", "expected a path, null or false")
        cache_path = Path(cache)

    conc = raw.get("concurrency")
    if conc is None:
        conc = 2 * int(teacher.get("concurrency", 64))
    _check(isinstance(conc, int) and not isinstance(conc, bool) and conc >= 1, "concurrency",
           f"expected an integer >= 1, got {conc!r}")
    batch = raw.get("batch_size", 64)
    _check(isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1, "batch_size",
           f"expected an integer >= 1, got {batch!r}")
    interval = raw.get("flush_interval_s", 0.5)
    _check(isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0,
           "flush_interval_s", f"expected a number > 0, got {interval!r}")

    stages_raw = raw.get("stages")
    _check(isinstance(stages_raw, list) and stages_raw, "stages",
           "required: a non-empty list of {name, type, ...params}")
    stages: list[Stage] = []
    names: set[str] = set()
    for i, s in enumerate(stages_raw):
        key = f"stages[{i}]"
        _check(isinstance(s, dict), key, "expected a mapping {name, type, ...params}")
        params = dict(s)
        name, typ = params.pop("name", None), params.pop("type", None)
        _check(isinstance(typ, str) and typ, f"{key}.type",
               f"required (known: {', '.join(sorted(STAGES))})")
        _check(typ in STAGES, f"{key}.type",
               f"unknown stage type {typ!r} (known: {', '.join(sorted(STAGES))})")
        if name is None:
            name = typ
        _check(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None,
               f"{key}.name", f"expected a name of letters, digits, _ . -; got {name!r}")
        _check(name not in names, f"{key}.name", f"duplicate stage name {name!r}")
        names.add(name)
        stages.append(STAGES[typ](name, params, key))

    return Pipeline(path=Path(path) if path else None, teacher=teacher, input=Path(inp),
                    output=Path(out), shards=shards, stages=stages, cache=cache_path,
                    concurrency=conc, batch_size=batch, flush_interval_s=float(interval))


# ---------------------------------------------------------------- crash-safe logs

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _truncate_partial_line(path: Path) -> int:
    """Cut a trailing line that has no newline (a write interrupted by a crash); returns the
    number of bytes dropped."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # scan backwards for the last newline
        pos, chunk = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            j = buf.rfind(b"\n")
            if j >= 0:
                keep = start + j + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_jsonl(path: Path) -> list[tuple[bytes, dict]]:
    out = []
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise PipelineError(f"output: {path}:{n} is not valid JSON (edit or remove "
                                    f"the line, then rerun)") from None
            out.append((line, obj))
    return out


def _filter_log(path: Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite `path` keeping lines where keep(obj); returns the number dropped."""
    lines = _read_jsonl(path)
    kept = [line for line, obj in lines if keep(obj)]
    if len(kept) != len(lines):
        _atomic_write(path, b"".join(kept))
    return len(lines) - len(kept)


# Fault injection for the crash tests: TOOLS_PIPELINE_CRASH="<point>:<n>" SIGKILLs this process
# the n-th time it reaches <point>: "torn" (half of a records batch written), "records" (records
# fsynced, done markers not yet written) or "done" (done markers written). Unset: no effect.
_CRASH = os.environ.get("TOOLS_PIPELINE_CRASH", "")
_crash_counts: dict[str, int] = {}


def _crashpoint(point: str) -> bool:
    if not _CRASH or not _CRASH.startswith(point + ":"):
        return False
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    return _crash_counts[point] >= int(_CRASH.split(":", 1)[1])


def _die() -> None:
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


class RunDir:
    """The run directory's files; all appends are whole lines, fsynced per batch."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.root = pipe.output
        self.state = self.root / "state"
        self.done_path = self.state / "done.jsonl"
        self.failures_path = self.root / "failures.jsonl"
        self.usage_path = self.root / "usage.json"
        self.shard_paths = [shard_path(self.root, k, pipe.shards) for k in range(pipe.shards)]
        self._lock_fd: Optional[int] = None
        self._files: dict[Path, Any] = {}
        self.done: dict[str, str] = {}      # seed id -> "ok" | "failed"
        self.records_written = 0
        self.base_usage: dict = {}

    # -- open / recover
    def open(self, retry_failed: bool = False) -> dict:
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(str(self.state / "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise PipelineError(f"output: another run is using {self.root}") from None

        fp_path = self.state / "pipeline.json"
        fp = self.pipe.fingerprint()
        if fp_path.exists():
            old = json.loads(fp_path.read_text())
            if old != fp:
                what = "shards" if old.get("shards") != fp["shards"] else "stages"
                raise PipelineError(f"output: {self.root} holds a run of a different pipeline "
                                    f"({what} changed); use a new output directory")
        else:
            _atomic_write(fp_path, (json.dumps(fp, indent=1) + "\n").encode())

        stats = {"truncated_bytes": 0, "dropped_records": 0, "dropped_failures": 0}
        for p in [self.done_path, self.failures_path, *self.shard_paths]:
            stats["truncated_bytes"] += _truncate_partial_line(p)
        for other in self.root.glob("records-*-of-*.jsonl"):
            if other not in self.shard_paths:  # cannot happen with a matching fingerprint
                raise PipelineError(f"output: {other} belongs to a run with another shard count")

        if retry_failed:
            _filter_log(self.done_path, lambda o: o.get("status") != "failed")
        for _, obj in _read_jsonl(self.done_path):
            self.done[obj["seed_id"]] = obj["status"]

        # Drop outputs of seeds without a done marker (a crash between the two writes),
        # and any duplicate (defensive: cannot happen when markers follow their records).
        for p in self.shard_paths:
            seen: set[str] = set()

            def keep(o, seen=seen):
                ok = (self.done.get(o.get("provenance", {}).get("seed_id")) == "ok"
                      and o.get("id") not in seen)
                seen.add(o.get("id"))
                self.records_written += ok
                return ok
            stats["dropped_records"] += _filter_log(p, keep)
        seen_f: set[str] = set()

        def keep_f(o):
            ok = self.done.get(o.get("seed_id")) == "failed" and o.get("seed_id") not in seen_f
            seen_f.add(o.get("seed_id"))
            return ok
        stats["dropped_failures"] = _filter_log(self.failures_path, keep_f)

        if self.usage_path.exists():
            try:
                self.base_usage = json.loads(self.usage_path.read_text()).get("total", {})
            except (json.JSONDecodeError, AttributeError):
                self.base_usage = {}
        return stats

    def _append(self, path: Path, lines: list[bytes]) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "ab")
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())

    def commit(self, batch: list[tuple[str, list[dict], Optional[dict]]],
               scrub: Callable[[bytes], bytes]) -> None:
        """Write a batch of finished seeds: records and failures first, then done markers."""
        if not batch:
            return
        per_shard: dict[int, list[bytes]] = {}
        failures: list[bytes] = []
        markers: list[bytes] = []
        for seed_id, records, failure in batch:
            if failure is not None:
                failures.append(scrub((_canonical(failure) + "\n").encode()))
                markers.append((_canonical({"seed_id": seed_id, "status": "failed"}) +
                                "\n").encode())
            else:
                k = shard_of(seed_id, self.pipe.shards)
                per_shard.setdefault(k, []).extend(
                    scrub((json.dumps(r, ensure_ascii=False) + "\n").encode())
                    for r in records)
                markers.append((_canonical({"seed_id": seed_id, "status": "ok",
                                            "records": len(records), "shard": k}) +
                                "\n").encode())
        for k, lines in per_shard.items():
            if _CRASH and _crashpoint("torn"):
                data = b"".join(lines)
                self._append(self.shard_paths[k], [data[: len(data) // 2 + 1]])
                _die()
            self._append(self.shard_paths[k], lines)
        if failures:
            self._append(self.failures_path, failures)
        if _CRASH and _crashpoint("records"):
            _die()
        self._append(self.done_path, markers)   # only now are these seeds done
        if _CRASH and _crashpoint("done"):
            _die()
        for seed_id, records, failure in batch:
            self.done[seed_id] = "failed" if failure is not None else "ok"
            if failure is None:
                self.records_written += len(records)

    def write_usage(self, usage: dict, extra: dict, scrub: Callable[[bytes], bytes]) -> None:
        total = dict(self.base_usage)
        for k, v in usage.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
        doc = {"total": total, "this_run": usage, **extra, "updated": _now()}
        _atomic_write(self.usage_path, scrub((json.dumps(doc, indent=1) + "\n").encode()))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


# ---------------------------------------------------------------- running

def _iter_seeds(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"input: {path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise PipelineError(f"input: {path}:{n}: expected a JSON object")
            yield n, obj


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


async def process_seed(pipe: Pipeline, seed: dict, seed_id: str,
                       ctx: StageContext) -> tuple[list[dict], Optional[dict]]:
    """Run every stage; returns (records, None) or ([], failure record)."""
    from tools.teacher import TeacherError
    rec = {k: v for k, v in seed.items() if k not in ("id", "provenance")}
    rec["id"] = seed_id
    rec["provenance"] = {"seed_id": seed_id, "stages": []}
    records = [rec]
    for stage in pipe.stages:
        try:
            outs = await asyncio.gather(*(stage.run(r, ctx) for r in records))
        except (TeacherError, StageError) as e:
            reason = f"{type(e).__name__}: {str(e).strip()}"
            return [], {"seed_id": seed_id, "stage": stage.name, "reason": reason,
                        "time": _now()}
        records = [o for out in outs for o in out]
        if not records:
            break
    return records, None


def _make_scrub(secret: Optional[str]) -> Callable[[bytes], bytes]:
    if not secret or len(secret) < 4:
        return lambda b: b
    s = secret.encode()
    return lambda b: b.replace(s, b"***") if s in b else b


async def run_pipeline(pipe: Pipeline, *, progress: bool = True, retry_failed: bool = False,
                       teacher: Any = None, log: Callable[[str], None] = None) -> dict:
    """Run (or resume) a pipeline; returns a summary dict. `teacher` overrides the Teacher
    built from `pipe.teacher` (tests, custom clients)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run = RunDir(pipe)
    cache = None
    own_teacher = teacher is None
    try:
        stats = run.open(retry_failed=retry_failed)
        if stats["truncated_bytes"] or stats["dropped_records"] or stats["dropped_failures"]:
            log(f"resume: truncated {stats['truncated_bytes']} bytes of partial lines, dropped "
                f"{stats['dropped_records']} records and {stats['dropped_failures']} failures "
                f"of unfinished seeds")
        total = _count_lines(pipe.input)
        already = len(run.done)
        cfg = pipe.teacher_config()
        api_key = os.environ.get(getattr(cfg, "api_key_env", "") or "", None)
        scrub = _make_scrub(api_key)
        if own_teacher:
            from tools.teacher import Teacher
            if pipe.cache is not None:
                from tools.cache import Cache
                cache = Cache(pipe.cache)
            teacher = Teacher(cfg, cache=cache)
        ctx = StageContext(teacher=teacher, model=cfg.model)

        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=already, unit="seed", dynamic_ncols=True,
                       smoothing=0.1, desc=pipe.output.name)
        counts = {"ok": 0, "failed": 0, "skipped": 0, "duplicate": 0}
        failed_before = sum(1 for v in run.done.values() if v == "failed")
        pending: list[tuple[str, list[dict], Optional[dict]]] = []
        last_postfix = [0.0]

        def usage_extra() -> dict:
            n_failed = sum(1 for v in run.done.values() if v == "failed")
            return {"seeds_done": len(run.done) - n_failed, "seeds_failed": n_failed,
                    "records": run.records_written}

        def flush() -> None:
            if pending:
                batch = pending[:]
                pending.clear()
                run.commit(batch, scrub)
                run.write_usage(dict(teacher.usage), usage_extra(), scrub)

        def postfix(force: bool = False) -> None:
            if bar is None:
                return
            t = time.monotonic()
            if not force and t - last_postfix[0] < 0.25:
                return
            last_postfix[0] = t
            u = teacher.usage
            tokens = int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0))
            bar.set_postfix(failed=failed_before + counts["failed"], tokens=tokens, cost=f"${u.get('cost', 0.0):.4f}",
                cached=u.get("cache_hits", 0), refresh=False)

        seen: set[str] = set()
        seeds = _iter_seeds(pipe.input)
        stop = asyncio.Event()

        def next_seed() -> Optional[tuple[str, dict]]:
            for _, obj in seeds:
                sid = seed_id_of(obj)
                if sid in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(sid)
                if sid in run.done:
                    counts["skipped"] += 1
                    continue
                return sid, obj
            return None

        async def worker() -> None:
            while True:
                item = next_seed()
                if item is None:
                    return
                sid, obj = item
                records, failure = await process_seed(pipe, obj, sid, ctx)
                pending.append((sid, records, failure))
                counts["failed" if failure else "ok"] += 1
                if bar is not None:
                    bar.update(1)
                    postfix()
                if len(pending) >= pipe.batch_size:
                    flush()

        async def flusher() -> None:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), pipe.flush_interval_s)
                except asyncio.TimeoutError:
                    pass
                flush()

        flush_task = asyncio.create_task(flusher())
        t0 = time.monotonic()
        try:
            workers = [asyncio.create_task(worker()) for _ in range(pipe.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        finally:
            stop.set()
            flush_task.cancel()
            await asyncio.gather(flush_task, return_exceptions=True)
            flush()   # whatever finished, even on error / Ctrl-C
            run.write_usage(dict(teacher.usage), usage_extra(), scrub)
            if bar is not None:
                postfix(force=True)
                bar.close()
        n_failed = sum(1 for v in run.done.values() if v == "failed")
        summary = {"seeds": len(run.done), "seeds_ok": len(run.done) - n_failed,
                   "seeds_failed": n_failed, "records": run.records_written,
                   "this_run": {"ok": counts["ok"], "failed": counts["failed"],
                                "skipped": counts["skipped"],
                                "duplicate_ids": counts["duplicate"],
                                "seconds": round(time.monotonic() - t0, 3)},
                   "usage": dict(teacher.usage), "output": str(pipe.output)}
        if counts["duplicate"]:
            log(f"input: {counts['duplicate']} seeds repeat an earlier seed id and were skipped")
        return summary
    finally:
        if own_teacher and teacher is not None:
            await teacher.aclose()
        if cache is not None:
            cache.close()
        run.close()
