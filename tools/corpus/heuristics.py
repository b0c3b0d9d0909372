"""Heuristic quality filters and corruption detectors, each threshold where it was published.

`Heuristics(cfg).check(text)` -> (text, reason): the text as the line filters left it and the
first failed check, named `filter: check` (None when the document is kept). The filters run in
FineWeb's order, after the corruption detectors:

corruption (ours, calibrated on the Rust and Python documentation and made junk; see
  configs/corpus/web.yaml): zlib compression ratio outside [min, max] (binary junk and random
  strings barely compress; a page of one repeated line compresses to almost nothing); the
  share of replacement, control and private-use characters (bytes decoded as the wrong
  charset, binary files); mojibake sequences per 1,000 characters, as ftfy's `badness` counts
  them (UTF-8 read as cp1252: "cafÃ©"); character-trigram cross-entropy in bits per character
  under the shipped reference model of the document's language above a maximum (garbled,
  shuffled or wrong-alphabet text, base64, binary read as text: `tools.corpus.char_ngrams`;
  a language without a reference is not scored, a document without one -- language ID off --
  is scored as English).
gopher_repetition (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
  from Training Gopher", Table A1): duplicate lines/paragraphs (share of them, and of their
  characters), the characters of the most frequent 2-4-gram, the characters in repeated 5-10-
  grams (occurrences after the first).
Words (`words`): whitespace-separated, as the Gopher paper counts them; or `tokens`, as
  datatrove's FineWeb filters count them (spaCy's English tokens, each punctuation mark a word:
  `tools.corpus.word_tokens`), and then the n-gram shares as datatrove computes them too: over
  the text's characters (not the words'), the top n-gram's characters with the spaces joining
  it, repeated n-grams counted left to right without overlap.
gopher_quality (same paper, A1): 50-100,000 words, mean word length 3-10, symbols (#, ...)
  per word <= 0.1, <= 90% of lines bullets, <= 30% of lines ending in an ellipsis, >= 80% of
  words with a letter, >= 2 of the stop words the, be, to, of, and, that, have, with.
c4 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning...", 2.2): lines mentioning
  javascript or a cookie/terms/privacy policy, lines under 3 words and lines with a word over
  1,000 characters are dropped, citation marks ([1], [edit]) removed; a page with "lorem
  ipsum" or fewer than 5 sentences left is removed. Lines inside ``` fences (code that
  extraction kept) are left alone; C4's "{" rule (it removes every page of code) and its
  terminal-punctuation line rule (FineWeb turned it off) are off unless set.
fineweb (Penedo et al. 2024, "The FineWeb Datasets", 3.3): <= 12% of lines ending in
  punctuation, >= 67% of lines of <= 30 characters, >= 1% of characters in duplicated lines,
  and more than 0.3 newlines per word (lists) each remove a page.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from phijax.config import one_of
from phijax.hashing import mix64
from tools.corpus import char_ngrams, word_tokens

_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
_BULLETS = ("•", "●", "○", "▪", "◦", "- ", "* ", "‣", "⁃")
_ELLIPSES = ("...", "…")
_END_PUNCT = (".", "!", "?", '"', "'", "”", "’")
_BAD_CHARS = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ue000-\uf8ff]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")
_CITATION = re.compile(r"\[\d+\]|\[edit\]|\[citation needed\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


@dataclass
class Corruption:
    enabled: bool = True
    min_compression_ratio: float = 0.10  # below: one line or phrase repeated over and over
    max_compression_ratio: float = 0.70  # above: random strings, binary junk
    compression_min_bytes: int = 1000  # shorter texts compress poorly whatever they are
    max_bad_char_ratio: float = 0.01  # replacement, control, private-use characters
    max_mojibake_per_1k: float = 1.0  # ftfy badness sequences per 1,000 characters
    max_char_bits: float | None = 5.5  # character-trigram cross-entropy, bits/char; null: off
    char_bits_min_chars: int = 200  # shorter texts are not scored


@dataclass
class GopherRepetition:
    enabled: bool = True
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    max_top_ngram_char_frac: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict = field(default_factory=lambda: {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


@dataclass
class GopherQuality:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.10
    max_bullet_lines_ratio: float = 0.90
    max_ellipsis_lines_ratio: float = 0.30
    min_alpha_words_ratio: float = 0.80
    min_stop_words: int = 2


@dataclass
class C4:
    enabled: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    min_sentences: int = 5
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    remove_citations: bool = True
    remove_lorem_ipsum: bool = True
    remove_curly_bracket: bool = False  # C4 removes any page with "{": every page of code
    terminal_punct_lines_only: bool = False  # FineWeb turned this C4 rule off


@dataclass
class FineWeb:
    enabled: bool = True
    min_line_punct_ratio: float = 0.12
    max_short_line_ratio: float = 0.67
    short_line_length: int = 30
    max_dup_line_char_ratio: float = 0.01
    max_newline_word_ratio: float = 0.30


@dataclass
class HeuristicsConfig:
    words: str = one_of("whitespace", "tokens")  # what the Gopher rules count as words
    corruption: Corruption = field(default_factory=Corruption)
    gopher_repetition: GopherRepetition = field(default_factory=GopherRepetition)
    gopher_quality: GopherQuality = field(default_factory=GopherQuality)
    c4: C4 = field(default_factory=C4)
    fineweb: FineWeb = field(default_factory=FineWeb)


# ---------------------------------------------------------------- corruption

def corruption(text: str, cfg: Corruption, language: str | None = None) -> str | None:
    data = text.encode("utf-8")
    if len(data) >= cfg.compression_min_bytes:
        ratio = len(zlib.compress(data, 6)) / len(data)
        if ratio < cfg.min_compression_ratio:
            return "compression ratio too low"
        if ratio > cfg.max_compression_ratio:
            return "compression ratio too high"
    if len(_BAD_CHARS.findall(text)) > cfg.max_bad_char_ratio * len(text):
        return "bad characters"
    from ftfy.badness import badness
    if badness(text) > cfg.max_mojibake_per_1k * max(len(text), 1) / 1000:
        return "mojibake"
    if cfg.max_char_bits is not None and len(text) >= cfg.char_bits_min_chars:
        table = char_ngrams.reference(language or "en")
        if table is not None and char_ngrams.cross_entropy(text, table) > cfg.max_char_bits:
            return "character n-gram outlier"
    return None


# ---------------------------------------------------------------- gopher repetition

def _dup_fracs(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in them)."""
    seen, dups, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dups, dup_chars = dups + 1, dup_chars + len(item)
        seen.add(item)
    total = sum(map(len, items)) or 1
    return dups / max(len(items), 1), dup_chars / total


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every word n-gram (ids: one uint64 per word)."""
    h = np.zeros(len(ids) - n + 1, np.uint64)
    for k in range(n):
        h = mix64(h * np.uint64(0x100000001B3) ^ ids[k:len(ids) - n + 1 + k])
    return h


def _word_ids(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab) + 1) for w in words), np.uint64,
                      len(words))
    return ids, np.fromiter(map(len, words), np.int64, len(words))


def _top_ngram_frac(ids, lengths, n: int, total: int) -> float:
    h = _ngram_hashes(ids, n)
    values, first, counts = np.unique(h, return_index=True, return_counts=True)
    top = np.argmax(counts)
    if counts[top] < 2:
        return 0.0
    start = first[top]
    return float(counts[top] * lengths[start:start + n].sum()) / total


def _dup_ngram_frac(ids, lengths, n: int, total: int) -> float:
    """Characters of the words inside an n-gram that occurred before."""
    h = _ngram_hashes(ids, n)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    repeat = first[inverse] != np.arange(len(h))
    covered = np.zeros(len(ids), bool)
    for k in range(n):
        covered[k:k + len(h)] |= repeat
    return float(lengths[covered].sum()) / total


def _dup_ngram_chars_left_to_right(ids, lengths, n: int) -> int:
    """datatrove's count: left to right, an n-gram seen before adds its characters and the next
    n-1 n-grams are skipped (and not remembered)."""
    _, inverse, counts = np.unique(_ngram_hashes(ids, n), return_inverse=True,
                                   return_counts=True)
    ends = np.concatenate([[0], np.cumsum(lengths)])
    seen, chars, free = set(), 0, 0
    for at in np.flatnonzero(counts[inverse] > 1).tolist():  # the others never repeat
        if at < free:
            continue
        if inverse[at] in seen:
            chars, free = chars + int(ends[at + n] - ends[at]), at + n
        else:
            seen.add(inverse[at])
    return chars


def _top_ngram_chars_joined(ids, lengths, n: int) -> int:
    """datatrove's count: the most frequent n-gram (the first seen of equals) with its spaces,
    times its count."""
    _, first, counts = np.unique(_ngram_hashes(ids, n), return_index=True, return_counts=True)
    top = np.flatnonzero(counts == counts.max())
    start = int(first[top].min())
    return int(counts.max()) * (int(lengths[start:start + n].sum()) + n - 1)


def gopher_repetition(text: str, cfg: GopherRepetition, tokens: list[str] | None = None
                      ) -> str | None:
    """`tokens`: the text's words as tokens (`words: tokens`); None: whitespace words."""
    paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
    frac, char_frac = _dup_fracs(paragraphs)
    if frac > cfg.max_dup_para_frac:
        return "duplicate paragraphs"
    if char_frac > cfg.max_dup_para_char_frac:
        return "duplicate paragraph characters"
    lines = [line for line in text.split("\n") if line.strip()]
    frac, char_frac = _dup_fracs(lines)
    if frac > cfg.max_dup_line_frac:
        return "duplicate lines"
    if char_frac > cfg.max_dup_line_char_frac:
        return "duplicate line characters"
    as_tokens, words = tokens is not None, text.split() if tokens is None else tokens
    ids, lengths = _word_ids(words)
    total = (len(text) if as_tokens else int(lengths.sum())) or 1
    for n, limit in sorted(cfg.max_top_ngram_char_frac.items()):
        if len(words) < int(n):
            continue
        frac = _top_ngram_chars_joined(ids, lengths, int(n)) / total if as_tokens else \
            _top_ngram_frac(ids, lengths, int(n), total)
        if frac > limit:
            return f"top {n}-gram"
    for n, limit in sorted(cfg.max_dup_ngram_char_frac.items()):
        if len(words) < int(n):
            continue
        frac = _dup_ngram_chars_left_to_right(ids, lengths, int(n)) / total if as_tokens else \
            _dup_ngram_frac(ids, lengths, int(n), total)
        if frac > limit:
            return f"duplicate {n}-grams"
    return None


# ---------------------------------------------------------------- gopher quality

def gopher_quality(text: str, cfg: GopherQuality, tokens: list[str] | None = None
                   ) -> str | None:
    """`tokens`: the text's words as tokens (`words: tokens`); None: whitespace words."""
    words = text.split() if tokens is None else tokens
    content = [w for w in words if any(c.isalnum() for c in w)]
    if not cfg.min_words <= len(content) <= cfg.max_words:
        return "word count"
    mean = sum(map(len, content)) / len(content)
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return "mean word length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / len(words) > cfg.max_symbol_word_ratio:
        return "symbol ratio"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if sum(line.startswith(_BULLETS) for line in lines) > cfg.max_bullet_lines_ratio * len(lines):
        return "bullet lines"
    if sum(line.endswith(_ELLIPSES) for line in lines) > \
            cfg.max_ellipsis_lines_ratio * len(lines):
        return "ellipsis lines"
    if sum(any(c.isalpha() for c in w) for w in words) < cfg.min_alpha_words_ratio * len(words):
        return "alphabetic words"
    if len(_STOP_WORDS.intersection(w.lower() for w in words)) < cfg.min_stop_words:
        return "stop words"
    return None


# ---------------------------------------------------------------- c4

def _c4_keeps(line: str, cfg: C4) -> bool:
    lower = line.lower()
    if cfg.drop_javascript_lines and "javascript" in lower:
        return False
    if cfg.drop_policy_lines and any(p in lower for p in _POLICY):
        return False
    words = line.split()
    if len(words) < cfg.min_words_per_line or any(len(w) > cfg.max_word_length for w in words):
        return False
    return not cfg.terminal_punct_lines_only or line.rstrip().endswith(_END_PUNCT)


def c4(text: str, cfg: C4) -> tuple[str, str | None]:
    lower = text.lower()
    if cfg.remove_lorem_ipsum and "lorem ipsum" in lower:
        return text, "lorem ipsum"
    if cfg.remove_curly_bracket and "{" in text:
        return text, "curly bracket"
    kept, in_code, sentences = [], False, 0
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            kept.append(line)
            continue
        if in_code:
            kept.append(line)
            continue
        if cfg.remove_citations:
            line = _CITATION.sub("", line)
        if not line.strip():
            kept.append(line)
        elif _c4_keeps(line, cfg):
            kept.append(line)
            sentences += len(_SENTENCE_END.findall(line))
    if sentences < cfg.min_sentences:
        return text, "too few sentences"
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip(), None


# ---------------------------------------------------------------- fineweb

def fineweb(text: str, cfg: FineWeb) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty"
    if sum(line.rstrip().endswith(_END_PUNCT) for line in lines) <= \
            cfg.min_line_punct_ratio * len(lines):
        return "line punctuation"
    if sum(len(line) <= cfg.short_line_length for line in lines) >= \
            cfg.max_short_line_ratio * len(lines):
        return "short lines"
    _, dup_chars = _dup_fracs(lines)
    if dup_chars >= cfg.max_dup_line_char_ratio:
        return "duplicate line characters"
    if text.count("\n") / max(len(text.split()), 1) > cfg.max_newline_word_ratio:
        return "list-like"
    return None


class Heuristics:
    """All enabled filters, in order; see the module's docstring."""

    def __init__(self, cfg: HeuristicsConfig):
        self.cfg = cfg

    def check(self, text: str, language: str | None = None) -> tuple[str, str | None]:
        """`language`: the document's (language ID's), for the character n-gram reference."""
        cfg = self.cfg
        reason = corruption(text, cfg.corruption, language) if cfg.corruption.enabled else None
        if reason:
            return text, f"corruption: {reason}"
        as_tokens = cfg.words == "tokens" and (cfg.gopher_repetition.enabled or
                                               cfg.gopher_quality.enabled)
        words = word_tokens.tokens(text) if as_tokens else None
        for name, fn, section in (("gopher_repetition", gopher_repetition,
                                   cfg.gopher_repetition),
                                  ("gopher_quality", gopher_quality, cfg.gopher_quality)):
            reason = fn(text, section, words) if section.enabled else None
            if reason:
                return text, f"{name}: {reason}"
        if cfg.c4.enabled:
            text, reason = c4(text, cfg.c4)
            if reason:
                return text, f"c4: {reason}"
        reason = fineweb(text, cfg.fineweb) if cfg.fineweb.enabled else None
        return text, f"fineweb: {reason}" if reason else None
