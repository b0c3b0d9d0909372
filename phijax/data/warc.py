"""WARC and WARC.gz files through warcio: `response` records (the HTTP payload, decoded from its
transfer and content encodings, with the content type and charset the server declared) and
`conversion` records (the text of WET files).

A record cut short (its block shorter than its Content-Length) is counted and dropped; data that
does not parse (a corrupt gzip member, garbage between records) is counted, named FILE@OFFSET,
and reading goes on at the next gzip member or `WARC/1.` line. A byte range of a file reads the
records that begin in it, so ranges cut anywhere read each record once (`read_warc`); in a
plain .warc, a payload holding a line that begins `WARC/1.` can fool a range that begins
inside it (a .warc.gz cannot: each record is its own gzip member). warcio rather than fastwarc:
fastwarc parses .warc.gz 2.6x faster, but both are over 100 MB/s a core, far beyond the
extraction that follows, and warcio decodes chunked and compressed HTTP payloads and names the
offset of every record.
"""
from __future__ import annotations

import os
import zlib
from typing import Iterator

from phijax.data.records import MAGIC, Record, Skipped, open_file, resync
from phijax.errors import ConfigError


def _archive_iterator():
    try:
        from warcio.archiveiterator import ArchiveIterator
    except ImportError:
        raise ConfigError("reading WARC needs warcio: pip install 'phijax[corpus]'") from None
    return ArchiveIterator


def _content_type(value: str | None) -> tuple[str, str | None]:
    """'text/html; charset=UTF-8' -> ('text/html', 'utf-8')."""
    if not value:
        return "application/octet-stream", None
    mime, *params = [p.strip() for p in value.split(";")]
    charset = next((p.split("=", 1)[1].strip("\"' ").lower() for p in params
                    if p.lower().startswith("charset=")), None)
    return mime.lower() or "application/octet-stream", charset or None


def _record(record, where: str, skipped: Skipped) -> Record | None:
    """The record, its payload already read (`record.payload`)."""
    kind, payload = record.rec_type, record.payload
    if record.raw_stream.limit:  # the block ended before its Content-Length
        return skipped.add("truncated WARC record", where)
    headers = record.rec_headers
    meta = {"url": headers.get_header("WARC-Target-URI"), "date": headers.get_header("WARC-Date")}
    if kind == "conversion":
        text = payload.decode("utf-8", errors="replace")
        return Record(where, text=text, metadata=meta) if text.strip() else \
            skipped.add("empty text", where)
    status = record.http_headers.get_statuscode()
    if status != "200":
        return skipped.add(f"HTTP status {status}", where)
    mime, charset = _content_type(record.http_headers.get_header("Content-Type"))
    if charset:
        meta["charset"] = charset
    return Record(where, raw=payload, content_type=mime, metadata=meta)


def _wanted(record) -> bool:
    """A response to an HTTP request (not dns:, whois:), or WET text."""
    return record.rec_type == "conversion" or \
        (record.rec_type == "response" and record.http_headers is not None)


def record_start(f, pos: int, gz: bool) -> bool:
    """Whether a record can begin at byte `pos`: a gzip member whose decompressed bytes begin
    with `WARC/1.` (.warc.gz), or a `WARC/1.` line (.warc). Leaves `f` anywhere."""
    f.seek(max(pos - 1, 0))
    if not gz:
        head = f.read(8 if pos else 7)
        return head == b"WARC/1." if not pos else head[:1] == b"\n" and head[1:] == b"WARC/1."
    f.seek(pos)
    d, out = zlib.decompressobj(wbits=31), b""
    try:
        while len(out) < 7:
            block = f.read(1024)
            if not block:
                break
            out += d.decompress(block, 7 - len(out))
            while d.unconsumed_tail and len(out) < 7:
                out += d.decompress(d.unconsumed_tail, 7 - len(out))
            if d.eof:
                break
    except zlib.error:
        return False
    return out.startswith(b"WARC/1.")


def first_record(f, start: int, gz: bool) -> int | None:
    """The offset of the first record at or after byte `start` (`record_start`), or None."""
    magic = MAGIC["gzip" if gz else "warc"]
    pos = resync(f, start - 1, magic)
    while pos is not None and not record_start(f, pos, gz):
        pos = resync(f, pos, magic)
    return pos


def read_warc(path: str, skipped: Skipped, start: int = 0, stop: int | None = None
              ) -> Iterator[Record]:
    """The records of one WARC file that begin in bytes [start, stop) (the whole file by
    default), in order (see the module's docstring). A range reads from the first record at or
    after `start` (`first_record`) up to the first at or after `stop`, so ranges cut anywhere
    read every record once; damage after the range's last record, up to that next record, is
    the range's to count."""
    ArchiveIterator = _archive_iterator()
    gz = path.lower().endswith(".gz")
    magic = MAGIC["gzip" if gz else "warc"]
    f = open_file(path, skipped)
    if f is None:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        stop = size if stop is None else stop
        offset = first_record(f, start, gz) if start else 0
        if offset is None or offset >= stop:  # no record begins in the range
            return
        counted = False
        while offset is not None and offset < size:
            f.seek(offset)
            it, end = ArchiveIterator(f), offset
            try:
                for record in it:
                    offset = it.offset
                    if offset >= stop and _next_range(f, offset, gz):
                        return
                    if _wanted(record):  # read before the length: warcio finds it by reading
                        record.payload = record.content_stream().read()
                    counted, end = False, offset + it.get_record_length()
                    out = _record(record, f"{path}@{offset}", skipped) if _wanted(record) \
                        else None
                    if out is not None:
                        yield out
                if _data_after(f, end, size):  # warcio stops quietly in a cut member
                    skipped.add("truncated WARC data", f"{path}@{end}")
                return
            except Exception as e:  # noqa: BLE001 - warcio's and zlib's errors: skip ahead
                offset = max(it.offset, offset)
                if offset >= stop and _next_range(f, offset, gz):
                    return  # the next range's first record: counted there
                if not counted:  # once per corrupt stretch, not per failed resync
                    skipped.add(f"corrupt WARC data ({type(e).__name__})", f"{path}@{offset}")
                    counted = True
                offset = resync(f, offset, magic)


def _data_after(f, end: int, size: int) -> bool:
    """Whether bytes other than a plain WARC's closing blank lines follow byte `end`."""
    if size - end > 8:
        return True
    f.seek(end)
    return bool(f.read().strip())


def _next_range(f, offset: int, gz: bool) -> bool:
    """Whether the record at `offset` (past the range) is where the next range begins; `f`
    left where it was."""
    here = f.tell()
    try:
        return record_start(f, offset, gz)
    finally:
        f.seek(here)
