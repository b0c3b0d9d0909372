"""Decontamination against evaluation sets: 13-gram hits plus a 7-gram overlap ratio.

Text is normalised the same way on both sides: Unicode NFKC, lowercase, punctuation (and `_`)
stripped, whitespace collapsed, word tokens. N-grams of tokens are hashed to 64 bits with pure
numpy arithmetic (stable across processes and machines, so an index can be saved and reused).

Rules, checked in this order for a candidate text:

1. **13-gram**: any 13-gram shared with an eval item is a hit, unless it is whitelisted: given
   common phrases (`whitelist=`, e.g. from `common_phrases(reference_corpus)`), or automatically
   because it occurs in more than `max_items_per_ngram` (K) distinct eval items (boilerplate such
   as "answer the following multiple choice question ..."). Score = fraction of that item's
   13-grams found in the candidate.
2. **7-gram ratio**: for each eval item, the fraction of **the eval item's** distinct 7-grams that
   also occur in the candidate. A hit when it is at least `threshold` (default 0.5) and at least
   `min_7gram_matches` 7-grams matched. Measuring against the eval item (not the candidate) is
   deliberate: a paraphrased question buried in a long web page covers most of the item but a tiny
   share of the page. 7-grams in more than K items, or inside a whitelisted phrase, never count
   (they are removed from the index; the item's denominator keeps them, so boilerplate can only
   lower a score). Eval items shorter than 7 tokens cannot be matched by either rule.
   Calibration note: a text that breaks every 13-gram of an item (one change per <= 12 tokens)
   keeps at most about half of the item's 7-grams (2/3 for a 24-token item, -> 1/2 for long ones),
   so 0.5 catches near-verbatim copies that dodge rule 1; lower it to catch looser paraphrases.

The index is built once per eval suite (`Index.build`, `Index.save`, `Index.load`) and checks
records in vectorised batches (`Index.check_many`; `decontaminate` batches for you)::

    index = Index.build(["evals/gsm8k.jsonl", "evals/mmlu.jsonl"], text_field=("question", "choices"))
    index.save("evals/suite.npz")
    records = (rec for _, rec in read_jsonl("seeds.jsonl"))     # phijax.files.read_jsonl
    clean, report = decontaminate(records, Index.load("evals/suite.npz"), "text")
    for record in clean: ...                  # report is final once `clean` is exhausted
    print(report.as_dict())

Command line: `phijax-tools decontam build|filter ...` (`build_index`, `filter_file`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from phijax.errors import DataError
from phijax.files import atomic_open, jsonl_line, read_jsonl, write_jsonl
from phijax.hashing import mix64

_TOKEN = re.compile(r"[^\W_]+")
_P_BYTE, _P_TOK, _LEN_SALT = np.uint64(0x100000001B3), np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93)
_POW = np.ones(1, np.uint64)  # _P_BYTE ** i (mod 2**64), grown on demand


def normalize(text: str) -> list[str]:
    """NFKC, lowercase, punctuation stripped, whitespace collapsed -> word tokens."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


_ASCII_PUNCT = bytes(c if chr(c).isalnum() else 32 for c in range(128)).ljust(256, b" ")


def _normalized_bytes(text: str) -> list[bytes]:
    """`normalize(text)` as UTF-8 tokens; ASCII text takes a fast path with the same result."""
    if text.isascii():
        return text.lower().encode().translate(_ASCII_PUNCT).split()
    return [t.encode() for t in normalize(text)]


def _powers(n: int) -> np.ndarray:
    global _POW
    if len(_POW) < n:
        _POW = np.concatenate([[np.uint64(1)], np.cumprod(np.full(max(n, 2 * len(_POW)) - 1, _P_BYTE))])
    return _POW[:n]


def _token_hashes(token_lists: Sequence[list[bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash per token for a batch of UTF-8 token lists -> (hashes, record index per token).
    A token's hash is a polynomial over its bytes (vectorised over the whole batch), then mixed."""
    counts = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
    if counts.sum() == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    data = np.frombuffer(b" ".join(b" ".join(t) for t in token_lists if t), np.uint8)
    space = data == 32
    sp = np.flatnonzero(space)
    starts = np.concatenate([[0], sp + 1])
    lengths = np.concatenate([sp, [len(data)]]) - starts
    local = np.arange(len(data)) - np.repeat(starts, lengths + 1)[:len(data)]  # byte offset in token
    contrib = (data.astype(np.uint64) + np.uint64(1)) * _powers(int(lengths.max()) + 1)[local]
    contrib[space] = 0
    h = np.add.reduceat(contrib, starts) ^ (lengths.astype(np.uint64) * _LEN_SALT)
    return mix64(h), np.repeat(np.arange(len(token_lists)), counts)


def _ngrams(tok: np.ndarray, rec: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of all token n-grams that lie within one record -> (hashes, record index)."""
    m = len(tok) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    g = tok[:m].copy()
    for i in range(1, n):
        g = g * _P_TOK + tok[i:i + m]
    ok = rec[:m] == rec[n - 1:]
    return mix64(g[ok]), rec[:m][ok]


def ngram_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Public helper: normalised n-gram hashes of `texts` -> (hashes, text index)."""
    return _ngrams(*_token_hashes([_normalized_bytes(t) for t in texts]), n)


def common_phrases(reference_texts: Sequence[str], n: int = 13, min_docs: int = 20) -> list[str]:
    """Whitelist candidates from a reference corpus: the n-grams (as normalised strings) found in
    at least `min_docs` distinct documents. Two passes over `reference_texts` (a sequence)."""
    seen: Counter = Counter()
    for i in range(0, len(reference_texts), 4096):
        seen.update(_distinct(*ngram_hashes(reference_texts[i:i + 4096], n)).tolist())
    common = {h for h, c in seen.items() if c >= min_docs}
    out: dict[int, str] = {}
    for text in reference_texts:
        toks = normalize(text)
        hs, _ = _ngrams(*_token_hashes([[t.encode() for t in toks]]), n)
        for j, h in enumerate(hs.tolist()):
            if h in common and h not in out:
                out[h] = " ".join(toks[j:j + n])
    return sorted(out.values())


def _distinct(h: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Hashes with duplicates inside one record removed (one entry per record that has it)."""
    order = np.lexsort((h, rec))
    h, rec = h[order], rec[order]
    keep = np.ones(len(h), bool)
    keep[1:] = (h[1:] != h[:-1]) | (rec[1:] != rec[:-1])
    return h[keep]


@dataclasses.dataclass(frozen=True)
class Hit:
    benchmark: str
    item_id: str
    kind: str      # "13gram" or "7gram"
    score: float   # fraction of the eval item's 13-grams / 7-grams found in the candidate


class _Postings:
    """Sorted unique n-gram hashes -> eval item indices (CSR), plus n-grams per item."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, items: np.ndarray, per_item: np.ndarray):
        self.keys, self.offsets, self.items, self.per_item = keys, offsets, items, per_item
        bits = int(np.clip(np.ceil(np.log2(16 * len(keys) + 1)), 10, 30))  # ~6% of slots set
        self.shift = np.uint64(64 - bits)
        self.present = np.zeros(1 << bits, bool)  # prefilter: top bits of every key
        self.present[keys >> self.shift] = True

    @classmethod
    def build(cls, h, item, n_items, max_items, banned) -> "_Postings":
        order = np.lexsort((item, h))
        h, item = h[order], item[order]
        new = np.ones(len(h), bool)
        new[1:] = (h[1:] != h[:-1]) | (item[1:] != item[:-1])
        h, item = h[new], item[new]                        # distinct (hash, item) pairs
        per_item = np.bincount(item, minlength=n_items).astype(np.int32)
        keys, cnt = np.unique(h, return_counts=True)
        keep = (cnt <= max_items) & ~np.isin(keys, banned)
        pair_keep = np.repeat(keep, cnt)
        offsets = np.concatenate([[0], np.cumsum(cnt[keep])]).astype(np.int64)
        return cls(keys[keep], offsets, item[pair_keep].astype(np.int32), per_item)

    def best(self, h: np.ndarray, rec: np.ndarray, n_rec: int, min_score: float, min_count: int):
        """Per record: (item, score) of the best-covered item, item -1 where nothing passes."""
        best_item, best_score = np.full(n_rec, -1, np.int64), np.zeros(n_rec)
        if len(self.keys) == 0 or len(h) == 0:
            return best_item, best_score
        maybe = self.present[h >> self.shift]
        h, rec = h[maybe], rec[maybe]
        pos = np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)
        found = self.keys[pos] == h
        if not found.any():
            return best_item, best_score
        key = np.unique(rec[found] * len(self.keys) + pos[found])   # distinct (record, n-gram)
        r, k = key // len(self.keys), key % len(self.keys)
        cnt = self.offsets[k + 1] - self.offsets[k]
        within = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        items = self.items[np.repeat(self.offsets[k], cnt) + within].astype(np.int64)
        n_items = len(self.per_item)
        pair, c = np.unique(np.repeat(r, cnt) * n_items + items, return_counts=True)
        r, it = pair // n_items, pair % n_items
        score = c / self.per_item[it]
        ok = (score >= min_score) & (c >= min_count)
        r, it, score = r[ok], it[ok], score[ok]
        order = np.lexsort((it, -score, r))                           # best score, then lowest item
        r, it, score = r[order], it[order], score[order]
        first = np.ones(len(r), bool)
        first[1:] = r[1:] != r[:-1]
        best_item[r[first]], best_score[r[first]] = it[first], score[first]
        return best_item, best_score


def _field_text(rec: dict, fields: Sequence[str]) -> str:
    parts = []
    for f in fields:
        v = rec.get(f)
        if isinstance(v, (list, tuple)):
            parts.extend(str(x) for x in v)
        elif isinstance(v, dict):
            parts.extend(str(x) for x in v.values())
        elif v is not None:
            parts.append(str(v))
    return "\n".join(parts)


class Index:
    """N-gram index of an eval suite. Build once, `save`, `load`, then `check` / `check_many`."""

    def __init__(self, items: list[str], item_bench: np.ndarray, benchmarks: list[str],
                 p13: _Postings, p7: _Postings, threshold: float = 0.5,
                 min_7gram_matches: int = 3, info: dict | None = None):
        self.items, self.item_bench, self.benchmarks = items, item_bench, benchmarks
        self.p13, self.p7 = p13, p7
        self.threshold, self.min_7gram_matches = threshold, min_7gram_matches
        self.info = info or {}

    @classmethod
    def build(cls, eval_files: Iterable[str | Path], whitelist: Iterable[str] | None = None, *,
              text_field: str | Sequence[str] = "text", benchmark_field: str = "benchmark",
              id_field: str = "id", **kw) -> "Index":
        """Index JSONL eval files. Each record's text is its `text_field` (or several fields joined,
        lists flattened); its benchmark is `record[benchmark_field]` or else the file stem; its id
        is `record[id_field]` or else `<benchmark>:<line index>`. Other keywords: `from_records`."""
        fields = [text_field] if isinstance(text_field, str) else list(text_field)

        def records():
            for path in eval_files:
                for i, (lineno, rec) in enumerate(read_jsonl(path)):
                    bench = str(rec.get(benchmark_field) or Path(path).stem)
                    text = _field_text(rec, fields)
                    if not text:
                        raise DataError(f"{path}:{lineno}: none of the fields "
                                         f"{', '.join(fields)}")
                    yield bench, str(rec.get(id_field, f"{bench}:{i}")), text
        return cls.from_records(records(), whitelist, **kw)

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, str, str]], whitelist: Iterable[str] | None = None,
                     *, max_items_per_ngram: int = 10, threshold: float = 0.5,
                     min_7gram_matches: int = 3) -> "Index":
        """Index (benchmark, item id, text) triples. `whitelist`: common phrases whose 13-grams
        (and 7-grams) never count; n-grams in more than `max_items_per_ngram` items never count."""
        records = list(records)
        benchmarks = sorted({b for b, _, _ in records})
        item_bench = np.array([benchmarks.index(b) for b, _, _ in records], np.int32)
        toks = _token_hashes([_normalized_bytes(t) for _, _, t in records])
        wl = list(whitelist or [])
        wl_toks = _token_hashes([_normalized_bytes(t) for t in wl])
        post = {}
        for n in (13, 7):
            banned = np.unique(_ngrams(*wl_toks, n)[0])
            post[n] = _Postings.build(*_ngrams(*toks, n), len(records), max_items_per_ngram, banned)
        info = {"items": len(records), "whitelist_phrases": len(wl), "max_items_per_ngram": max_items_per_ngram,
                "ngrams13": len(post[13].keys), "ngrams7": len(post[7].keys)}
        return cls([i for _, i, _ in records], item_bench, benchmarks, post[13], post[7],
                   threshold, min_7gram_matches, info)

    def check_many(self, texts: Sequence[str]) -> list[Hit | None]:
        """Check a batch of texts (vectorised; a few thousand per call is a good batch)."""
        toks = _token_hashes([_normalized_bytes(t) for t in texts])
        it13, s13 = self.p13.best(*_ngrams(*toks, 13), len(texts), 0.0, 1)
        it7, s7 = self.p7.best(*_ngrams(*toks, 7), len(texts), self.threshold, self.min_7gram_matches)
        out: list[Hit | None] = []
        for a, sa, b, sb in zip(it13.tolist(), s13.tolist(), it7.tolist(), s7.tolist()):
            if a >= 0:
                out.append(Hit(self.benchmarks[self.item_bench[a]], self.items[a], "13gram", sa))
            elif b >= 0:
                out.append(Hit(self.benchmarks[self.item_bench[b]], self.items[b], "7gram", sb))
            else:
                out.append(None)
        return out

    def check(self, text: str) -> Hit | None:
        return self.check_many([text])[0]

    def save(self, path: str | Path) -> None:
        meta = {"version": 1, "items": self.items, "benchmarks": self.benchmarks, "threshold": self.threshold,
                "min_7gram_matches": self.min_7gram_matches, "info": self.info}
        arrays = {f"{name}_{k}": getattr(p, k) for name, p in (("p13", self.p13), ("p7", self.p7))
                  for k in ("keys", "offsets", "items", "per_item")}
        with atomic_open(path) as f:  # a file object: numpy must not append ".npz" to the name
            np.savez_compressed(f, item_bench=self.item_bench, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Index":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            post = {name: _Postings(*(z[f"{name}_{k}"] for k in ("keys", "offsets", "items", "per_item")))
                    for name in ("p13", "p7")}
            return cls(meta["items"], z["item_bench"], meta["benchmarks"], post["p13"], post["p7"],
                       meta["threshold"], meta["min_7gram_matches"], meta["info"])


@dataclasses.dataclass
class Report:
    """Filled while the clean iterator is consumed; final once it is exhausted."""
    seen: int = 0
    kept: int = 0
    removed: int = 0
    by_benchmark: Counter = dataclasses.field(default_factory=Counter)
    by_kind: Counter = dataclasses.field(default_factory=Counter)
    examples: list = dataclasses.field(default_factory=list)  # first hits: {record id, hit}

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "removed": self.removed,
                "by_benchmark": dict(self.by_benchmark), "by_kind": dict(self.by_kind),
                "examples": self.examples}


def decontaminate(records: Iterable[dict], index: Index, text_field: str = "text", *,
                  batch_size: int = 1024, max_examples: int = 20,
                  on_hit: Callable[[dict, Hit], None] | None = None) -> tuple[Iterator[dict], Report]:
    """Lazily drop records whose `text_field` hits the index -> (clean records, report).
    `on_hit(record, hit)` sees each removed record (e.g. to write a side file)."""
    report = Report()

    def run() -> Iterator[dict]:
        batch: list[dict] = []
        for rec in records:
            batch.append(rec)
            if len(batch) >= batch_size:
                yield from _filter(batch)
                batch = []
        yield from _filter(batch)

    def _filter(batch: list[dict]) -> Iterator[dict]:
        if not batch:
            return
        for rec, hit in zip(batch, index.check_many([str(r.get(text_field) or "") for r in batch])):
            report.seen += 1
            if hit is None:
                report.kept += 1
                yield rec
                continue
            report.removed += 1
            report.by_benchmark[hit.benchmark] += 1
            report.by_kind[hit.kind] += 1
            if len(report.examples) < max_examples:
                report.examples.append({"id": rec.get("id"), **dataclasses.asdict(hit)})
            if on_hit is not None:
                on_hit(rec, hit)
    return run(), report


def build_index(evals: list[str], out: str, text_fields: list[str] | None = None,
                whitelist: str | None = None, max_items_per_ngram: int = 10,
                threshold: float = 0.5) -> dict:
    """Index the eval JSONL files (their `text_fields`, default text; `whitelist`: a text file
    of common phrases, one per line) and save the index to `out`; returns `Index.info`."""
    wl = Path(whitelist).read_text().splitlines() if whitelist else None
    index = Index.build(evals, wl, text_field=text_fields or "text",
                        max_items_per_ngram=max_items_per_ngram, threshold=threshold)
    index.save(out)
    return index.info


def filter_file(input: str, index: str, output: str, removed: str | None = None,
                text_field: str = "text") -> dict:
    """Write the records of `input` that do not hit the saved `index` to `output` (and the
    removed ones, each with its hit under `decontam`, to `removed`); returns the report."""
    idx = Index.load(index)
    records = (rec for _, rec in read_jsonl(input))
    side = atomic_open(removed, "w") if removed else contextlib.nullcontext()
    with side as removed_file:
        def on_hit(rec: dict, hit: Hit) -> None:
            removed_file.write(jsonl_line({**rec, "decontam": dataclasses.asdict(hit)}))
        clean, report = decontaminate(records, idx, text_field,
                                      on_hit=on_hit if removed_file else None)
        write_jsonl(output, clean)
    return report.as_dict()
