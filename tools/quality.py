"""Web/seed quality filter: a fast non-LLM classifier trained on the teacher's annotations.

The Phi-4 recipe filters organic data with "non-LLM classifiers trained on LLM annotations":

1. The teacher scores a sample of documents with `SCORE_PROMPT` (a `tools.pipeline` prompt
   template; the document goes into `{text}`), replying "... Score: N" with N in 0-5;
   `parse_score(reply)` turns the reply into an int (None if there is none).
2. `QualityClassifier.train(texts, scores)` fits a linear model on hashed n-gram features.
   Labels are **binarised**: score >= `label_threshold` (default 3) means "keep". We chose
   classification over regression because filtering is a keep/drop decision and a logistic
   model gives a usable probability directly; boolean labels are taken as keep flags as they
   are (integer labels are always read as 0-5 teacher scores, so pass 0/1 flags as bools).
3. `clf.score(texts)` gives P(high quality) per document at CPU speed; `keep(scores,
   threshold=... | percentile=...)` picks the documents to keep; `agreement(pred, labels)`
   measures accuracy and Cohen's kappa against held-out teacher labels.

Features: lowercased tokens (scikit-learn's default pattern `\\b\\w\\w+\\b`, written `\\w\\w+`,
which matches the same), word unigrams + bigrams, hashed into 2^20 columns (no alternating
sign), counts, each row divided by sqrt(number of n-gram occurrences in the document) -- the L2
norm when no n-gram repeats, and unlike the exact L2 norm it needs no per-row sort, so scoring
is one `bincount` of the weights over occurrences (no sparse matrix is built). Unigram
columns are exactly scikit-learn's `HashingVectorizer(alternate_sign=False)` columns (signed
MurmurHash3, seed 0, `abs(h) % n_features`); bigrams hash the two unigram hashes with a 64-bit
mixer instead of MurmurHash-ing the joined string. We do our own hashing because
`HashingVectorizer(ngram_range=(1, 2))` manages ~5,500 docs/s of 1.5 KB on one core, and the
target is >= 10,000: here each distinct token is MurmurHash-ed once (a memo dict) and bigrams
are vectorised in NumPy. The model is scikit-learn's `LogisticRegression` (liblinear, seeded).

Saved models are a single `.npz` (no pickle): the non-zero weights (indices + values), the
intercept and a JSON config; `QualityClassifier.load` reads them back with
`allow_pickle=False`, and scores are bit-identical.

Command line::

    phijax-tools quality train  --data labelled.jsonl --out model.npz [--holdout 0.1]
    phijax-tools quality eval   --model model.npz --data labelled.jsonl
    phijax-tools quality score  --model model.npz --input docs.jsonl --output scored.jsonl

JSONL fields default to `text` and `score` (`--text-field`, `--label-field`).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.utils.murmurhash import murmurhash3_32

from phijax.errors import ConfigError, DataError
from phijax.files import atomic_open, read_text_records, write_jsonl
from phijax.hashing import mix64

# The teacher prompt lives in tools/templates/quality_score.txt (one source of truth: the
# `quality_label` stage in tools.stages renders the same file).
SCORE_PROMPT = (Path(__file__).resolve().parent / "templates" / "quality_score.txt").read_text()

_SCORE_RE = re.compile(r"score\s*[:=]\s*\**\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*5)?", re.IGNORECASE)


def parse_score(reply: str | None) -> int | None:
    """The teacher's "Score: N" (last one in the reply) as an int 0-5, or None if absent or out
    of range. Tolerates case, `**Score:** 4`, `Score = 4`, `Score: 4/5`; "4.0" -> 4."""
    if not reply:
        return None
    found = _SCORE_RE.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    if value != int(value) or not 0 <= value <= 5:
        return None
    return int(value)


# ----------------------------------------------------------------------------- features

_TOKEN = re.compile(r"\w\w+")  # == sklearn's (?u)\b\w\w+\b: a run of >= 2 word chars
_GOLD = np.uint64(0x9E3779B97F4A7C15)


class _HashMemo(dict):
    """token -> signed MurmurHash3 (seed 0), computed once per distinct token."""

    def __missing__(self, token: str) -> int:
        h = murmurhash3_32(token, seed=0)
        self[token] = h
        return h


_MEMO = _HashMemo()
_MEMO_MAX = 4_000_000  # distinct tokens kept before the memo is cleared (bounded memory)


def _unigram_columns(h: np.ndarray, n_features: int) -> np.ndarray:
    """scikit-learn's column for a signed 32-bit hash (abs(-2**31) handled as it does)."""
    h = h.astype(np.int64)
    return np.where(h == -2**31, (2**31 - 1 - (n_features - 1)) % n_features,
                    np.abs(h) % n_features)


def _bigram_columns(a: np.ndarray, b: np.ndarray, n_features: int) -> np.ndarray:
    """The column of each bigram: its two 32-bit unigram hashes combined, then mixed."""
    low = np.uint64(0xFFFFFFFF)
    x = mix64((a.astype(np.uint64) & low) * _GOLD + (b.astype(np.uint64) & low))
    return (x % np.uint64(n_features)).astype(np.int64)


def _hashed(texts: Sequence[str], n_features: int, bigrams: bool):
    """(rows, cols, n_per_doc): one (row, column) pair per n-gram occurrence."""
    if len(_MEMO) > _MEMO_MAX:
        _MEMO.clear()
    tokens: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    findall = _TOKEN.findall
    for i, text in enumerate(texts):
        toks = findall(text.lower())
        lengths[i] = len(toks)
        tokens.extend(toks)
    h = np.fromiter(map(_MEMO.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    rows = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    cols = _unigram_columns(h, n_features)
    if bigrams and len(h) > 1:
        same_doc = rows[1:] == rows[:-1]
        cols = np.concatenate([cols, _bigram_columns(h[:-1][same_doc], h[1:][same_doc], n_features)])
        rows = np.concatenate([rows, rows[1:][same_doc]])
        lengths = lengths + np.maximum(lengths - 1, 0)
    return rows, cols, lengths


def _row_scale(lengths: np.ndarray) -> np.ndarray:
    return 1.0 / np.sqrt(np.maximum(lengths, 1))


def featurize(texts: Sequence[str], n_features: int = 2**20, bigrams: bool = True,
              normalise: bool = True) -> sp.csr_matrix:
    """Hashed word 1(-2)-gram counts, one CSR row per text, each row divided by the square root
    of its number of n-gram occurrences (see module doc); `normalise=False`: raw counts."""
    rows, cols, lengths = _hashed(texts, n_features, bigrams)
    data = _row_scale(lengths)[rows] if normalise else np.ones(len(cols))
    return sp.csr_matrix((data, (rows, cols)), shape=(len(texts), n_features))  # sums duplicates


# ----------------------------------------------------------------------------- model

@dataclass
class QualityConfig:
    n_features: int = 2**20
    bigrams: bool = True
    label_threshold: int = 3   # teacher score >= this is "high quality" (keep)
    C: float = 1.0             # inverse L2 strength of the logistic regression
    batch_size: int = 4096     # documents featurised at once when scoring


def _binarise(labels, label_threshold: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype == bool:
        return y
    if y.size and (y.min() < 0 or y.max() > 5):
        raise DataError(f"labels must be teacher scores 0-5 or booleans; got range "
                         f"[{y.min()}, {y.max()}]")
    return y >= label_threshold


class QualityClassifier:
    """Logistic regression on hashed n-grams; `score` returns P(high quality)."""

    def __init__(self, config: QualityConfig, coef: np.ndarray, intercept: float):
        self.config = config
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)

    @classmethod
    def train(cls, texts: Sequence[str], labels, seed: int = 0,
              config: QualityConfig | None = None) -> "QualityClassifier":
        from sklearn.linear_model import LogisticRegression
        config = config or QualityConfig()
        y = _binarise(labels, config.label_threshold)
        if len(y) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(y)} labels")
        if y.all() or not y.any():
            raise DataError("training labels are all one class after binarising at "
                             f"score >= {config.label_threshold}")
        X = featurize(texts, config.n_features, config.bigrams)
        model = LogisticRegression(C=config.C, solver="liblinear", random_state=seed)
        model.fit(X, y)
        return cls(config, model.coef_.ravel(), model.intercept_[0])

    def decision(self, texts: Sequence[str]) -> np.ndarray:
        """Logits, featurising `config.batch_size` documents at a time."""
        bs, out = self.config.batch_size, np.empty(len(texts), dtype=np.float64)
        for i in range(0, len(texts), bs):  # = featurize(batch) @ coef, without building X
            rows, cols, lengths = _hashed(texts[i:i + bs], self.config.n_features,
                                          self.config.bigrams)
            dots = np.bincount(rows, weights=self.coef[cols], minlength=len(lengths))
            out[i:i + bs] = dots * _row_scale(lengths) + self.intercept
        return out

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(high quality) per text, float64 in (0, 1)."""
        return 1.0 / (1.0 + np.exp(-self.decision(list(texts))))

    def save(self, path) -> Path:
        path = Path(path)
        nz = np.flatnonzero(self.coef).astype(np.int64)
        with atomic_open(path) as f:  # np.savez on a file object: no ".npz" appended
            np.savez(f, indices=nz, values=self.coef[nz], intercept=np.float64(self.intercept),
                     config=np.array(json.dumps(asdict(self.config))))
        return path

    @classmethod
    def load(cls, path) -> "QualityClassifier":
        with np.load(path, allow_pickle=False) as z:
            config = QualityConfig(**json.loads(str(z["config"])))
            coef = np.zeros(config.n_features, dtype=np.float64)
            coef[z["indices"]] = z["values"]
            return cls(config, coef, float(z["intercept"]))


# ----------------------------------------------------------------------------- selection

def keep(scores, threshold: float | None = None, percentile: float | None = None) -> np.ndarray:
    """Boolean mask of documents to keep: `scores >= threshold`, or `scores >=` the given
    percentile of `scores` (percentile=80 keeps roughly the top 20%). Neither: threshold 0.5."""
    scores = np.asarray(scores, dtype=np.float64)
    if threshold is not None and percentile is not None:
        raise ConfigError("give threshold or percentile, not both")
    if percentile is not None:
        if not 0 <= percentile <= 100:
            raise ConfigError(f"percentile must be in [0, 100], got {percentile}")
        threshold = np.percentile(scores, percentile) if scores.size else 0.0
    return scores >= (0.5 if threshold is None else threshold)


def agreement(pred, labels, threshold: float = 0.5, label_threshold: int = 3) -> dict:
    """Accuracy and Cohen's kappa of predictions against teacher labels. `pred`: probabilities
    (kept when >= threshold) or booleans; `labels`: teacher scores 0-5 or booleans."""
    p = np.asarray(pred)
    p = p if p.dtype == bool else p >= threshold
    y = _binarise(labels, label_threshold)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions but {y.shape[0]} labels")
    n = len(y)
    acc = float((p == y).mean()) if n else float("nan")
    pe = float(p.mean() * y.mean() + (1 - p.mean()) * (1 - y.mean())) if n else float("nan")
    kappa = (acc - pe) / (1 - pe) if n and pe < 1 else (1.0 if acc == 1 else 0.0)
    return {"n": n, "accuracy": acc, "kappa": float(kappa),
            "keep_rate_pred": float(p.mean()) if n else float("nan"),
            "keep_rate_teacher": float(y.mean()) if n else float("nan")}


def print_agreement(stats: dict, name: str = "held-out", file=None) -> None:
    print(f"{name}: n={stats['n']} accuracy={stats['accuracy']:.3f} kappa={stats['kappa']:.3f} "
          f"keep rate classifier={stats['keep_rate_pred']:.3f} "
          f"teacher={stats['keep_rate_teacher']:.3f}", file=file or sys.stdout)


# ----------------------------------------------------------------------------- files

def score_file(model: str, input: str, output: str, text_field: str = "text") -> int:
    """Each record of `input` with its P(high quality) as its `quality` field (rounded to 6
    digits), written atomically."""
    clf = QualityClassifier.load(model)
    records = read_text_records(input, text_field)
    scores = clf.score([r[text_field] for r in records])
    write_jsonl(output, ({**r, "quality": round(float(s), 6)} for r, s in zip(records, scores)))
    print(f"scored {len(records)} documents -> {output}")
    return len(records)


def labelled(data: str, text_field: str = "text",
             label_field: str = "score") -> tuple[list[str], np.ndarray]:
    """The texts with a score in JSONL file `data` and their scores; raw teacher replies are
    parsed, records whose score is missing or unparsable are skipped (and counted on stderr)."""
    records = read_text_records(data, text_field, required=(label_field,))
    raw = [r[label_field] for r in records]
    raw = [parse_score(v) if isinstance(v, str) else v for v in raw]
    texts = [r[text_field] for r, v in zip(records, raw) if v is not None]
    labels = np.array([v for v in raw if v is not None])
    if len(labels) < len(raw):
        print(f"skipped {len(raw) - len(labels)} records without a score", file=sys.stderr)
    return texts, labels


def train_file(data: str, out: str, holdout: float = 0.1, seed: int = 0,
               text_field: str = "text", label_field: str = "score") -> QualityClassifier:
    """Fit on the labelled records of `data` but a seeded `holdout` share, save the model to
    `out`, print the held-out agreement."""
    texts, labels = labelled(data, text_field, label_field)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_hold = int(round(len(texts) * holdout))
    hold, fit = order[:n_hold], order[n_hold:]
    clf = QualityClassifier.train([texts[i] for i in fit], labels[fit], seed=seed)
    clf.save(out)
    print(f"trained on {len(fit)} documents -> {out}")
    if n_hold:
        print_agreement(agreement(clf.score([texts[i] for i in hold]), labels[hold]))
    return clf


def eval_file(model: str, data: str, text_field: str = "text", label_field: str = "score") -> dict:
    """Print and return the agreement of a saved model with the labels of `data`."""
    texts, labels = labelled(data, text_field, label_field)
    clf = QualityClassifier.load(model)
    stats = agreement(clf.score(texts), labels, label_threshold=clf.config.label_threshold)
    print_agreement(stats)
    return stats
