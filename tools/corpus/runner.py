"""`phijax-tools corpus run`: organic sources -> extracted, identified, filtered, deduplicated
documents, over the inputs' shards (phijax.data.readers): a process per core on this machine,
or Ray tasks across machines (`executor: ray`; tools.corpus.executors), the same tasks either way.

  filter    per input shard: read, extract, language ID, heuristics (and dedup signatures)
  buckets   per (band, hash range): LSH buckets -> edges          } when dedup runs
  clusters  connected components of the edges (one task)          }
  route     per shard: drop duplicates, write OUTPUT/LANGUAGE/part-NNNNNN.jsonl.zst

Intermediate files live in OUTPUT/.work; every task writes its marker last, so a rerun after a
crash or a kill does only the tasks that have none, with either executor. A run whose inputs or
settings changed starts over. Inputs and output are made absolute first: documents' ids name
their input files the same way whichever the executor and working directory. At the end:
OUTPUT/summary.json (counts per step, removed by reason, bytes, dedup cluster sizes),
OUTPUT/removed/STEP/REASON.jsonl (up to `samples_per_reason` removed documents each, with the
reason), OUTPUT/timing.json (seconds spent in each step, summed over the tasks; each phase's
wall time is logged) and a table of the counts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from phijax.config import to_dict
from phijax.data.corpus import plan_shards
from phijax.data.readers import Skipped
from phijax.errors import ConfigError, DataError
from phijax.files import atomic_write, jsonl_line, read_jsonl
from phijax.hashing import digest
from phijax.paths import absolute, stamp
from tools.corpus.config import CorpusConfig
from tools.corpus.dedup import band_names, cluster, write_bucket_edges
from tools.corpus.executors import make_workers
from tools.corpus.steps import filter_shard, route_shard

log = logging.getLogger("phijax")
FORMAT = "phijax-corpus-1"


def _plan_key(cfg: CorpusConfig, shards: list) -> str:
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("workers", "output", "executor")}  # either resumes the other
    stamps = [stamp(p) for s in shards for p in s.paths]  # (size, mtime or object version)
    return digest(FORMAT, settings, [s.to_dict() for s in shards], stamps)


def _prepare(out: Path, key: str) -> Path:
    """OUTPUT/.work for this plan: kept when the plan is the same, else the old run removed."""
    work = out / ".work"
    if out.exists() and any(out.iterdir()):
        if not (work / "plan.json").is_file() and not (out / "summary.json").is_file():
            raise ConfigError(f"output: {out} is not empty and is not a corpus run's output")
        if (work / "plan.json").is_file() and json.loads((work / "plan.json").read_text()) == key:
            return work
        log.info("corpus: %s holds a run of other inputs or settings; starting over", out)
        shutil.rmtree(out)
    for sub in ("docs", "counts", "signatures", "edges", "routed"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    atomic_write(work / "plan.json", json.dumps(key))
    return work


def _run_tasks(fn: Callable, tasks: list[tuple], workers, desc: str, progress: bool,
               sizes: list[int] | None = None) -> list:
    """fn(*task) for every task, with a bar (docs/s when the results count documents)."""
    results = [None] * len(tasks)
    if not tasks:
        return results
    sizes = sizes or [1] * len(tasks)
    bar = tqdm(total=sum(sizes), desc=desc, disable=not progress, mininterval=1.0,
               unit="B" if sizes[0] != 1 else "task", unit_scale=True)
    docs, t0 = 0, time.perf_counter()
    for k, result in workers.completed(fn, tasks):
        results[k] = result
        bar.update(sizes[k])
        if isinstance(result, dict):  # documents read (filter) or routed
            steps = result["steps"]
            docs += steps["read"]["in"] if "read" in steps else result["documents"]
            bar.set_postfix_str(f"{docs / (time.perf_counter() - t0):,.0f} docs/s",
                                refresh=False)
    bar.close()
    log.info("corpus: %s, %d tasks in %.2f s", desc, len(tasks), time.perf_counter() - t0)
    return results


def run_corpus(cfg: CorpusConfig, progress: bool = True) -> dict:
    """Run (or resume) the configured steps; returns the summary (also OUTPUT/summary.json)."""
    cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).absolute()),
                              inputs=[str(absolute(p)) for p in cfg.inputs])
    out = Path(cfg.output)
    planning = Skipped(strict=cfg.strict)
    shards = plan_shards(cfg.inputs, cfg.glob, cfg.shard_bytes, planning)
    if not shards:
        raise DataError(f"inputs: {' '.join(cfg.inputs)} hold nothing to read")
    work = _prepare(out, _plan_key(cfg, shards))
    workers = make_workers(cfg.executor, cfg.workers)
    try:
        dedup = _run_phases(cfg, shards, work, out, workers, progress)
    finally:
        workers.close()
    return _summarise(cfg, len(shards), work, out, planning, dedup)


def _run_phases(cfg: CorpusConfig, shards: list, work: Path, out: Path, workers,
                progress: bool) -> dict | None:
    n = len(shards)
    todo = [i for i in range(n) if not (work / "counts" / f"{i:06d}.json").is_file()]
    if len(todo) < n:
        log.info("corpus: resuming, %d of %d shards already filtered", n - len(todo), n)
    _run_tasks(filter_shard, [(shards[i], i, cfg, work) for i in todo], workers, "filter",
               progress, [max(shards[i].size, 1) for i in todo])
    dedup = _dedup(cfg, n, work, workers, progress) if cfg.uses("dedup") else None
    todo = [i for i in range(n) if not (work / "routed" / f"{i:06d}.json").is_file()]
    _run_tasks(route_shard, [(i, cfg, work, out) for i in todo], workers, "route", progress)
    return dedup


def _dedup(cfg: CorpusConfig, n: int, work: Path, workers, progress: bool) -> dict:
    parts = cfg.dedup.partitions
    tasks = [(work / "signatures", n, band, part, parts, work / "edges")
             for band in band_names(cfg.dedup) for part in range(parts)
             if not (work / "edges" / f"edges-{band}-{part:04d}.npy").is_file()]
    _run_tasks(write_bucket_edges, tasks, workers, "buckets", progress)
    report_path = work / "clusters.json"
    if not report_path.is_file():
        _run_tasks(cluster_task, [(work,)], workers, "clusters", progress)
    return json.loads(report_path.read_text())


def cluster_task(work: Path) -> None:
    """The clusters of every bucket's edges, their names, and the report (the marker) last."""
    report = cluster(work / "edges", work)
    atomic_write(work / "cluster_names.json", json.dumps(_cluster_names(work)))
    atomic_write(work / "clusters.json", json.dumps(report))


def _cluster_names(work: Path) -> dict:
    """Each cluster's id (shard << 32 | position of the document it keeps) -> that document's
    id (FILE:LINE, FILE@OFFSET, ...), read from the kept documents' shards only."""
    import numpy as np
    with np.load(work / "clusters.npz") as z:
        kept = np.unique(z["kept"]).tolist()
    names, ids = {}, {}
    for doc in kept:
        shard, position = doc >> 32, doc & 0xFFFFFFFF
        if shard not in ids:
            ids[shard] = json.loads((work / "signatures" / f"ids-{shard:06d}.json").read_text())
        names[str(doc)] = ids[shard][position]
    return names


def _merge_steps(summaries: list[dict], into: dict) -> None:
    for summary in summaries:
        for step, c in summary["steps"].items():
            total = into.setdefault(step, {"in": 0, "kept": 0, "removed": {}, "flagged": {},
                                           "bytes_in": 0, "bytes_out": 0})
            for key in ("in", "kept", "bytes_in", "bytes_out"):
                total[key] += c[key]
            for key in ("removed", "flagged"):
                for reason, count in c[key].items():
                    total[key][reason] = total[key].get(reason, 0) + count
            if "examples" in c:
                total["examples"] = (total.get("examples", []) + c["examples"])[:5]


def _summarise(cfg, n: int, work: Path, out: Path, planning: Skipped, dedup) -> dict:
    filtered = [json.loads((work / "counts" / f"{i:06d}.json").read_text()) for i in range(n)]
    routed = [json.loads((work / "routed" / f"{i:06d}.json").read_text()) for i in range(n)]
    steps: dict = {}
    _merge_steps(filtered + routed, steps)
    read = steps["read"]
    for reason, count in planning.counts.items():  # files no shard could be planned for
        read["removed"][reason] = read["removed"].get(reason, 0) + count
        read["in"] += count
    read["examples"] = (planning.examples + read.get("examples", []))[:5]
    routes: dict = {}
    for r in routed:
        for route, count in r["routes"].items():
            routes[route] = routes.get(route, 0) + count
    summary = {"shards": n, "documents": sum(r["documents"] for r in routed),
               "outputs": dict(sorted(routes.items())), "steps": steps, "dedup": dedup}
    _write_samples(work, n, out / "removed", cfg.samples_per_reason)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    seconds: dict = {}  # per step, over every task (timing.json: summary.json stays the same
    for part in filtered + routed:  # when a rerun redoes a task)
        for step, s in part.get("seconds", {}).items():
            seconds[step] = seconds.get(step, 0.0) + s
    atomic_write(out / "timing.json", json.dumps({"seconds": seconds}, indent=2))
    return summary


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "other"


def _write_samples(work: Path, n: int, removed: Path, limit: int) -> None:
    """The first `limit` removed documents of each (step, reason), in shard order."""
    groups: dict = {}
    for sub in ("counts", "routed"):
        for i in range(n):
            path = work / sub / f"{i:06d}.samples.jsonl"
            for _, doc in read_jsonl(path) if path.is_file() else ():
                key = (doc["removed"]["step"], doc["removed"]["reason"])
                if len(groups.setdefault(key, [])) < limit:
                    groups[key].append(doc)
    shutil.rmtree(removed, ignore_errors=True)
    for (step, reason), docs in groups.items():
        path = removed / step / f"{_slug(reason)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(jsonl_line(d) for d in docs)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def format_summary(summary: dict) -> str:
    """A table: per step, documents in, kept, removed, bytes, and removals by reason."""
    rows = [("step", "in", "kept", "removed", "bytes in", "bytes out", "removed by reason")]
    for step, c in summary["steps"].items():
        reasons = ", ".join(f"{r} {k}" for r, k in sorted(c["removed"].items(),
                                                           key=lambda x: -x[1]))
        flagged = ", ".join(f"{r} {k}" for r, k in c.get("flagged", {}).items())
        rows.append((step, f"{c['in']:,}", f"{c['kept']:,}", f"{sum(c['removed'].values()):,}",
                     _size(c["bytes_in"]), _size(c["bytes_out"]),
                     reasons + (f" (flagged: {flagged})" if flagged else "")))
    widths = [max(len(r[k]) for r in rows) for k in range(6)]
    lines = ["  ".join(r[k].ljust(widths[k]) if k == 0 else r[k].rjust(widths[k])
                       for k in range(6)) + "  " + r[6] for r in rows]
    lines.append(f"{summary['documents']:,} documents written: " + ", ".join(
        f"{route} {count:,}" for route, count in summary["outputs"].items()))
    if summary["dedup"]:
        d = summary["dedup"]
        lines.append(f"dedup: {d['clusters']:,} clusters of duplicates, largest {d['largest']}, "
                     f"sizes {d['sizes']}")
    return "\n".join(lines)
