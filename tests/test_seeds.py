"""tools.seeds: chunking, code units, forum questions, exact + near-duplicate removal."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tools.cli import main as tools_main
from tools.seeds import (chunk_document, code_units, count_words, dedup, forum_questions,
                         normalise_text)


def para(n, word="word", seed=0):
    """A paragraph of n words in sentences of 8 words."""
    rng = random.Random(seed)
    words = [f"{word}{rng.randint(0, 999)}" for _ in range(n)]
    return " ".join(w + ("." if (i + 1) % 8 == 0 or i == n - 1 else "")
                    for i, w in enumerate(words))


DOC = f"""Intro paragraph before any heading.

# Title

{para(30, 'a')}

{para(30, 'b')}

## Section Two

{para(45, 'c')}

## Empty Section
## Third

```python
# a comment, not a heading

x = 1
```
"""


def test_chunks_fit_budget_and_keep_paragraphs_whole():
    chunks = chunk_document(DOC, max_tokens=70)
    assert all(c.strip() for c in chunks)
    assert all(count_words(c) <= 70 for c in chunks)
    assert chunks[0] == "Intro paragraph before any heading."          # no heading before it
    # a and b (2+30+30 words) fit together under their heading; no paragraph is split
    assert chunks[1] == f"# Title\n\n{para(30, 'a')}\n\n{para(30, 'b')}"
    assert chunks[2] == f"## Section Two\n\n{para(45, 'c')}"
    # the fenced block is one paragraph: its blank line and `#` comment do not split it
    assert chunks[3].startswith("## Third\n\n```python\n# a comment, not a heading\n\nx = 1")
    assert len(chunks) == 4 and not any("Empty Section" in c for c in chunks)


def test_small_budget_splits_between_paragraphs_and_repeats_heading():
    chunks = chunk_document(DOC, max_tokens=40)
    assert all(count_words(c) <= 40 for c in chunks)
    title = [c for c in chunks if c.startswith("# Title")]
    assert [c.split("\n\n", 1)[1] for c in title] == [para(30, "a"), para(30, "b")]


def test_long_paragraph_split_at_sentences_with_heading_context():
    text = "## Long\n\n" + para(100, "s")
    chunks = chunk_document(text, max_tokens=20)
    assert len(chunks) > 1
    for c in chunks:
        assert c.startswith("## Long\n\n") and count_words(c) <= 20
        body = c.split("\n\n", 1)[1]
        assert body.endswith(".")                       # whole sentences only
    bodies = " ".join(c.split("\n\n", 1)[1] for c in chunks)
    assert bodies.split() == para(100, "s").split()     # nothing lost, order kept


def test_sentence_longer_than_budget_split_between_words():
    text = " ".join(f"w{i}" for i in range(50)) + "."
    chunks = chunk_document(text, max_tokens=12)
    assert all(count_words(c) <= 12 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_custom_tokenizer_counts_and_sequences():
    text = "# H\n\n" + "abcdefghij" * 10           # one 100-character "word"
    chunks = chunk_document(text, tokenizer_fn=len, max_tokens=30)   # characters as tokens
    assert all(len(c) <= 30 for c in chunks)
    assert "".join(c.split("\n\n", 1)[1] for c in chunks) == "abcdefghij" * 10
    as_list = chunk_document(DOC, tokenizer_fn=lambda s: s.split(), max_tokens=70)
    assert as_list == chunk_document(DOC, max_tokens=70)


def test_chunk_edge_cases():
    assert chunk_document("") == [] and chunk_document("\n\n  \n") == []
    assert chunk_document("# Only a heading\n") == []
    assert chunk_document("#hashtag is text\n\nmore") == ["#hashtag is text\n\nmore"]
    with pytest.raises(ValueError):
        chunk_document("x", max_tokens=0)


PY = '''"""Module doc."""
import functools

CONST = 3


@functools.lru_cache(maxsize=None)
def fib(n):
    """Fibonacci."""
    def helper(k):
        return k
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class Stack:
    """A stack."""

    def push(self, x):
        self.items.append(x)

    @property
    def top(self):
        return self.items[-1]


async def fetch(url):
    return url
'''


def test_python_units_names_and_line_ranges():
    units = code_units(PY, "pkg/mod.py")
    assert [(u.name, u.kind, u.start_line, u.end_line) for u in units] == [
        ("fib", "function", 7, 12), ("Stack", "class", 15, 23), ("fetch", "async_function", 26, 27)]
    fib, stack, _ = units
    assert fib.text.startswith("@functools.lru_cache(maxsize=None)\ndef fib(n):")
    assert '"""Fibonacci."""' in fib.text and "def helper" in fib.text   # nested stays inside
    assert "def push" in stack.text and "@property" in stack.text and stack.text.endswith("[-1]")
    assert all(u.language == "python" and u.parsed for u in units)
    rec = fib.to_record()
    assert rec["id"] == "pkg/mod.py:7-12" and rec["text"] == fib.text
    lines = PY.splitlines()
    assert all(u.text == "\n".join(lines[u.start_line - 1:u.end_line]) for u in units)


def test_fallback_for_syntax_error_and_other_languages():
    broken = "def ok():\n    return 1\n\ndef broken(:\n    pass\n"
    units = code_units(broken, "bad.py")
    assert units and all(u.kind == "block" and not u.parsed and u.language == "python"
                         for u in units)
    assert "\n".join(u.text for u in units).split() == broken.split()
    js = "function a() {\n  return 1;\n}\n\nfunction b() {\n  return 2;\n}\n"
    units = code_units(js, "src/x.js", max_tokens=6)
    assert [(u.language, u.start_line, u.end_line) for u in units] == [
        ("javascript", 1, 3), ("javascript", 5, 7)]
    assert units[0].text == "function a() {\n  return 1;\n}"
    merged = code_units(js, "src/x.js", max_tokens=100)
    assert len(merged) == 1 and (merged[0].start_line, merged[0].end_line) == (1, 7)
    assert code_units("x = 1\n", "script.py")[0].kind == "block"        # no defs: blocks
    assert code_units("SELECT 1;", "q.weird")[0].language == "unknown"
    big = "\n".join(f"line {i} with words" for i in range(40))           # one oversized block
    units = code_units(big, "big.go", max_tokens=20)
    assert all(count_words(u.text) <= 20 for u in units) and units[-1].end_line == 40


def test_forum_questions(tmp_path):
    path = tmp_path / "forum.jsonl"
    rows = [{"id": 7, "post": {"title": "How do I invert a matrix?"}, "answers": [{"text": " Use LU. "}]},
            {"post": {"title": "   "}},                                # empty: skipped
            {"post": {"title": "Why is the sky blue?"}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    qs = forum_questions(path, question_field="post.title", answer_field="answers.0.text")
    assert qs == [
        {"id": "7", "question": "How do I invert a matrix?", "answer": "Use LU.", "source": "forum.jsonl"},
        {"id": "forum.jsonl:3", "question": "Why is the sky blue?", "answer": None, "source": "forum.jsonl"}]
    path.write_text('{"question": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="forum.jsonl:2"):
        forum_questions(path)


def test_dedup_exact_and_near():
    base = para(200, "d", seed=1)
    words = base.split()
    near = words.copy()
    near[50], near[150] = "CHANGED", "ALTERED"
    other = para(200, "d", seed=2)
    docs = [{"id": 0, "text": base},
            {"id": 1, "text": "  " + base.upper().replace(" ", "\n ")},   # exact after normalising
            {"id": 2, "text": " ".join(near)},                            # two words changed
            {"id": 3, "text": other},
            {"id": 4, "text": other}]
    kept, report = dedup(docs)
    assert [d["id"] for d in kept] == [0, 3]
    assert report.as_dict() == {"total": 5, "kept": 2, "exact_duplicates": 2, "near_duplicates": 1}
    assert sorted(report.pairs) == [(1, 0, "exact"), (2, 0, "near"), (4, 3, "exact")]
    kept2, report2 = dedup(docs)                                           # deterministic
    assert kept2 == kept and report2.pairs == report.pairs


def test_dedup_keeps_first_occurrence_and_strings():
    a, b = para(120, "x", seed=5), para(120, "y", seed=6)
    kept, rep = dedup([b, a, b + " extra", a])
    assert kept == [b, a] and rep.near_duplicates == 1 and rep.exact_duplicates == 1
    assert dedup(["", "", "!!", "short text", "Short   TEXT"])[1].as_dict() == {
        "total": 5, "kept": 3, "exact_duplicates": 2, "near_duplicates": 0}
    assert normalise_text("  Ｆｏｏ\tBAR ") == "foo bar"


def test_long_table_split_at_line_breaks_keeps_rows_whole():
    rows = [f"| row{i} | a{i} | b{i} |" for i in range(20)]
    chunks = chunk_document("# T\n\n" + "\n".join(rows), max_tokens=30)
    assert len(chunks) > 1 and all(count_words(c) <= 30 for c in chunks)
    body_lines = [l for c in chunks for l in c.split("\n\n", 1)[1].split("\n")]
    assert body_lines == rows


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_chunk_and_dedup_print_their_reports(tmp_path, capsys):
    long = "# Title\n\n" + "\n\n".join(" ".join(f"w{p}_{i}." for i in range(12))
                                       for p in range(6))
    inp = _jsonl(tmp_path / "in.jsonl", [{"id": "doc", "text": long, "source": "web"},
                                         {"text": "short"}, {"id": "none", "text": None}])
    out = tmp_path / "chunks.jsonl"
    assert tools_main(["seeds", "chunk", inp, str(out), "--max-tokens", "30"]) == 0
    expected = chunk_document(long, max_tokens=30)
    rows = _read(out)
    assert [r["id"] for r in rows] == [f"doc/chunk/{i}" for i in range(len(expected))] + \
        ["1/chunk/0"]  # no id: the record's index
    assert [r["text"] for r in rows[:-1]] == expected
    assert rows[0]["source"] == "web" and rows[0]["source_id"] == "doc" and \
        [r["chunk_index"] for r in rows[:-1]] == list(range(len(expected)))
    assert json.loads(capsys.readouterr().out) == {"records": 3, "chunks": len(expected) + 1}

    text = "the quick brown fox jumps over the lazy dog " * 5
    inp = _jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": text}, {"id": 2, "text": text.upper()},
                                        {"id": 3, "text": "something else entirely here"}])
    assert tools_main(["seeds", "dedup", inp, str(tmp_path / "dd.jsonl")]) == 0
    assert [r["id"] for r in _read(tmp_path / "dd.jsonl")] == [1, 3]
    assert json.loads(capsys.readouterr().out) == {"total": 3, "kept": 2, "exact_duplicates": 1,
                                                   "near_duplicates": 0}


def test_console_script_cuts_code_units(tmp_path):
    src = "def f():\n    return 1\n\n\nclass C:\n    pass\n"
    inp = _jsonl(tmp_path / "code.jsonl", [{"path": "m.py", "text": src}, {"text": "x = 1\n"}])
    out = tmp_path / "units.jsonl"
    r = subprocess.run([str(Path(sys.executable).parent / "phijax-tools"), "seeds", "code", inp,
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"files": 2, "units": 3}
    units = _read(out)
    assert [(u["name"], u["kind"]) for u in units] == [("f", "function"), ("C", "class"),
                                                       ("unknown:1-1", "block")]
    assert set(units[0]) == {"id", "text", "path", "language", "kind", "name", "start_line",
                             "end_line"}  # `CodeUnit.to_record()`
    assert not list(tmp_path.glob(".*.tmp*"))  # written atomically


@pytest.mark.parametrize("cmd, line, why", [
    ("chunk", '{"id": 1, "body": "x"}', "no field 'text'"),
    ("dedup", '{"id": 1, "text": null}', "field 'text' is not a string"),
    ("code", '{"path": "m.py", "text": 3}', "field 'text' is not a string"),
    ("dedup", '{"id": 1, "text": "x"', "invalid JSON"),
])
def test_cli_names_the_file_and_line_of_a_bad_record(tmp_path, capsys, cmd, line, why):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 0, "text": "fine"}\n\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert tools_main(["seeds", cmd, str(inp), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phijax-tools: error: {inp}:3: ") and why in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
