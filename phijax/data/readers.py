"""Readers of the formats corpora come in, behind one interface: `plan_files` cuts inputs into
shards, `read_shard` streams one shard's records. A shard is the unit a worker reads alone and
the unit a run resumes by.

  *.jsonl                  byte ranges cut at line ends (several shards per large file)
  *.jsonl.gz, *.jsonl.zst  one shard per file (gzip or zstandard, several members/frames too)
  *.parquet                one shard per row group; the text is column `text_field` (the layout
                           Hugging Face datasets publish: data/train-00000-of-00004.parquet)
  *.warc, *.warc.gz        byte ranges, each reading the records that begin in it (a shard finds
                           its first: the gzip member that decompresses to `WARC/1.`, or the
                           `WARC/1.` line); `response` records (the HTTP payload's bytes and
                           content type) and `conversion` records (WET text)
  any other file           one document: text (.txt, .md, .tex, code, ...) or, for .html and
                           .pdf, its bytes and content type; files are grouped into shards

Every record has an `id` naming where it is: FILE:LINE (JSONL), FILE#ROW (parquet), FILE@OFFSET
(WARC, the record's byte offset) or FILE. Bad input never stops a read: an unreadable record, a
corrupt stretch of gzip or zstandard data (reading goes on at the next member or frame), a
truncated WARC record, a parquet file without the text column, a file that cannot be opened at
all: each is counted in `Skipped` by reason, the first few named by id. `Skipped(strict=True)`
raises DataError at the first instead.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from phijax.data.records import MAGIC, Record, Skipped, open_file, resync
from phijax.data.warc import read_warc
from phijax import paths
from phijax.errors import ConfigError

__all__ = ["Record", "Shard", "Skipped", "file_kind", "list_files", "plan_files", "read_shard"]

COMPRESSED = {".gz": "gzip", ".zst": "zstandard"}
RAW_TYPES = {".html": "text/html", ".htm": "text/html", ".xhtml": "application/xhtml+xml",
             ".pdf": "application/pdf"}
TEXT_TYPES = {".md": "text/markdown", ".markdown": "text/markdown", ".tex": "text/x-tex"}


@dataclass(frozen=True)
class Shard:
    kind: str  # "jsonl" | "parquet" | "warc" | "files" | "topics"
    paths: tuple = ()  # jsonl, parquet, warc: one file; files: the files
    root: str = ""  # files: metadata paths are relative to it
    start: int = 0  # jsonl, warc: byte range [start, stop) (jsonl: 0, 0 when compressed);
    #                 parquet: row group
    stop: int = 0
    line: int = 1  # jsonl: line number at `start`; parquet: the row group's first row
    size: int = 0  # bytes, for progress

    def to_dict(self) -> dict:
        return asdict(self)


def file_kind(path: str | Path) -> str:
    """How a file is read: "jsonl", "parquet", "warc" or "files" (one document)."""
    name = str(path).rsplit("/", 1)[-1].lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".warc", ".warc.gz")):
        return "warc"
    return "files"


def _compression(path: str) -> str | None:
    return COMPRESSED.get(Path(path).suffix.lower())


# ---------------------------------------------------------------- planning

def _jsonl_shards(path: str, shard_bytes: int) -> list[Shard]:
    size = paths.stamp(path)[0]
    if _compression(str(path)):
        return [Shard("jsonl", (str(path),), size=size)]
    shards, start, line = [], 0, 1
    with paths.open_read(path) as f:
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


def _warc_shards(path: str, shard_bytes: int) -> list[Shard]:
    """Ranges of about `shard_bytes`, cut anywhere: the reader finds each range's first record."""
    size = paths.stamp(path)[0]
    cuts = list(range(0, size, shard_bytes)) + [size]
    return [Shard("warc", (str(path),), start=a, stop=b, size=b - a)
            for a, b in zip(cuts[:-1], cuts[1:])] or [Shard("warc", (str(path),))]


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading parquet needs pyarrow: pip install 'phijax[corpus]'") from None
    return pq


def _parquet_shards(path: str, skipped: Skipped) -> list[Shard]:
    pq = _pyarrow_parquet()
    try:
        with paths.open_read(path) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line, the run goes on
        skipped.add(f"cannot open ({type(e).__name__}: {e})", str(path))
        return []
    shards, row = [], 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        shards.append(Shard("parquet", (str(path),), start=i, stop=i + 1, line=row,
                            size=group.total_byte_size))
        row += group.num_rows
    return shards


def _file_shards(files: list[str], root: str, shard_bytes: int) -> list[Shard]:
    shards, group, size = [], [], 0
    for file in files:
        group.append(str(file))
        size += paths.stamp(file)[0]
        if size >= shard_bytes:
            shards.append(Shard("files", tuple(group), root=str(root), size=size))
            group, size = [], 0
    if group:
        shards.append(Shard("files", tuple(group), root=str(root), size=size))
    return shards


def list_files(path: str | Path, glob: str | None) -> list[str]:
    """The files of a directory, prefix or file, local or gs:// / s3:// (`paths.files_under`)."""
    return paths.files_under(path, glob)


def plan_files(path: str | Path, glob: str | None, shard_bytes: int,
               skipped: Skipped | None = None) -> list[Shard]:
    """The shards of a file or directory (`glob` picks a directory's files), in a fixed order:
    JSONL (byte ranges of about `shard_bytes`), parquet (row groups), WARC (byte ranges), then
    the other files in groups of about `shard_bytes`. A parquet file that cannot be opened is
    counted in `skipped` and has no shards. A gs:// or s3:// URL is read in place, windows as
    ranged reads."""
    path, skipped = str(path).rstrip("/") or str(path), skipped if skipped is not None else Skipped()
    files = list_files(path, glob)
    root = path if paths.is_dir(path) else \
        path.rsplit("/", 1)[0] if paths.is_url(path) else str(Path(path).parent)
    kinds = {f: file_kind(f) for f in files}
    shards = [s for f in files if kinds[f] == "jsonl" for s in _jsonl_shards(f, shard_bytes)]
    shards += [s for f in files if kinds[f] == "parquet" for s in _parquet_shards(f, skipped)]
    shards += [s for f in files if kinds[f] == "warc" for s in _warc_shards(f, shard_bytes)]
    return shards + _file_shards([f for f in files if kinds[f] == "files"], root, shard_bytes)


# ---------------------------------------------------------------- reading

def read_shard(shard: Shard, text_field: str, skipped: Skipped) -> Iterator[Record]:
    """The records of one shard, in order; what cannot be read is counted in `skipped`."""
    read = {"jsonl": _read_jsonl, "parquet": _read_parquet, "warc": _read_warc,
            "files": _read_files}[shard.kind]
    return read(shard, text_field, skipped)


def _text_record(obj, text_field: str, where: str, skipped: Skipped) -> Record | None:
    """A JSON object or table row -> a text record; a record without `text_field` but with
    `messages` (a chat) is kept with text None and its messages in metadata."""
    if not isinstance(obj, dict) or (text_field not in obj and "messages" not in obj):
        return skipped.add(f"missing field {text_field!r}", where)
    if text_field not in obj:
        return Record(where, metadata=obj)
    text = obj.pop(text_field)
    if not isinstance(text, str):
        return skipped.add(f"field {text_field!r} is not a string", where)
    if not text.strip():
        return skipped.add("empty text", where)
    return Record(where, text=text, metadata=obj)


def _json_record(raw: bytes, text_field: str, where: str, skipped: Skipped) -> Record | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return skipped.add("invalid UTF-8", where)
    except json.JSONDecodeError:
        return skipped.add("invalid JSON", where)
    return _text_record(obj, text_field, where, skipped)


def _read_jsonl(shard: Shard, text_field: str, skipped: Skipped) -> Iterator[Record]:
    path = shard.paths[0]
    f = open_file(path, skipped)
    if f is None:
        return
    with f:
        lines = _decompressed_lines(f, _compression(path), path, skipped) \
            if _compression(path) else _range_lines(f, shard.start, shard.stop)
        lineno = shard.line
        for raw in lines:
            if raw is None:  # a corrupt stretch was skipped: line numbers are lost from here
                lineno = None
                continue
            where = f"{path}:{lineno}" if lineno else f"{path}:(after corrupt data)"
            record = _json_record(raw, text_field, where, skipped) if raw.strip() else None
            lineno = lineno + 1 if lineno else None
            if record is not None:
                yield record


def _range_lines(f, start: int, stop: int) -> Iterator[bytes]:
    f.seek(start)
    pos = start
    while pos < stop:
        raw = f.readline()
        pos += len(raw)
        yield raw


def _decompressor(codec: str):
    if codec == "gzip":
        return zlib.decompressobj(wbits=31)
    import zstandard
    return zstandard.ZstdDecompressor().decompressobj()


def _decode_errors() -> tuple:
    errors = [zlib.error, EOFError, gzip.BadGzipFile]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _decompressed(f, codec: str, path: str, skipped: Skipped) -> Iterator[bytes | None]:
    """Decompressed blocks of a gzip or zstandard stream of one or more members (frames). A
    corrupt stretch is counted, named FILE@OFFSET (the start of the member it is in), a None
    yielded, and reading goes on at the next member; a stream cut short is counted as
    truncated."""
    errors = _decode_errors()
    d, member, started, pending = _decompressor(codec), 0, False, b""
    while True:
        block, pending = pending or f.read(1 << 20), b""
        if not block:
            if started:  # the last member never ended
                skipped.add(f"truncated {codec} data", f"{path}@{member}")
                yield None
            return
        try:
            out = d.decompress(block)
        except errors:
            skipped.add(f"corrupt {codec} data", f"{path}@{member}")
            yield None
            member = resync(f, member, MAGIC[codec])
            if member is None:
                return
            d, started = _decompressor(codec), False
            continue
        started = True
        if out:
            yield out
        if d.eof:  # the member ended; the next begins in its unused bytes
            pending = d.unused_data
            member = f.tell() - len(pending)
            d, started = _decompressor(codec), False


def _decompressed_lines(f, codec: str, path: str, skipped: Skipped) -> Iterator[bytes | None]:
    """Lines of a compressed file; None where a corrupt stretch lost the line in progress."""
    partial = b""
    for block in _decompressed(f, codec, path, skipped):
        if block is None:
            partial = b""
            yield None
            continue
        lines = (partial + block).split(b"\n")
        partial = lines.pop()
        yield from lines
    if partial:
        yield partial


def _read_parquet(shard: Shard, text_field: str, skipped: Skipped) -> Iterator[Record]:
    pq = _pyarrow_parquet()
    path, row = shard.paths[0], shard.line
    try:
        with paths.open_read(path) as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                skipped.add(f"no column {text_field!r}", f"{path}#{row}")
                return
            for batch in pf.iter_batches(batch_size=1024, row_groups=[shard.start]):
                for obj in batch.to_pylist():
                    record = _text_record(obj, text_field, f"{path}#{row}", skipped)
                    row += 1
                    if record is not None:
                        yield record
    except (OSError, ValueError) as e:  # pyarrow's errors for unreadable pages
        skipped.add(f"unreadable row group ({type(e).__name__}: {e})", f"{path}#{row}")


def _read_files(shard: Shard, text_field: str, skipped: Skipped) -> Iterator[Record]:
    for file in shard.paths:
        try:
            data = paths.read_bytes(file)
        except OSError as e:
            skipped.add(f"cannot open ({e.strerror or e})", file)
            continue
        suffix = Path(file).suffix.lower()
        meta = {"path": _relative(file, shard.root)}
        if suffix in RAW_TYPES:
            yield Record(file, raw=data, content_type=RAW_TYPES[suffix], metadata=meta)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.add("invalid UTF-8", file)
            continue
        if text.strip():
            yield Record(file, text=text, content_type=TEXT_TYPES.get(suffix, "text/plain"),
                         metadata=meta)
        else:
            skipped.add("empty text", file)


def _relative(file: str, root: str) -> str:
    if paths.is_url(file):
        return file[len(root):].lstrip("/") if file.startswith(root + "/") else file
    import os
    return os.path.relpath(file, root)


def _read_warc(shard: Shard, text_field: str, skipped: Skipped) -> Iterator[Record]:
    return read_warc(shard.paths[0], skipped, shard.start, shard.stop or None)
