"""Documents from corpus specs, cut into shards that workers read on their own.

A spec is a file, a directory (its files, narrowed by `glob`) or an embedded corpus:
  builtin:python-docs    the Python reference topics (`pydoc_data.topics`), one document per topic
  builtin:python-stdlib  the standard library's .py files, one document per file (a code tree)

Files are read by `phijax.data.readers`: JSONL (plain, .gz, .zst), parquet, WARC and any other
file as one document (a code tree, text, markdown). A JSONL or parquet record is a text document
(its `text_field`) or a chat (`messages`: role/content dicts, rendered with the chat template).
Text files keep their path, relative to the directory given, as metadata. An HTML page (a file
or a WARC response) is read as its text, in the charset its server declared or else UTF-8; a PDF
is skipped (`phijax-tools corpus run` extracts both). Bad records are skipped and counted, named
by file:line, file#row or file@offset.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from phijax import paths
from phijax.data.readers import Record, Shard, Skipped, list_files, plan_files
from phijax.data.readers import read_shard as read_records
from phijax.data.tokenizer import chat_error, render_chat
from phijax.errors import ConfigError

BUILTINS = ("builtin:python-docs", "builtin:python-stdlib")


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
        elif not paths.exists(spec):
            raise ConfigError(f"{what} {spec} does not exist")


def _topics() -> dict:
    from pydoc_data.topics import topics
    return topics


def default_shard_bytes(specs: list[str], glob: str | None) -> int:
    """About 64 shards per corpus (so the last ones keep every worker busy), 256 KB to 64 MB."""
    total = sum(paths.stamp(f)[0] for s in specs if not s.startswith("builtin:")
                for f in list_files(s, glob))
    return int(min(max(total // 64, 256 << 10), 64 << 20))


def plan_shards(specs: list[str], glob: str | None = None, shard_bytes: int | None = None,
                skipped: Skipped | None = None) -> list[Shard]:
    """The shards of `specs`, in a fixed order (so a rerun plans the same shards); a file that
    cannot be opened is counted in `skipped`."""
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
            shards += plan_files(root, glob or "*.py", shard_bytes)
            continue
        shards += plan_files(spec, glob, shard_bytes, skipped)
    return shards


def _document(record: Record, path: str | None, skipped: Skipped) -> Document | None:
    if record.text is not None:
        return Document(text=record.text, path=path)
    if record.raw is None:  # a chat
        error = chat_error(record.metadata["messages"])
        return skipped.add(error, record.id) if error else \
            Document(messages=record.metadata["messages"])
    if not record.content_type.startswith("text/"):
        return skipped.add(f"{record.content_type} needs extraction (phijax-tools corpus run)",
                           record.id)
    try:
        text = record.raw.decode(record.metadata.get("charset") or "utf-8")
    except (UnicodeDecodeError, LookupError):
        return skipped.add("invalid UTF-8" if not record.metadata.get("charset")
                           else f"not valid {record.metadata['charset']}", record.id)
    if not text.strip():
        return skipped.add("empty text", record.id)
    return Document(text=text, path=path)


def read_shard(shard: Shard, text_field: str, skipped: Skipped) -> Iterator[Document]:
    if shard.kind == "topics":
        topics = _topics()
        for key in sorted(topics)[shard.start:shard.stop]:
            yield Document(text=topics[key])
        return
    for record in read_records(shard, text_field, skipped):
        doc = _document(record, record.metadata["path"] if shard.kind == "files" else None,
                        skipped)
        if doc is not None:
            yield doc


def documents(specs: list[str], text_field: str = "text", skipped: Skipped | None = None,
              glob: str | None = None) -> Iterator[str]:
    """Every document of `specs` as text (chats rendered), in shard order."""
    skipped = skipped if skipped is not None else Skipped()
    for shard in plan_shards(specs, glob):
        for doc in read_shard(shard, text_field, skipped):
            yield doc.text if doc.messages is None else render_chat(doc.messages)[0]
