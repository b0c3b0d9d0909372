"""Seed extraction: organic documents, code and forum questions -> seed records for the teacher.

* `chunk_document(text, tokenizer_fn, max_tokens)` -- web/book chunks within a token budget.
* `code_units(source, path)` -- Python top-level functions/classes via `ast`; other languages
  (and unparsable Python) as blank-line-separated blocks.
* `forum_questions(jsonl_path, ...)` -- question (+ optional answer) sets from JSONL.
* `dedup(records)` -- exact (normalised-text hash) and near-duplicate (MinHash LSH) removal,
  keeping the first occurrence.

Command line (seed extraction on its own, JSONL in and out: `chunk_file`, `code_file`,
`dedup_file`)::

    phijax-tools seeds chunk IN.jsonl OUT.jsonl [--field text] [--max-tokens 512]
    phijax-tools seeds code  IN.jsonl OUT.jsonl [--source-field text] [--path-field path]
    phijax-tools seeds dedup IN.jsonl OUT.jsonl [--field text] [--threshold 0.8]

Chunking rule (`chunk_document`):

1. The text is cut into sections at markdown ATX headings (`#`..`######` + space + text);
   each section is cut into paragraphs at blank lines. A fenced code block (``` or ~~~) is one
   paragraph: blank lines and `#` comment lines inside it neither split nor start a section.
2. A chunk holds whole paragraphs of ONE section, packed greedily in order while the chunk
   (heading included) stays within `max_tokens`; a paragraph is never split if it fits.
3. Every chunk of a section starts with that section's heading line (the nearest heading above
   it), so a chunk that continues a section keeps its context. Text before the first heading
   has no heading. A section with a heading but no body makes no chunk (headings are context,
   not content). If the heading alone leaves no room, chunks of that section go without it.
4. A paragraph longer than the budget is split at sentence ends (`.`, `!`, `?`, optionally a
   closing quote/bracket, then whitespace), sentences packed greedily; a sentence still too
   long is split at line breaks (tables, hard-wrapped text), then between words, and a single
   "word" longer than the budget (only possible with a custom tokenizer) between characters.
   Pieces keep the paragraph's own whitespace; paragraphs are joined by a blank line.
5. Chunks are stripped and never empty; each one's token count is <= `max_tokens`, counted by
   `tokenizer_fn` on the final chunk text (default: whitespace-separated words).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from phijax.errors import ConfigError
from phijax.files import read_jsonl, read_text_records, write_jsonl
from tools.corpus.dedup import normalise_text  # noqa: F401 - part of this API


# ----------------------------------------------------------------------------- chunking

def count_words(text: str) -> int:
    """The default token count: whitespace-separated words."""
    return len(text.split())


def _counter(tokenizer_fn: Callable | None) -> Callable[[str], int]:
    """`tokenizer_fn` may return a count or a sequence of tokens (e.g. a tokenizer's encode)."""
    if tokenizer_fn is None:
        return count_words

    def count(text: str) -> int:
        out = tokenizer_fn(text)
        return out if isinstance(out, int) else len(out)
    return count


_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+\S.*)?$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def _sections(text: str) -> list[tuple[str | None, list[str]]]:
    """[(heading line or None, [paragraph, ...]), ...] following rule 1."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    para: list[str] = []
    fence: str | None = None

    def flush():
        if any(l.strip() for l in para):
            sections[-1][1].append("\n".join(para).strip("\n"))
        para.clear()

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        m = _FENCE.match(line)
        if fence is not None:                      # inside a fenced block: copy verbatim
            para.append(line)
            if m and m.group(1) == fence:
                fence = None
        elif m:
            fence = m.group(1)
            para.append(line)
        elif _HEADING.match(line) and line.strip("# \t"):
            flush()
            sections.append((line.strip(), []))
        elif not line.strip():
            flush()
        else:
            para.append(line)
    flush()
    return [s for s in sections if s[1]]


def _split_after(pattern: re.Pattern, text: str) -> list[str]:
    """`text` cut after every match of `pattern`; the pieces concatenate back to `text`."""
    cuts = [m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)]
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


_LEVELS = (_SENTENCE_END, re.compile(r"\n"), re.compile(r"\s+"))  # sentences, lines, words


def _split_to_fit(text: str, fits: Callable[[str], bool], level: int = 0) -> list[str]:
    """Split one over-long paragraph (rule 4): at sentence ends, then line breaks, then between
    words, then between characters; pieces keep their original whitespace inside."""
    while level < len(_LEVELS):
        units = _split_after(_LEVELS[level], text)
        if len(units) > 1:
            break
        level += 1
    else:
        units = list(text)
    out: list[str] = []
    cur = ""
    for unit in units:
        if fits((cur + unit).strip()):
            cur += unit
            continue
        if cur.strip():
            out.append(cur.strip())
        if fits(unit.strip()) or len(unit.strip()) <= 1:
            cur = unit
        else:                                       # one level finer
            pieces = _split_to_fit(unit.strip(), fits, level + 1)
            out.extend(pieces[:-1])
            cur = pieces[-1]
    if cur.strip():
        out.append(cur.strip())
    return out


def chunk_document(text: str, tokenizer_fn: Callable | None = None,
                   max_tokens: int = 512) -> list[str]:
    """Chunks of `text` within `max_tokens` (see the module docstring for the exact rule)."""
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    count = _counter(tokenizer_fn)
    chunks: list[str] = []
    for heading, paras in _sections(text):
        head = heading if heading and count(heading) < max_tokens else None
        prefix = f"{head}\n\n" if head else ""

        def fits(body: str) -> bool:
            return count(prefix + body) <= max_tokens

        body = ""
        for para in paras:
            cand = f"{body}\n\n{para}" if body else para
            if fits(cand):
                body = cand
                continue
            if body:
                chunks.append(prefix + body)
            if fits(para):
                body = para
            else:
                pieces = _split_to_fit(para, fits)
                chunks.extend(prefix + p for p in pieces[:-1])
                body = pieces[-1]
        if body:
            chunks.append(prefix + body)
    return [c.strip() for c in chunks if c.strip()]


# ----------------------------------------------------------------------------- code

LANGUAGES = {".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript",
             ".ts": "typescript", ".tsx": "typescript", ".jsx": "javascript", ".java": "java",
             ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cxx": "cpp",
             ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".cs": "csharp",
             ".kt": "kotlin", ".swift": "swift", ".scala": "scala", ".sh": "shell",
             ".bash": "shell", ".sql": "sql", ".r": "r", ".jl": "julia", ".lua": "lua",
             ".hs": "haskell", ".ml": "ocaml", ".m": "matlab", ".md": "markdown"}


def language_of(path: str) -> str:
    return LANGUAGES.get(Path(path).suffix.lower(), "unknown")


@dataclass
class CodeUnit:
    path: str
    language: str
    kind: str             # "function" | "async_function" | "class" | "block"
    name: str             # the def/class name; "<path>:<start>-<end>" for blocks
    start_line: int       # 1-based, inclusive (decorators included)
    end_line: int         # inclusive
    text: str
    parsed: bool = True   # False: fallback blocks (non-Python, syntax error, or no defs)

    def to_record(self) -> dict:
        return {"id": f"{self.path}:{self.start_line}-{self.end_line}", "text": self.text,
                "path": self.path, "language": self.language, "kind": self.kind,
                "name": self.name, "start_line": self.start_line, "end_line": self.end_line}


_KINDS = {ast.FunctionDef: "function", ast.AsyncFunctionDef: "async_function",
          ast.ClassDef: "class"}


def _python_units(source: str, path: str) -> list[CodeUnit] | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return None
    lines = source.splitlines()
    units = []
    for node in tree.body:
        kind = _KINDS.get(type(node))
        if kind is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        end = node.end_lineno or node.lineno
        units.append(CodeUnit(path, "python", kind, node.name, start, end,
                              "\n".join(lines[start - 1:end])))
    return units


def _blocks(source: str, path: str, language: str, count: Callable[[str], int],
            max_tokens: int) -> list[CodeUnit]:
    """Blank-line-separated blocks, consecutive ones merged while within `max_tokens`; a block
    over the budget is cut between lines (a single line over the budget stays whole)."""
    lines = source.splitlines()
    blocks: list[tuple[int, int]] = []             # 0-based [start, end) of non-blank runs
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        blocks.append((i, j))
        i = j

    def text(a: int, b: int) -> str:
        return "\n".join(lines[a:b]).strip("\n")

    spans: list[tuple[int, int]] = []
    for a, b in blocks:
        if spans and count(text(spans[-1][0], b)) <= max_tokens:
            spans[-1] = (spans[-1][0], b)
        elif count(text(a, b)) <= max_tokens:
            spans.append((a, b))
        else:                                       # cut an oversized block between lines
            s = a
            for e in range(a + 1, b + 1):
                if e - s > 1 and count(text(s, e)) > max_tokens:
                    spans.append((s, e - 1))
                    s = e - 1
            spans.append((s, b))
    return [CodeUnit(path, language, "block", f"{path}:{a + 1}-{b}", a + 1, b, text(a, b),
                     parsed=False) for a, b in spans]


def code_units(source: str, path: str, max_tokens: int = 512,
               tokenizer_fn: Callable | None = None) -> list[CodeUnit]:
    """Seed units of one source file.

    Python (`.py`/`.pyi`): each top-level function, async function and class, with its
    decorators and docstring, lines `start_line..end_line` of the file (methods and nested
    functions stay inside their parent; module-level statements are not units). Python units
    are kept whole whatever their size; filter by size downstream if needed.
    Fallback -- other languages, Python that does not parse, and Python with no top-level
    def/class: blank-line-separated blocks merged up to `max_tokens` (`kind="block"`,
    `parsed=False`), `language` from the file extension ("unknown" if not known).
    """
    language = language_of(path)
    if language == "python":
        units = _python_units(source, path)
        if units:
            return units
    return _blocks(source, path, language, _counter(tokenizer_fn), max_tokens)


# ----------------------------------------------------------------------------- forum questions

def _field(record: dict, dotted: str) -> Any:
    """The value at a dotted path (`a.b`, `answers.0.text`) of a record; None if absent."""
    from tools.pipeline.stage import lookup
    try:
        return lookup(record, dotted)
    except KeyError:
        return None


def forum_questions(jsonl_path, question_field: str = "question",
                    answer_field: str | None = "answer", id_field: str = "id",
                    source: str | None = None) -> list[dict]:
    """Question records from a forum dump in JSONL: `{"id", "question", "answer", "source"}`.

    Fields may be dotted paths (`post.body`, `answers.0.text`). Records without a non-empty
    string question are skipped; a missing answer is None (questions alone are seeds too). The
    id is the record's `id_field` if present, else `<file name>:<line number>`. A line that is
    not JSON raises ValueError naming file and line."""
    path = Path(jsonl_path)
    out = []
    for lineno, rec in read_jsonl(path):
        q = _field(rec, question_field)
        if not isinstance(q, str) or not q.strip():
            continue
        a = _field(rec, answer_field) if answer_field else None
        rid = _field(rec, id_field)
        out.append({"id": str(rid) if rid is not None else f"{path.name}:{lineno}",
                    "question": q.strip(),
                    "answer": a.strip() if isinstance(a, str) else a,
                    "source": source or path.name})
    return out


# ----------------------------------------------------------------------------- dedup

@dataclass
class DedupReport:
    total: int = 0
    kept: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    pairs: list[tuple[int, int, str]] = field(default_factory=list)  # (dropped, kept, kind)

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates}


def dedup(records: Iterable, text_key: str = "text", threshold: float = 0.8, shingle: int = 5,
          bands: int = 14, rows: int = 8, seed: int = 1,
          verify: bool = True) -> tuple[list, DedupReport]:
    """Drop exact and near duplicates, keeping the first occurrence (input order), with the
    corpus dedup's code (`tools.corpus.dedup.find_duplicates`).

    `records` are strings or dicts (text under `text_key`). Exact: the hash of
    `normalise_text`. Near: MinHash LSH (`bands` x `rows` permutations, `seed`) of word
    `shingle`-grams, queried against the records kept so far; with `verify`, a candidate counts
    only if the estimated Jaccard similarity with a kept record is >= `threshold` (LSH alone has
    false positives). Deterministic for a given input order and seed. Returns (kept records,
    DedupReport); `pairs` lists (dropped index, index of the kept record it duplicates,
    "exact" | "near")."""
    from tools.corpus.dedup import find_duplicates
    records = list(records)
    texts = [rec if isinstance(rec, str) else rec[text_key] for rec in records]
    report = DedupReport(total=len(records))
    report.pairs = find_duplicates(texts, shingle, bands, rows, seed,
                                   threshold if verify else None)
    report.exact_duplicates = sum(kind == "exact" for _, _, kind in report.pairs)
    report.near_duplicates = len(report.pairs) - report.exact_duplicates
    dropped = {i for i, _, _ in report.pairs}
    kept = [rec for i, rec in enumerate(records) if i not in dropped]
    report.kept = len(kept)
    return kept, report


# ----------------------------------------------------------------------------- files

def chunk_file(input: str, output: str, field: str = "text", id_field: str = "id",
               max_tokens: int = 512) -> dict:
    """Each record's `field` split by `chunk_document` (words as tokens): one record per
    chunk, other fields kept, id `<id>/chunk/<i>` (the record's index when it has no
    `id_field`), plus `source_id` and `chunk_index`; written atomically."""
    records = read_text_records(input, field, nullable=True)
    out = []
    for n, rec in enumerate(records):
        rid = rec.get(id_field, n)
        for i, chunk in enumerate(chunk_document(rec[field] or "", max_tokens=max_tokens)):
            out.append(dict(rec, **{id_field: f"{rid}/chunk/{i}", field: chunk},
                            source_id=rid, chunk_index=i))
    write_jsonl(output, out)
    return {"records": len(records), "chunks": len(out)}


def code_file(input: str, output: str, source_field: str = "text", path_field: str = "path",
              max_tokens: int = 512) -> dict:
    """Records holding a source file (and its path, "unknown" when absent) -> one
    `CodeUnit.to_record()` per function, class or block; written atomically."""
    records = read_text_records(input, source_field, nullable=True)
    out = [u.to_record() for rec in records
           for u in code_units(rec[source_field] or "", str(rec.get(path_field) or "unknown"),
                               max_tokens=max_tokens)]
    write_jsonl(output, out)
    return {"files": len(records), "units": len(out)}


def dedup_file(input: str, output: str, field: str = "text", threshold: float = 0.8) -> dict:
    """The records of `input` without exact and near duplicates of `field` (the first kept),
    written atomically; returns `DedupReport.as_dict()`."""
    kept, report = dedup(read_text_records(input, field), text_key=field, threshold=threshold)
    write_jsonl(output, kept)
    return report.as_dict()
