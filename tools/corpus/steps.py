"""What a worker does to one shard: `filter_shard` reads an input shard and runs extraction,
language identification and the heuristic filters (and writes the dedup signatures of what is
left); `route_shard` removes a shard's duplicates and writes what is kept to its language's
output. Each returns its counts by step; removed documents are sampled per reason."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from phijax.data.readers import Shard, Skipped, read_shard
from phijax.files import atomic_open, jsonl_line
from tools.corpus.config import CorpusConfig
from tools.corpus.dedup import Clusters, write_signatures
from tools.corpus.extract import extract, quiet_libraries
from tools.corpus.heuristics import Heuristics
from tools.corpus.langid import LanguageId

_models: dict = {}


def _langid(cfg: CorpusConfig) -> LanguageId:
    key = json.dumps([cfg.langid.languages, cfg.langid.threshold, cfg.langid.thresholds])
    if key not in _models:
        _models[key] = LanguageId(cfg.langid)
    return _models[key]


class Counts:
    """Per step: documents in, kept, removed by reason, flagged by reason, bytes in and out;
    up to `samples` removed documents per reason; and the seconds spent in each step."""

    def __init__(self, steps: list[str], samples: int):
        self.steps = {s: {"in": 0, "kept": 0, "removed": {}, "flagged": {}, "bytes_in": 0,
                          "bytes_out": 0} for s in steps}
        self.seconds: dict[str, float] = {}
        self.samples, self.limit = [], samples
        self._taken: dict = {}

    def seen(self, step: str, text_bytes: int) -> None:
        self.steps[step]["in"] += 1
        self.steps[step]["bytes_in"] += text_bytes

    def kept(self, step: str, text_bytes: int) -> None:
        self.steps[step]["kept"] += 1
        self.steps[step]["bytes_out"] += text_bytes

    def removed(self, step: str, reason: str, doc: dict | None) -> None:
        removed = self.steps[step]["removed"]
        removed[reason] = removed.get(reason, 0) + 1
        key = (step, reason)
        if doc is not None and self._taken.get(key, 0) < self.limit:
            self._taken[key] = self._taken.get(key, 0) + 1
            self.samples.append(dict(doc, removed={"step": step, "reason": reason}))

    def timed(self, step: str, start: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start

    def flag(self, step: str, reason: str) -> None:
        flagged = self.steps[step]["flagged"]
        flagged[reason] = flagged.get(reason, 0) + 1


def _nbytes(text: str | None) -> int:
    return len(text.encode("utf-8")) if text else 0


def write_docs(path: Path, docs: list[dict]) -> None:
    """JSONL, zstandard-compressed when the name ends in .zst; written atomically."""
    with atomic_open(path) as f:
        if path.suffix == ".zst":
            import zstandard
            with zstandard.ZstdCompressor(level=3).stream_writer(f, closefd=False) as z:
                for doc in docs:
                    z.write(jsonl_line(doc).encode("utf-8"))
        else:
            for doc in docs:
                f.write(jsonl_line(doc).encode("utf-8"))


def read_docs(path: Path) -> Iterator[dict]:
    """The documents `write_docs` wrote, through the readers (strict: they are ours)."""
    for record in read_shard(Shard("jsonl", (str(path),)), "text", Skipped(strict=True)):
        yield {"text": record.text, **record.metadata}


def _filtered(shard: Shard, cfg: CorpusConfig, counts: Counts) -> Iterator[dict]:
    quiet_libraries()
    skipped = Skipped(strict=cfg.strict)
    lid = _langid(cfg) if cfg.uses("langid") else None
    heuristics = Heuristics(cfg.heuristics) if cfg.uses("heuristics") else None
    for record in read_shard(shard, cfg.text_field, skipped):
        size = _nbytes(record.text) or len(record.raw or b"")
        counts.seen("extract", size)
        doc = {"id": record.id, "content_type": record.content_type, **record.metadata}
        start = time.perf_counter()
        out = extract(record, cfg.extract)
        counts.timed("extract", start)
        if out.note:
            counts.flag("extract", out.note)
        if out.text is None:
            counts.removed("extract", out.removed, doc)
            continue
        doc["text"] = out.text
        counts.kept("extract", _nbytes(out.text))
        if lid is not None and not _step_langid(lid, doc, counts):
            continue
        if heuristics is not None:
            counts.seen("heuristics", _nbytes(doc["text"]))
            start = time.perf_counter()
            text, reason = heuristics.check(doc["text"], doc.get("language"))
            counts.timed("heuristics", start)
            if reason:
                counts.removed("heuristics", reason, doc)
                continue
            doc["text"] = text
            counts.kept("heuristics", _nbytes(text))
        yield doc
    read = counts.steps["read"]
    read["removed"] = dict(skipped.counts)
    read["examples"] = skipped.examples


def _step_langid(lid: LanguageId, doc: dict, counts: Counts) -> bool:
    size = _nbytes(doc["text"])
    counts.seen("langid", size)
    start = time.perf_counter()
    doc["language"], score, reason = lid.route(doc["text"])
    counts.timed("langid", start)
    doc["language_score"] = round(score, 4)
    if reason:
        counts.removed("langid", reason, doc)
        return False
    counts.kept("langid", size)
    return True


def filter_shard(shard: Shard, index: int, cfg: CorpusConfig, work: Path) -> dict:
    """Read, extract, identify, filter one input shard into work/docs/INDEX.jsonl.zst (and its
    dedup signatures); its counts in work/counts/INDEX.json, written last: the shard is done."""
    counts = Counts(["read"] + [s for s in cfg.steps if s != "dedup"], cfg.samples_per_reason)
    docs = list(_filtered(shard, cfg, counts))
    read = counts.steps["read"]
    read["in"] = read["kept"] = counts.steps["extract"]["in"]
    read["in"] += sum(read["removed"].values())
    read["bytes_in"] = read["bytes_out"] = counts.steps["extract"]["bytes_in"]
    write_docs(work / "docs" / f"{index:06d}.jsonl.zst", docs)
    start = time.perf_counter()
    if cfg.uses("dedup"):
        write_signatures([d["text"] for d in docs], index, work / "signatures", cfg.dedup)
        with atomic_open(work / "signatures" / f"ids-{index:06d}.json", "w") as f:
            json.dump([d["id"] for d in docs], f)  # to name clusters by their kept document
        counts.timed("signatures", start)
    return _finish(counts, work / "counts" / f"{index:06d}.json", len(docs))


def _finish(counts: Counts, path: Path, documents: int, **extra) -> dict:
    summary = {"steps": counts.steps, "documents": documents, "seconds": counts.seconds,
               **extra}
    with atomic_open(path.with_suffix(".samples.jsonl"), "w") as f:
        for doc in counts.samples:
            f.write(jsonl_line(doc))
    with atomic_open(path, "w") as f:
        f.write(json.dumps(summary))
    return summary


def route_shard(index: int, cfg: CorpusConfig, work: Path, out: Path) -> dict:
    """Drop one shard's duplicates (when dedup runs) and write the rest to
    OUT/LANGUAGE/part-INDEX.jsonl[.zst] (OUT/docs/ without language identification); counts in
    work/routed/INDEX.json, written last."""
    counts = Counts(["dedup"] if cfg.uses("dedup") else [], cfg.samples_per_reason)
    start = time.perf_counter()
    docs = list(read_docs(work / "docs" / f"{index:06d}.jsonl.zst"))
    if cfg.uses("dedup"):
        ids = (np.uint64(index) << np.uint64(32)) | np.arange(len(docs), dtype=np.uint64)
        verdicts = Clusters(work / "clusters.npz").lookup(ids)
        names = json.loads((work / "cluster_names.json").read_text())
        kept = []
        for doc, (cluster, reason) in zip(docs, verdicts):
            counts.seen("dedup", _nbytes(doc["text"]))
            if cluster >= 0:  # named by the id of the document it keeps
                doc["cluster"] = names[str(cluster)]
            if reason:
                counts.removed("dedup", reason, doc)
                continue
            counts.kept("dedup", _nbytes(doc["text"]))
            kept.append(doc)
        docs = kept
        counts.timed("dedup", start)
    routes: dict[str, list] = {}
    for doc in docs:
        routes.setdefault(doc.get("language", "docs") if cfg.uses("langid") else "docs",
                          []).append(doc)
    suffix = ".jsonl.zst" if cfg.compress else ".jsonl"
    for route, group in routes.items():
        write_docs(out / route / f"part-{index:06d}{suffix}", group)
    return _finish(counts, work / "routed" / f"{index:06d}.json", len(docs),
                   routes={route: len(group) for route, group in routes.items()})
