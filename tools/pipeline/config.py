"""A pipeline file, loaded and checked: the teacher, the input and run directory, the stages.

    teacher:                      # tools.teacher.TeacherConfig
      base_url: https://api.openai.com/v1
      model: gpt-4o
      api_key_env: OPENAI_API_KEY   # the *name* of the variable; the key never reaches a file
    input: data/seeds.jsonl       # one JSON object per line; `id` or a content-hash id
    output: runs/my-pipeline      # the run directory
    shards: 4                     # records-0000k-of-00004.jsonl, by hash of the seed id
    cache: null                   # default <output>/cache.sqlite; a path; or false (no cache)
    concurrency: null             # seeds in flight (default 2x teacher.concurrency)
    max_failed_fraction: 0.5      # more of the run's seeds failed (or all): exit status 1
    stages:
      - {name: answer, type: prompt, template: "Q: {question}\\nA:", n: 4, output_field: answer}
      - {name: nonempty, type: filter, field: answer, min_length: 1}

Relative paths are relative to the working directory. `load_pipeline` reads the file through
`phijax.config.load` (dotted `key=value` overrides, `stages.0.n=2` for a list item) and builds
every stage from its type's config, then checks every record field and template placeholder
of the stages against the first seed record (`tools.pipeline.preflight`), so that any mistake
fails with one line naming the key (`PipelineError`) before a network call.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from phijax import paths
from phijax.config import load, positive, ranged
from phijax.errors import ConfigError
from tools.pipeline.preflight import check_record_fields, first_seed
from tools.pipeline.stage import STAGES, PipelineError, Stage
from tools.teacher import TeacherConfig


@dataclass
class PipelineConfig:
    """The pipeline file as written."""
    teacher: TeacherConfig
    input: str                    # JSONL of seed records (a path, or a gs:// / s3:// URL)
    output: str                   # the run directory
    stages: list[dict]            # {name, type, ...parameters of the type}
    shards: int = ranged(1, ge=1, le=99999)
    cache: Union[bool, str, None] = None   # null/true: <output>/cache.sqlite; false: no cache
    concurrency: Optional[int] = positive(None)   # seeds in flight; default 2x teacher's
    batch_size: int = positive(64)         # seeds per fsync batch
    flush_interval_s: float = positive(0.5)
    # A run ends with exit status 1 when more than this share of its seeds failed, or all did.
    max_failed_fraction: float = ranged(0.5, ge=0, le=1)


@dataclass
class Pipeline:
    """A checked pipeline, stages built, ready to run."""
    teacher: TeacherConfig
    input: Path
    output: Path
    shards: int
    stages: list[Stage]
    cache: Optional[Path]         # None: no cache
    concurrency: int              # seeds in flight
    batch_size: int = 64
    flush_interval_s: float = 0.5
    max_failed_fraction: float = 0.5
    path: Optional[Path] = field(default=None, compare=False)

    def fingerprint(self) -> dict:
        return {"shards": self.shards, "stages": [s.fingerprint for s in self.stages]}


def build_stage(raw: dict, key: str) -> Stage:
    """One stage from its `stages[i]` mapping."""
    import tools.stages  # noqa: F401  (registers the built-in stage types)

    known = f"known: {', '.join(sorted(STAGES))}"
    typ = raw.get("type")
    if typ is None:
        raise PipelineError(f"{key}.type: required ({known})")
    if not isinstance(typ, str) or typ not in STAGES:
        raise PipelineError(f"{key}.type: unknown stage type {typ!r} ({known})")
    cls = STAGES[typ]
    cfg = cls.config_from(raw, key)
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=typ)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.name):
        raise PipelineError(f"{key}.name: expected a name of letters, digits, _ . -; "
                            f"got {cfg.name!r}")
    return cls(cfg, key)


def _check(cfg: PipelineConfig) -> None:
    """The checks that touch files or span fields."""
    for name in ("base_url", "model"):
        if not getattr(cfg.teacher, name):
            raise PipelineError(f"teacher.{name}: required")
    if not (paths.exists(cfg.input) if paths.is_url(cfg.input) else Path(cfg.input).is_file()):
        raise PipelineError(f"input: file {cfg.input} does not exist")
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise PipelineError(f"output: {cfg.output} is not a directory")
    if cfg.cache == "":
        raise PipelineError("cache: expected a path, null or false")
    if not cfg.stages:
        raise PipelineError("stages: expected a non-empty list of {name, type, ...parameters}")


def load_pipeline(path: str | Path | None = None, overrides: list[str] = (),
                  raw: Optional[dict] = None) -> Pipeline:
    """Load and check a pipeline: a YAML file and/or a mapping, plus dotted overrides."""
    if path is None and raw is None:
        raise PipelineError("pipeline: give a YAML file")
    try:
        cfg = load(PipelineConfig, path, overrides, raw=raw, what="pipeline file")
        _check(cfg)
        stages: list[Stage] = []
        for i, spec in enumerate(cfg.stages):
            stage = build_stage(spec, f"stages[{i}]")
            if stage.name in {s.name for s in stages}:
                raise PipelineError(f"stages[{i}].name: duplicate stage name {stage.name!r}")
            stages.append(stage)
        seeds = paths.local_copy(cfg.input) if paths.is_url(cfg.input) else Path(cfg.input)
        check_record_fields(stages, first_seed(seeds))
    except PipelineError:
        raise
    except ConfigError as e:
        raise PipelineError(str(e)) from None
    cache = cfg.cache
    return Pipeline(
        teacher=cfg.teacher, input=seeds, output=Path(cfg.output), shards=cfg.shards,
        stages=stages, concurrency=cfg.concurrency or 2 * cfg.teacher.concurrency,
        cache=(Path(cfg.output) / "cache.sqlite" if cache in (None, True)
               else None if cache is False else Path(cache)),
        batch_size=cfg.batch_size, flush_interval_s=cfg.flush_interval_s,
        max_failed_fraction=cfg.max_failed_fraction, path=Path(path) if path else None)
