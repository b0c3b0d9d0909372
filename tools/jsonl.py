"""Reading JSONL: every tool reads records the same way and names the file and line it rejects."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError naming `file:line` for a line
    that is not a JSON object."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def lookup(record: dict, dotted: str):
    """The value at a dotted path (`a.b`, `answers.0.text`) of a record; KeyError if absent."""
    node = record
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def write_jsonl(path: str | Path, rows) -> Path:
    """Write `rows` as JSONL atomically (temp file, fsync, rename): a reader sees the old file or
    the whole new one, and a row that fails to serialize leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
