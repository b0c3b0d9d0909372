"""Documents from corpus specs, cut into shards that workers read on their own.

A spec is a JSONL file, a text file, a directory (its .jsonl files are read as JSONL, every other
file as one text document, e.g. a code tree; `glob` narrows which files) or an embedded corpus:
  builtin:python-docs    the Python reference topics (`pydoc_data.topics`), one document per topic
  builtin:python-stdlib  the standard library's .py files, one document per file (a code tree)

A JSONL record is a text document (its `text_field`) or a chat (`messages`: role/content dicts,
rendered with the chat template). Text files keep their path, relative to the directory given,
as metadata. A shard is a byte range of one JSONL file (cut at line ends, with the line number
it starts at) or a group of files, so a worker reads it without the others and bad records are
still named by file:line.
"""
from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from phijax.data.tokenizer import chat_error, render_chat
from phijax.errors import ConfigError

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

    def merge(self, other: dict) -> None:
        for reason, n in other["counts"].items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        self.examples = (self.examples + other["examples"])[:5]


@dataclass(frozen=True)
class Shard:
    kind: str  # "jsonl" | "files" | "topics"
    paths: tuple = ()  # jsonl: one file; files: the files
    root: str = ""  # files: metadata paths are relative to it
    start: int = 0  # jsonl: byte range [start, stop); topics: index range
    stop: int = 0
    line: int = 1  # jsonl: line number at `start`
    size: int = 0  # bytes, for progress

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Document:
    text: str | None = None
    messages: list | None = None  # a chat instead of text
    path: str | None = None  # files: relative path


def check_specs(specs: list[str], what: str = "data.corpus:") -> None:
    """Every spec is an embedded corpus or an existing path; errors begin with `what`."""
    for spec in specs:
        if spec.startswith("builtin:"):
            if spec not in BUILTINS:
                raise ConfigError(f"{what} {spec!r} is not an embedded corpus; "
                                  f"choose from {', '.join(BUILTINS)}")
        elif not Path(spec).exists():
            raise ConfigError(f"{what} {spec} does not exist")


def _topics() -> dict:
    from pydoc_data.topics import topics
    return topics


def _jsonl_shards(path: Path, shard_bytes: int) -> list[Shard]:
    size = path.stat().st_size
    shards, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + shard_bytes, size))
            if f.tell() < size:
                f.readline()  # cut at the end of a line
            stop = f.tell()
            f.seek(start)
            lines, left = 0, stop - start
            while left:
                block = f.read(min(left, 1 << 24))
                lines, left = lines + block.count(b"\n"), left - len(block)
            shards.append(Shard("jsonl", (str(path),), start=start, stop=stop, line=line,
                                size=stop - start))
            start, line = stop, line + lines
    return shards


def _file_shards(files: list[Path], root: Path, shard_bytes: int) -> list[Shard]:
    shards, group, size = [], [], 0
    for file in files:
        group.append(str(file))
        size += file.stat().st_size
        if size >= shard_bytes:
            shards.append(Shard("files", tuple(group), root=str(root), size=size))
            group, size = [], 0
    if group:
        shards.append(Shard("files", tuple(group), root=str(root), size=size))
    return shards


def _files(path: Path, glob: str | None) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob(glob or "**/*") if p.is_file())
    return [path]


def default_shard_bytes(specs: list[str], glob: str | None) -> int:
    """About 64 shards per corpus (so the last ones keep every worker busy), 256 KB to 64 MB."""
    total = sum(f.stat().st_size for s in specs if not s.startswith("builtin:")
                for f in _files(Path(s), glob))
    return int(min(max(total // 64, 256 << 10), 64 << 20))


def plan_shards(specs: list[str], glob: str | None = None,
                shard_bytes: int | None = None) -> list[Shard]:
    """The shards of `specs`, in a fixed order (so a rerun plans the same shards)."""
    check_specs(specs)
    shard_bytes = shard_bytes or default_shard_bytes(specs, glob)
    shards = []
    for spec in specs:
        if spec == "builtin:python-docs":
            topics = _topics()
            per = max(1, len(topics) // 8)
            for start in range(0, len(topics), per):
                stop = min(start + per, len(topics))
                size = sum(len(topics[k]) for k in sorted(topics)[start:stop])
                shards.append(Shard("topics", start=start, stop=stop, size=size))
            continue
        if spec == "builtin:python-stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            shards += _file_shards(sorted(root.glob(glob or "*.py")), root, shard_bytes)
            continue
        path = Path(spec)
        files, root = _files(path, glob), (path if path.is_dir() else path.parent)
        shards += [s for f in files if f.suffix == ".jsonl" for s in _jsonl_shards(f, shard_bytes)]
        shards += _file_shards([f for f in files if f.suffix != ".jsonl"], root, shard_bytes)
    return shards


def _record(raw: bytes, text_field: str, where: str, skipped: Skipped) -> Document | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return skipped.add("invalid UTF-8", where)
    except json.JSONDecodeError:
        return skipped.add("invalid JSON", where)
    if not isinstance(record, dict) or (text_field not in record and "messages" not in record):
        return skipped.add(f"missing field {text_field!r}", where)
    if text_field not in record:
        error = chat_error(record["messages"])
        return skipped.add(error, where) if error else Document(messages=record["messages"])
    text = record[text_field]
    if not isinstance(text, str):
        return skipped.add(f"field {text_field!r} is not a string", where)
    if not text.strip():
        return skipped.add("empty text", where)
    return Document(text=text)


def read_shard(shard: Shard, text_field: str, skipped: Skipped) -> Iterator[Document]:
    if shard.kind == "topics":
        topics = _topics()
        for key in sorted(topics)[shard.start:shard.stop]:
            yield Document(text=topics[key])
    elif shard.kind == "jsonl":
        path = shard.paths[0]
        with open(path, "rb") as f:
            f.seek(shard.start)
            lineno, pos = shard.line, shard.start
            while pos < shard.stop:
                raw = f.readline()
                pos += len(raw)
                doc = None if not raw.strip() else _record(raw, text_field, f"{path}:{lineno}", skipped)
                lineno += 1
                if doc is not None:
                    yield doc
    else:
        for file in shard.paths:
            try:
                text = Path(file).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.add("invalid UTF-8", file)
                continue
            if text.strip():
                yield Document(text=text, path=os.path.relpath(file, shard.root))
            else:
                skipped.add("empty text", file)


def documents(specs: list[str], text_field: str = "text", skipped: Skipped | None = None,
              glob: str | None = None) -> Iterator[str]:
    """Every document of `specs` as text (chats rendered), in shard order."""
    skipped = skipped if skipped is not None else Skipped()
    for shard in plan_shards(specs, glob):
        for doc in read_shard(shard, text_field, skipped):
            yield doc.text if doc.messages is None else render_chat(doc.messages)[0]
