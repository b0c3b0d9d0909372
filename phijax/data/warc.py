"""WARC and WARC.gz files through warcio: `response` records (the HTTP payload, decoded from its
transfer and content encodings, with the content type and charset the server declared) and
`conversion` records (the text of WET files).

A record cut short (its block shorter than its Content-Length) is counted and dropped; data that
does not parse (a corrupt gzip member, garbage between records) is counted, named FILE@OFFSET,
and reading goes on at the next gzip member or `WARC/1.` line. warcio rather than fastwarc:
fastwarc parses .warc.gz 2.6x faster, but both are over 100 MB/s a core, far beyond the
extraction that follows, and warcio decodes chunked and compressed HTTP payloads and names the
offset of every record.
"""
from __future__ import annotations

import os
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


def read_warc(path: str, skipped: Skipped) -> Iterator[Record]:
    """The records of one WARC file, in order (see the module's docstring)."""
    ArchiveIterator = _archive_iterator()
    magic = MAGIC["gzip" if path.lower().endswith(".gz") else "warc"]
    f = open_file(path, skipped)
    if f is None:
        return
    with f:
        offset, end, counted = 0, 0, False
        while offset is not None:
            it = ArchiveIterator(f)
            try:
                for record in it:
                    wanted = _wanted(record)
                    if wanted:  # read before the offset: warcio finds it by reading the record
                        record.payload = record.content_stream().read()
                    offset, counted = it.get_record_offset(), False
                    end = offset + it.get_record_length()
                    out = _record(record, f"{path}@{offset}", skipped) if wanted else None
                    if out is not None:
                        yield out
                if end < f.seek(0, os.SEEK_END):  # warcio stops quietly in a cut member
                    skipped.add("truncated WARC data", f"{path}@{end}")
                return
            except Exception as e:  # noqa: BLE001 - warcio's and zlib's errors: skip ahead
                if not counted:  # once per corrupt stretch, not per failed resync
                    skipped.add(f"corrupt WARC data ({type(e).__name__})", f"{path}@{offset}")
                    counted = True
                offset = resync(f, offset, magic)
