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
    state/done-0000k.jsonl             --executor ray, while it runs: shard k's task's done
    state/failures-0000k.jsonl           markers and failures (folded into done.jsonl and
    state/lock-0000k                     failures.jsonl when the tasks end, or on the next start)

Crash safety (SIGKILL at any instant): records and failures are appended as whole lines,
flushed and fsynced per batch, and only then is the batch's `done` marker line appended and
fsynced. On start, any partial trailing line is truncated from every log, and records or
failures of seeds without a done marker are dropped (rewrite to a temp file + rename), so
those seeds are simply processed again (the teacher cache answers them for free). A seed with
a done marker is skipped. The result is exactly the set of records an uninterrupted run gives.

Executors: `run_pipeline` (local: one process, one async teacher) and `run_pipeline_ray` (one
Ray task per output shard, each the only writer of its shard's files; see "the Ray executor"
below). Both give the same records and leave the same layout; either resumes the other's run.
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
from tools import jsonl

__all__ = ["PipelineError", "StageError", "Pipeline", "StageSpec", "Stage", "StageContext",
           "STAGES", "register_stage", "load_pipeline", "run_pipeline", "run_pipeline_ray",
           "seed_id_of",
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


def render_template(template: str, record: dict) -> str:
    """Replace `{field}` / `{a.b}` with record values; `{{`/`}}` are literal braces; any
    other brace (JSON, code) is left alone. A missing field raises StageError."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        try:
            value = jsonl.lookup(record, m.group(1))
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
            value = jsonl.lookup(record, self.field)
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


def _part_paths(state: Path, kind: str) -> list[Path]:
    """The per-shard logs `state/<kind>-0000k.jsonl` written by Ray shard tasks."""
    return sorted(p for p in state.glob(f"{kind}-*.jsonl")
                  if re.fullmatch(rf"{kind}-\d{{5}}\.jsonl", p.name))


class RunDir:
    """The run directory's files; all appends are whole lines, fsynced per batch.

    `RunDir(pipe)` is the whole run (the local executor, and the Ray driver): it holds
    `state/lock`, appends to `state/done.jsonl` and `failures.jsonl`. `RunDir(pipe, shard=k)`
    is one Ray shard task: it holds `state/lock-0000k`, writes only records-0000k-of-N.jsonl,
    `state/done-0000k.jsonl` and `state/failures-0000k.jsonl` (one writer per file), and reads
    `state/done.jsonl` (which nobody writes while shard tasks run). The whole-run `open()`
    first folds any per-shard logs into done.jsonl / failures.jsonl, so both executors share
    one layout and either can resume the other's run.
    """

    def __init__(self, pipe: Pipeline, shard: Optional[int] = None):
        self.pipe = pipe
        self.shard = shard
        self.root = pipe.output
        self.state = self.root / "state"
        self.main_done_path = self.state / "done.jsonl"
        self.main_failures_path = self.root / "failures.jsonl"
        if shard is None:
            self.done_path = self.main_done_path
            self.failures_path = self.main_failures_path
        else:
            self.done_path = self.state / f"done-{shard:05d}.jsonl"
            self.failures_path = self.state / f"failures-{shard:05d}.jsonl"
        self.usage_path = self.root / "usage.json"
        self.shard_paths = [shard_path(self.root, k, pipe.shards) for k in range(pipe.shards)]
        self._lock_fd: Optional[int] = None
        self._files: dict[Path, Any] = {}
        self.done: dict[str, str] = {}      # seed id -> "ok" | "failed"
        self.records_written = 0
        self.base_usage: dict = {}
        # shard tasks: what this shard's own done log holds (all attempts of this run)
        self.part = {"ok": 0, "failed": 0, "records": 0}

    # -- open / recover
    def _lock(self, name: str, wait_s: float = 0.0) -> None:
        self._lock_fd = os.open(str(self.state / name), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._lock_fd)
                    self._lock_fd = None
                    what = "another run" if self.shard is None else \
                        f"another task of shard {self.shard}"
                    raise PipelineError(f"output: {what} is using {self.root}") from None
                time.sleep(0.1)

    def open(self, retry_failed: bool = False) -> dict:
        if self.shard is not None:
            return self._open_shard()
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock("lock")

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
        parts = _part_paths(self.state, "done") + _part_paths(self.state, "failures")
        for p in [self.done_path, self.failures_path, *self.shard_paths, *parts]:
            stats["truncated_bytes"] += _truncate_partial_line(p)
        for other in self.root.glob("records-*-of-*.jsonl"):
            if other not in self.shard_paths:  # cannot happen with a matching fingerprint
                raise PipelineError(f"output: {other} belongs to a run with another shard count")
        self.consolidate()

        if retry_failed:
            _filter_log(self.done_path, lambda o: o.get("status") != "failed")
        self.done.clear()
        self.records_written = 0
        for _, obj in _read_jsonl(self.done_path):
            self.done[obj["seed_id"]] = obj["status"]

        # Drop outputs of seeds without a done marker (a crash between the two writes),
        # and any duplicate (defensive: cannot happen when markers follow their records).
        for p in self.shard_paths:
            stats["dropped_records"] += self._drop_unmarked_records(p)
        stats["dropped_failures"] = self._drop_unmarked_failures()

        if self.usage_path.exists():
            try:
                self.base_usage = json.loads(self.usage_path.read_text()).get("total", {})
            except (json.JSONDecodeError, AttributeError):
                self.base_usage = {}
        return stats

    def _drop_unmarked_failures(self) -> int:
        """Keep one failure line per seed whose done marker says failed; drop the rest."""
        seen: set[str] = set()

        def keep(o):
            ok = self.done.get(o.get("seed_id")) == "failed" and o.get("seed_id") not in seen
            seen.add(o.get("seed_id"))
            return ok
        return _filter_log(self.failures_path, keep)

    def _drop_unmarked_records(self, p: Path) -> int:
        seen: set[str] = set()

        def keep(o):
            ok = (self.done.get(o.get("provenance", {}).get("seed_id")) == "ok"
                  and o.get("id") not in seen)
            seen.add(o.get("id"))
            self.records_written += ok
            return ok
        return _filter_log(p, keep)

    def consolidate(self) -> int:
        """Fold the per-shard logs of Ray shard tasks (state/done-0000k.jsonl,
        state/failures-0000k.jsonl) into done.jsonl / failures.jsonl, then delete them; only
        while no shard task runs (under `state/lock`). Idempotent: a crash mid-way leaves
        duplicates that are skipped here and dropped by `open`. Returns the markers moved."""
        assert self.shard is None
        moved = 0
        for part in _part_paths(self.state, "done") + _part_paths(self.state, "failures"):
            _truncate_partial_line(part)
        failed = {o["seed_id"] for p in [self.done_path, *_part_paths(self.state, "done")]
                  for _, o in _read_jsonl(p) if o.get("status") == "failed"}
        known_f = {o.get("seed_id") for _, o in _read_jsonl(self.failures_path)}
        for part in _part_paths(self.state, "failures"):   # failures before their markers
            lines = [line for line, o in _read_jsonl(part)
                     if o.get("seed_id") not in known_f and o.get("seed_id") in failed]
            known_f.update(json.loads(line).get("seed_id") for line in lines)
            if lines:
                self._append(self.failures_path, lines)
            part.unlink()
        known = {o["seed_id"]: o["status"] for _, o in _read_jsonl(self.done_path)}
        for part in _part_paths(self.state, "done"):
            new = []
            for line, o in _read_jsonl(part):
                if o["seed_id"] not in known:
                    known[o["seed_id"]] = o["status"]
                    new.append(line)
                    if o["status"] == "ok" and o["seed_id"] not in self.done:
                        self.records_written += int(o.get("records", 0))
                    self.done[o["seed_id"]] = o["status"]
            if new:
                self._append(self.done_path, new)
                moved += len(new)
            part.unlink()
        _fsync_dir(self.state)
        return moved

    def _open_shard(self) -> dict:
        """A shard task's recovery: only its own files (the driver has folded and cleaned the
        rest); a retried task (worker or node died) resumes like a restarted run."""
        k = self.shard
        self._lock(f"lock-{k:05d}", wait_s=60.0)   # a dying earlier attempt may still hold it
        stats = {"truncated_bytes": 0, "dropped_records": 0, "dropped_failures": 0}
        mine = self.shard_paths[k]
        for p in (self.done_path, self.failures_path, mine):
            stats["truncated_bytes"] += _truncate_partial_line(p)
        for _, obj in _read_jsonl(self.main_done_path):
            if shard_of(obj["seed_id"], self.pipe.shards) == k:
                self.done[obj["seed_id"]] = obj["status"]
        for _, obj in _read_jsonl(self.done_path):
            if obj["seed_id"] not in self.done:
                self.part[obj["status"]] += 1
                self.part["records"] += int(obj.get("records", 0))
            self.done[obj["seed_id"]] = obj["status"]
        stats["dropped_records"] = self._drop_unmarked_records(mine)
        stats["dropped_failures"] = self._drop_unmarked_failures()
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
                assert self.shard is None or k == self.shard, (seed_id, k, self.shard)
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
            self.part["failed" if failure is not None else "ok"] += 1
            if failure is None:
                self.records_written += len(records)
                self.part["records"] += len(records)

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
    try:
        yield from jsonl.records(path)
    except ValueError as e:
        raise PipelineError(f"input: {e}") from None


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


async def _run_seeds(pipe: Pipeline, run: RunDir, ctx: StageContext,
                     scrub: Callable[[bytes], bytes], counts: dict, *,
                     select: Optional[Callable[[str], bool]] = None,
                     on_flush: Optional[Callable[[], None]] = None,
                     on_seed: Optional[Callable[[], None]] = None) -> None:
    """Process every seed of the input not yet done in `run` (and, with `select`, only the
    seeds it selects by id), `pipe.concurrency` at a time, committing finished seeds in
    batches; `counts` (ok, failed, skipped, duplicate) is updated in place. Whatever
    finished is committed even on error or cancellation."""
    pending: list[tuple[str, list[dict], Optional[dict]]] = []

    def flush() -> None:
        if pending:
            batch = pending[:]
            pending.clear()
            run.commit(batch, scrub)
            if on_flush is not None:
                on_flush()

    seen: set[str] = set()
    seeds = _iter_seeds(pipe.input)
    stop = asyncio.Event()

    def next_seed() -> Optional[tuple[str, dict]]:
        for _, obj in seeds:
            sid = seed_id_of(obj)
            if select is not None and not select(sid):
                continue
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
            if on_seed is not None:
                on_seed()
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


def _summary(run: RunDir, counts: dict, seconds: float, usage: dict, pipe: Pipeline) -> dict:
    n_failed = sum(1 for v in run.done.values() if v == "failed")
    return {"seeds": len(run.done), "seeds_ok": len(run.done) - n_failed,
            "seeds_failed": n_failed, "records": run.records_written,
            "this_run": {"ok": counts["ok"], "failed": counts["failed"],
                         "skipped": counts["skipped"], "duplicate_ids": counts["duplicate"],
                         "seconds": round(seconds, 3)},
            "usage": dict(usage), "output": str(pipe.output)}


def _usage_extra(run: RunDir) -> dict:
    n_failed = sum(1 for v in run.done.values() if v == "failed")
    return {"seeds_done": len(run.done) - n_failed, "seeds_failed": n_failed,
            "records": run.records_written}


def _set_postfix(bar, failed: int, u: dict) -> None:
    tokens = int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0))
    bar.set_postfix(failed=failed, tokens=tokens, cost=f"${u.get('cost', 0.0):.4f}",
                    cached=u.get("cache_hits", 0), refresh=False)


def _log_resume(stats: dict, log: Callable[[str], None]) -> None:
    if stats["truncated_bytes"] or stats["dropped_records"] or stats["dropped_failures"]:
        log(f"resume: truncated {stats['truncated_bytes']} bytes of partial lines, dropped "
            f"{stats['dropped_records']} records and {stats['dropped_failures']} failures "
            f"of unfinished seeds")


async def run_pipeline(pipe: Pipeline, *, progress: bool = True, retry_failed: bool = False,
                       teacher: Any = None, log: Callable[[str], None] = None) -> dict:
    """Run (or resume) a pipeline; returns a summary dict. `teacher` overrides the Teacher
    built from `pipe.teacher` (tests, custom clients)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run = RunDir(pipe)
    cache = None
    own_teacher = teacher is None
    try:
        _log_resume(run.open(retry_failed=retry_failed), log)
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
        last_postfix = [0.0]

        def postfix(force: bool = False) -> None:
            if bar is None:
                return
            t = time.monotonic()
            if not force and t - last_postfix[0] < 0.25:
                return
            last_postfix[0] = t
            _set_postfix(bar, failed_before + counts["failed"], teacher.usage)

        def on_seed() -> None:
            if bar is not None:
                bar.update(1)
                postfix()

        t0 = time.monotonic()
        try:
            await _run_seeds(pipe, run, ctx, scrub, counts, on_seed=on_seed,
                             on_flush=lambda: run.write_usage(dict(teacher.usage),
                                                              _usage_extra(run), scrub))
        finally:
            run.write_usage(dict(teacher.usage), _usage_extra(run), scrub)
            if bar is not None:
                postfix(force=True)
                bar.close()
        summary = _summary(run, counts, time.monotonic() - t0, teacher.usage, pipe)
        if counts["duplicate"]:
            log(f"input: {counts['duplicate']} seeds repeat an earlier seed id and were skipped")
        return summary
    finally:
        if own_teacher and teacher is not None:
            await teacher.aclose()
        if cache is not None:
            cache.close()
        run.close()


# ---------------------------------------------------------------- the Ray executor
#
# `run_pipeline_ray` (python -m tools run PIPE.yaml --executor ray) runs the same pipeline with
# one Ray task per output shard. The driver holds `state/lock`, recovers the run directory like
# the local executor, scans the input once (duplicate and done seeds, which shards have work)
# and submits a task for each shard with pending seeds. Task k reads the input itself, keeps
# the seeds whose shard is k, and runs them through its own async Teacher (the shared SQLite
# cache in the run directory: WAL, safe across processes and nodes of a POSIX shared
# filesystem) with the local executor's batching; it is the only writer of
# records-0000k-of-N.jsonl, state/done-0000k.jsonl and state/failures-0000k.jsonl (same
# records-then-markers order, so the same crash safety; a task Ray retries after its worker or
# node died recovers its own files first). A progress actor collects each task's done count
# and teacher usage; the driver shows them in a tqdm bar and writes usage.json. At the end the
# driver folds the per-shard logs into state/done.jsonl and failures.jsonl, so the finished run
# directory has the local executor's layout and either executor can resume it.
#
# Each task gets the full teacher.concurrency and pipeline concurrency; requests_per_minute and
# tokens_per_minute are split evenly over the tasks that can run at once (min(tasks, CPUs of
# the cluster)), so the cluster as a whole stays under them. The API key is read from the
# driver's environment and handed to the tasks as an argument (tasks on other nodes do not see
# the driver's environment); a task puts it into its process environment only while it builds
# its Teacher. The tasks import tools.pipeline: on a cluster, install phijax on the nodes.

class _Secret:
    """The API key in transit to a task; never shown in a repr, log or traceback."""

    def __init__(self, value: Optional[str]):
        self.value = value

    def __repr__(self) -> str:
        return "_Secret(***)"


class _Progress:
    """Ray actor: the shard tasks report here; the driver polls `snapshot`."""

    def __init__(self):
        self.part: dict[int, dict] = {}      # shard -> {ok, failed, records} in its done log
        self.usage: dict[str, dict] = {}     # task attempt -> teacher usage

    def update(self, shard: int, part: dict, attempt: str, usage: dict) -> None:
        self.part[shard] = dict(part)
        self.usage[attempt] = dict(usage)

    def snapshot(self) -> dict:
        return {"parts": self.part, "usages": self.usage}


def _sum_usage(usages) -> dict:
    total: dict = {}
    for u in usages:
        for k, v in u.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


async def _run_shard(pipe: Pipeline, shard: int, progress: Any, secret: _Secret) -> dict:
    import uuid
    run = RunDir(pipe, shard=shard)
    cache = teacher = None
    attempt = uuid.uuid4().hex
    try:
        run.open()
        cfg = pipe.teacher_config()
        scrub = _make_scrub(secret.value or os.environ.get(cfg.api_key_env))
        from tools.teacher import Teacher
        if pipe.cache is not None:
            from tools.cache import Cache
            cache = Cache(pipe.cache)
        name = cfg.api_key_env
        old = os.environ.get(name)
        if secret.value:
            os.environ[name] = secret.value
        try:
            teacher = Teacher(cfg, cache=cache)
        finally:
            if secret.value:
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
        ctx = StageContext(teacher=teacher, model=cfg.model)
        counts = {"ok": 0, "failed": 0, "skipped": 0, "duplicate": 0}

        def report() -> None:
            if progress is not None:
                progress.update.remote(shard, run.part, attempt, teacher.usage)

        report()
        try:
            await _run_seeds(pipe, run, ctx, scrub, counts, on_flush=report,
                             select=lambda sid: shard_of(sid, pipe.shards) == shard)
        finally:
            report()
        return {"shard": shard, "part": dict(run.part), "attempt": attempt,
                "usage": dict(teacher.usage)}
    finally:
        if teacher is not None:
            await teacher.aclose()
        if cache is not None:
            cache.close()
        run.close()


def _shard_task(pipe: Pipeline, shard: int, progress: Any, secret: _Secret) -> dict:
    """The body of a Ray task: process the pending seeds of one output shard."""
    return asyncio.run(_run_shard(pipe, shard, progress, secret))


def _absolute(pipe: Pipeline) -> Pipeline:
    """Tasks may run in another working directory (or node): resolve paths on the driver."""
    return dataclasses.replace(
        pipe, input=pipe.input.resolve(), output=pipe.output.resolve(),
        cache=pipe.cache.resolve() if pipe.cache is not None else None)


def _one_line_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip()


def run_pipeline_ray(pipe: Pipeline, *, progress: bool = True, retry_failed: bool = False,
                     num_cpus: Optional[int] = None, task_num_cpus: float = 1.0,
                     poll_s: float = 0.25, log: Callable[[str], None] = None) -> dict:
    """Run (or resume) a pipeline on Ray, one task per output shard; same records, same
    run directory and same summary as `run_pipeline`. Uses the Ray instance this process is
    connected to, else `ray.init()`: the cluster at RAY_ADDRESS, or a new local instance
    with `num_cpus` (default: all) that is shut down at the end."""
    try:
        import ray
    except ImportError:
        raise PipelineError("ray is not installed; pip install ray") from None
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    pipe = _absolute(pipe)
    run = RunDir(pipe)
    started = False
    refs: dict[Any, int] = {}
    try:
        _log_resume(run.open(retry_failed=retry_failed), log)
        cfg = pipe.teacher_config()
        api_key = os.environ.get(cfg.api_key_env) or None
        scrub = _make_scrub(api_key)

        # One pass over the input: duplicates, done seeds, and which shards have work.
        counts = {"ok": 0, "failed": 0, "skipped": 0, "duplicate": 0}
        todo: dict[int, int] = {}
        seen: set[str] = set()
        total = 0
        for _, obj in _iter_seeds(pipe.input):
            total += 1
            sid = seed_id_of(obj)
            if sid in seen:
                counts["duplicate"] += 1
            elif sid in run.done:
                counts["skipped"] += 1
            else:
                k = shard_of(sid, pipe.shards)
                todo[k] = todo.get(k, 0) + 1
            seen.add(sid)
        del seen
        already = len(run.done)
        failed_before = sum(1 for v in run.done.values() if v == "failed")
        base_records = run.records_written

        if todo and not ray.is_initialized():
            try:
                if os.environ.get("RAY_ADDRESS"):   # an existing cluster
                    ray.init(log_to_driver=False)
                else:
                    ray.init(num_cpus=num_cpus or os.cpu_count() or 1,
                             include_dashboard=False, log_to_driver=False)
            except Exception as e:
                raise PipelineError(f"ray: cannot start or connect "
                                    f"({_one_line_error(e)})") from None
            started = True

        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=already, unit="seed", dynamic_ncols=True,
                       smoothing=0.1, desc=pipe.output.name)
        snap: dict = {"part": {"ok": 0, "failed": 0, "records": 0}, "usage": {}}

        def extra() -> dict:
            p = snap["part"]
            n_failed = failed_before + p["failed"]
            return {"seeds_done": already - failed_before + p["ok"], "seeds_failed": n_failed,
                    "records": base_records + p["records"]}

        t0 = time.monotonic()
        actor = None
        parts: dict[int, dict] = {}        # shard -> its done log's {ok, failed, records}
        usages: dict[str, dict] = {}       # task attempt -> teacher usage
        ended = True

        def merge(s: dict) -> None:   # every number only grows: keep the latest = largest
            for src, dst in ((s["parts"], parts), (s["usages"], usages)):
                for key, d in src.items():
                    old = dst.setdefault(key, {})
                    for name, v in d.items():
                        old[name] = max(old.get(name, v), v)
            p = {"ok": 0, "failed": 0, "records": 0}
            for q in parts.values():
                for key in p:
                    p[key] += q.get(key, 0)
            snap["part"], snap["usage"] = p, _sum_usage(usages.values())

        try:
            if todo:
                parallel = max(1, min(len(todo), int(ray.cluster_resources().get("CPU", 1)
                                                       // max(task_num_cpus, 1e-3))))
                teacher_kw = dict(pipe.teacher)
                for key in ("requests_per_minute", "tokens_per_minute"):
                    if teacher_kw.get(key):
                        teacher_kw[key] = teacher_kw[key] / parallel
                task_pipe = dataclasses.replace(pipe, teacher=teacher_kw)
                actor = ray.remote(num_cpus=0)(_Progress).remote()
                task = ray.remote(num_cpus=task_num_cpus, max_retries=3,
                                  retry_exceptions=False)(_shard_task)
                secret = _Secret(api_key)
                ended = False
                for k in sorted(todo, key=lambda k: -todo[k]):   # biggest shards first
                    refs[task.remote(task_pipe, k, actor, secret)] = k
                waiting = list(refs)
                last_usage = 0.0
                error: Optional[BaseException] = None
                try:
                    while waiting:
                        ready, waiting = ray.wait(waiting, num_returns=len(waiting),
                                                  timeout=poll_s)
                        merge(ray.get(actor.snapshot.remote()))
                        for ref in ready:
                            try:
                                res = ray.get(ref)
                                merge({"parts": {res["shard"]: res["part"]},
                                       "usages": {res["attempt"]: res["usage"]}})
                            except Exception as e:   # failed for good: stop the others
                                if error is None:
                                    error = getattr(e, "cause", None) or e
                                    for other in waiting:
                                        ray.cancel(other)
                        if bar is not None:
                            p = snap["part"]
                            _set_postfix(bar, failed_before + p["failed"], snap["usage"])
                            if already + p["ok"] + p["failed"] > bar.n:
                                bar.update(already + p["ok"] + p["failed"] - bar.n)
                        if time.monotonic() - last_usage > 1.0:
                            last_usage = time.monotonic()
                            run.write_usage(snap["usage"], extra(), scrub)
                    ended = True
                except KeyboardInterrupt:
                    for ref in refs:   # tasks commit what they finished, as with Ctrl-C locally
                        ray.cancel(ref)
                    _, left = ray.wait(list(refs), num_returns=len(refs), timeout=30)
                    ended = not left
                    raise
                if error is not None:
                    if isinstance(error, PipelineError):
                        raise error
                    raise PipelineError(f"ray: shard task failed: {_one_line_error(error)}")
        finally:
            if actor is not None:
                try:
                    merge(ray.get(actor.snapshot.remote(), timeout=10))
                except Exception:
                    pass
            counts["ok"], counts["failed"] = snap["part"]["ok"], snap["part"]["failed"]
            if ended:   # no task writes any more: fold their logs into the main ones
                run.consolidate()
            run.write_usage(snap["usage"], _usage_extra(run) if ended else extra(), scrub)
            if bar is not None:
                bar.update(already + snap["part"]["ok"] + snap["part"]["failed"] - bar.n)
                _set_postfix(bar, failed_before + snap["part"]["failed"], snap["usage"])
                bar.close()
        summary = _summary(run, counts, time.monotonic() - t0, snap["usage"], pipe)
        summary["usage"] = {**dict(requests=0, cache_hits=0, retries=0, failures=0,
                                   prompt_tokens=0, completion_tokens=0, cost=0.0),
                            **snap["usage"]}
        if counts["duplicate"]:
            log(f"input: {counts['duplicate']} seeds repeat an earlier seed id and were skipped")
        return summary
    finally:
        run.close()
        if started:
            ray.shutdown()

from tools import stages as _stages  # noqa: E402,F401  (registers difficulty, self_revise, verify_code)
