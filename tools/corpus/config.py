"""The typed config of `phijax-tools corpus run CONFIG [key=value ...]` (see
configs/corpus/web.yaml, every threshold there with the paper it comes from)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from phijax import paths
from phijax.config import load, one_of, positive, ranged
from phijax.errors import ConfigError
from tools.corpus.dedup import DedupConfig
from tools.corpus.extract import ExtractConfig
from tools.corpus.heuristics import HeuristicsConfig
from tools.corpus.langid import LangIdConfig

STEPS = ("extract", "langid", "heuristics", "dedup")


@dataclass
class CorpusConfig:
    inputs: list[str] = field(default_factory=list)  # files or directories (phijax.data.readers)
    output: str = ""
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    glob: str | None = None  # which files of an input directory to read, e.g. "**/*.warc.gz"
    text_field: str = "text"  # JSONL field / parquet column
    executor: str = one_of("local", "ray")  # ray: Ray tasks on the cluster at RAY_ADDRESS
    workers: int = ranged(0, ge=0)  # processes (ray: CPUs of a local Ray instance); 0: per core
    shard_bytes: int | None = positive(None)  # JSONL byte ranges and file groups; default ~64/run
    strict: bool = False  # bad input (a corrupt record, an unreadable file) stops the run
    compress: bool = True  # outputs as .jsonl.zst (else .jsonl)
    samples_per_reason: int = ranged(20, ge=0)  # removed documents kept per reason
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    heuristics: HeuristicsConfig = field(default_factory=HeuristicsConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def check(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: required (files or directories to read)")
        for path in self.inputs:
            if not paths.exists(path):
                raise ConfigError(f"inputs: {path} does not exist")
        if not self.output:
            raise ConfigError("output: required (the directory the run writes)")
        if paths.is_url(self.output):
            raise ConfigError(f"output: {self.output}: a bucket cannot hold a run's work files; "
                              "write to a local or shared file system (NFS, GCS Fuse...)")
        for step in self.steps:
            if step not in STEPS:
                raise ConfigError(f"steps: {step!r} is not one of {', '.join(STEPS)}")
        if "extract" not in self.steps:
            raise ConfigError("steps: must include extract (it turns records into text)")
        if list(self.steps) != [s for s in STEPS if s in self.steps]:
            raise ConfigError(f"steps: run in the order {', '.join(STEPS)}")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("executor: ray is not installed (pip install 'phijax[ray]')")
        self.langid.check()

    def uses(self, step: str) -> bool:
        return step in self.steps


def load_corpus_config(path: str | None, overrides: list[str] = ()) -> CorpusConfig:
    cfg = load(CorpusConfig, path, overrides, what="corpus config")
    cfg.check()
    return cfg
