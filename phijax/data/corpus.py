"""Documents from corpus specs: JSONL files, text files, or an embedded default.

Embedded corpora need no download; they ship with every Python installation:
  builtin:python-docs    the Python reference topics (`pydoc_data.topics`), one document per topic
  builtin:python-stdlib  the standard library's .py files, one document per file
"""
from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BUILTINS = ("builtin:python-docs", "builtin:python-stdlib")


@dataclass
class Skipped:
    """Counts of skipped records by reason, and the first few named by file:line."""
    counts: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def check_specs(specs: list[str]) -> None:
    for spec in specs:
        if spec.startswith("builtin:"):
            if spec not in BUILTINS:
                raise ValueError(f"data.corpus: unknown embedded corpus {spec!r}; "
                                 f"choose from {', '.join(BUILTINS)}")
        elif not Path(spec).exists():
            raise ValueError(f"data.corpus: {spec} does not exist")


def _builtin(spec: str) -> Iterator[str]:
    if spec == "builtin:python-docs":
        from pydoc_data.topics import topics
        for key in sorted(topics):
            yield topics[key]
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(root.glob("*.py")):
            yield path.read_text(encoding="utf-8", errors="replace")


def _jsonl(path: Path, text_field: str, skipped: Skipped) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.add("invalid UTF-8", where)
                continue
            except json.JSONDecodeError:
                skipped.add("invalid JSON", where)
                continue
            if not isinstance(record, dict) or text_field not in record:
                skipped.add(f"missing field {text_field!r}", where)
            elif not isinstance(record[text_field], str):
                skipped.add(f"field {text_field!r} is not a string", where)
            elif not record[text_field].strip():
                skipped.add("empty text", where)
            else:
                yield record[text_field]


def documents(specs: list[str], text_field: str = "text",
              skipped: Skipped | None = None) -> Iterator[str]:
    skipped = skipped if skipped is not None else Skipped()
    for spec in specs:
        if spec.startswith("builtin:"):
            yield from _builtin(spec)
            continue
        path = Path(spec)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".jsonl":
                yield from _jsonl(file, text_field, skipped)
                continue
            try:
                text = file.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.add("invalid UTF-8", str(file))
                continue
            if text.strip():
                yield text
            else:
                skipped.add("empty text", str(file))
