"""Character-trigram cross-entropy of a document under a shipped reference model of its language:
the corruption filter's n-gram-statistics outlier check.

Why this detector. Text of a language has stable character statistics; binary junk, bytes
decoded in the wrong charset, base64, shuffled or wrong-alphabet text break them. We score a
document by its cross-entropy, in bits per character, under an interpolated character-trigram
model of the language, H = -mean log2 P(c_i | c_{i-2} c_{i-1}); a document above the threshold
is an outlier. It is cheap (one table look-up per character, NumPy) and needs no per-run
calibration: the reference is a fixed table shipped in the repository, so a document gets the
same score whatever shard or run it is in (median/MAD over a run's own documents would move
with each shard's mix, and a shard full of junk would call junk normal). Only the high side is
checked: text that a character model finds unusually *likely* is repetitive, and repetition is
the zlib ratio's and Gopher's job.

Alphabet (61 symbols): case folded, whitespace runs as one space, digits as "0", Latin letters
with diacritics as their base letter, typographic quotes/dashes/ellipsis as ASCII, the 32 ASCII
punctuation marks as themselves, anything else as one "other" symbol.

Model: P(c|ab) = 0.80 C(abc)/C(ab) + 0.15 C(bc)/C(b) + 0.05 (C(c) + 1)/(N + 61) (a lower order
takes the weight of a context never seen), the counts of the reference text's trigrams (bigram
and unigram counts are their marginals). The reference for English, `data/char3-en.npz`, is
the trigram counts of the Python reference topics (`pydoc_data.topics`, the English prose and
code examples of the Python documentation), written by `python -m tools.corpus.char_ngrams
build` (the file records the Python version it was made with). Calibration: see
configs/corpus/web.yaml.
"""
from __future__ import annotations

import string
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
REFERENCES = {"en": DATA / "char3-en.npz"}  # language -> trigram counts
ALPHABET = " " + string.ascii_lowercase + "0" + string.punctuation + "\x01"  # \x01: other
V = len(ALPHABET)
OTHER = V - 1
_TYPOGRAPHIC = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                "\u2014": "-", "\u2026": ".", "\u00a0": " "}
_LUT_SIZE = 0x2100
_WEIGHTS = (0.80, 0.15, 0.05)


def _symbol(cp: int) -> int:
    ch = chr(cp)
    ch = _TYPOGRAPHIC.get(ch, ch)
    if ch.isspace():
        return 0
    if ch.isdigit():
        return ALPHABET.index("0")
    if 0xC0 <= cp < 0x250:  # Latin letters with diacritics: the base letter
        ch = unicodedata.normalize("NFKD", ch)[:1]
    ch = ch.lower()
    return ALPHABET.index(ch) if len(ch) == 1 and ch in ALPHABET[:-1] else OTHER


@lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    return np.array([_symbol(cp) for cp in range(_LUT_SIZE)], np.int64)


def symbols(text: str) -> np.ndarray:
    """The text as alphabet indices (int64), whitespace runs collapsed to one space."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    lut = _lut()
    ids = np.where(cps < _LUT_SIZE, lut[np.minimum(cps, _LUT_SIZE - 1)], OTHER)
    if len(ids) > 1:
        ids = ids[np.concatenate([[True], (ids[1:] != 0) | (ids[:-1] != 0)])]
    return ids


def count_trigrams(texts) -> np.ndarray:
    """Trigram counts, a flat int64 array of V**3, over texts (each its own sequence)."""
    counts = np.zeros(V ** 3, np.int64)
    for text in texts:
        ids = symbols(text)
        if len(ids) >= 3:
            counts += np.bincount((ids[:-2] * V + ids[1:-1]) * V + ids[2:], minlength=V ** 3)
    return counts


def log_probs(trigrams: np.ndarray) -> np.ndarray:
    """-log2 P(c | ab) of the interpolated model, shape (V, V, V), float32."""
    c3 = trigrams.reshape(V, V, V).astype(np.float64)
    c2 = c3.sum(axis=0)                 # (b, c)
    c1 = c2.sum(axis=0)                 # (c,)
    ab, b = c3.sum(axis=2, keepdims=True), c2.sum(axis=1, keepdims=True)
    p1 = (c1 + 1) / (c1.sum() + V)
    w3, w2, w1 = _WEIGHTS
    p2 = np.where(b > 0, (w2 * c2 / np.maximum(b, 1) + w1 * p1) / (w2 + w1), p1)
    p3 = np.where(ab > 0, w3 * c3 / np.maximum(ab, 1) + (w2 + w1) * p2[None], p2[None])
    return (-np.log2(p3)).astype(np.float32)


@lru_cache(maxsize=None)
def reference(language: str) -> np.ndarray | None:
    """The -log2 P table of a language's shipped reference, or None when none ships."""
    path = REFERENCES.get(language)
    if path is None:
        return None
    with np.load(path, allow_pickle=False) as z:
        trigrams = np.zeros(V ** 3, np.int64)
        trigrams[z["index"]] = z["count"]
    return log_probs(trigrams)


def cross_entropy(text: str, table: np.ndarray) -> float:
    """Bits per character of the text under a `reference` table (nan under 3 symbols)."""
    ids = symbols(text)
    if len(ids) < 3:
        return float("nan")
    return float(table[ids[:-2], ids[1:-1], ids[2:]].mean())


def build(out: Path = REFERENCES["en"]) -> Path:
    """Write the English reference: trigram counts of the Python reference topics."""
    from pydoc_data.topics import topics
    counts = count_trigrams(topics[k] for k in sorted(topics))
    index = np.flatnonzero(counts)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        np.savez_compressed(f, index=index.astype(np.int32), count=counts[index].astype(np.int32),
                            alphabet=np.array(ALPHABET), source=np.array(
                                f"pydoc_data.topics, Python {sys.version.split()[0]}"))
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m tools.corpus.char_ngrams build")
    print(build())
