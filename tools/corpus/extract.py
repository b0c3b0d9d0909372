"""Text from what the readers give: HTML through trafilatura, PDF through pypdf, TeX as source.

HTML: the page's bytes are decoded in the charset its server or its <meta> declared; a page
whose declared charset does not decode it, or that declares none and is not UTF-8, is decoded
in the charset resiliparse detects and flagged ("wrong declared encoding", "undeclared
encoding"). trafilatura then keeps the main content as markdown: headings, code blocks in ```
fences, tables as markdown tables, MathML formulas as their TeX annotation ($...$); navigation,
menus, footers and comments are dropped, and a page with no main content gives nothing
("no main content"); trafilatura's escapes of markdown characters in prose (my\\_name, a\\*b)
are undone outside code and math unless `markdown_escapes`. `favor_precision` (trafilatura's,
as FineWeb ran it) drops more of what might be boilerplate. trafilatura rather than
resiliparse: resiliparse's main-content mode is ~17x faster on the Rust documentation pages we
measured (119 vs 7-11 pages/s) but keeps boilerplate (the mdBook help panel), writes tables as tab-separated lines, loses code fences,
and runs MathML's presentation and TeX annotation together ("n(n-1)2\\frac{n(n-1)}{2}").

PDF: every page's text through pypdf; an encrypted PDF that the empty password does not open,
a PDF pypdf cannot parse, and a PDF without a text layer (a scan) are each removed and counted.
TeX, markdown and plain text are kept as they are.
"""
from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

from phijax.data.readers import Record

HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([a-z0-9_.:-]+)""", re.I)
# trafilatura's markdown escapes: a run of 2r+1 backslashes before an inline special stands for r
# backslashes and the character; a backslash before a block marker at a line's start; code
# fences, code spans and $math$ are left as they are
_PROTECTED = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]+`|\$[^$\n]+\$)", re.S)
_INLINE_ESCAPE = re.compile(r"(\\+)([*_`~\[\]<])")
_BLOCK_ESCAPE = re.compile(r"^( {0,3}(?:\d{1,9})?)\\([#>+\-.)])", re.M)


@dataclass
class ExtractConfig:
    favor_precision: bool = True  # trafilatura: drop more of what might be boilerplate
    tables: bool = True  # keep tables (as markdown tables)
    markdown_escapes: bool = False  # keep trafilatura's my\_name, a\*b (else my_name, a*b)


@dataclass
class Extracted:
    """The text of a record (None when it is removed), why it was removed, and a note on a
    record that was kept but is suspect (its encoding)."""
    text: str | None
    removed: str | None = None
    note: str | None = None


def declared_charset(raw: bytes, http_charset: str | None) -> str | None:
    """The server's charset, else the first <meta> charset in the page's first 4 KB."""
    if http_charset:
        return http_charset.lower()
    found = _META_CHARSET.search(raw[:4096])
    return found.group(1).decode("ascii").lower() if found else None


def _guess(raw: bytes) -> tuple[str, str]:
    """The page decoded in the charset resiliparse detects (uchardet, WHATWG names; 0.5 ms on
    a 70 KB page, where chardet takes 0.5 s and charset-normalizer read French cp1252 as
    cp1250), falling back to UTF-8 and cp1252 with replacement characters."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    found = detect_encoding(raw)
    return bytes_to_str(raw, found), found


def decode_html(raw: bytes, http_charset: str | None = None) -> tuple[str, str | None]:
    """(text, note): the page decoded as declared, or guessed and noted."""
    declared = declared_charset(raw, http_charset)
    if declared:
        try:
            return raw.decode(declared), None
        except (LookupError, UnicodeDecodeError):
            text, found = _guess(raw)
            return text, f"wrong declared encoding {declared} (read as {found})"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text, found = _guess(raw)
        return text, f"undeclared encoding (read as {found})"


def _unescape(match: re.Match) -> str:
    run = match.group(1)
    return run[:len(run) // 2] + match.group(2) if len(run) % 2 else match.group(0)


def unescape_markdown(text: str) -> str:
    """Markdown as a person writes it: trafilatura's escapes (see above) undone outside code
    and math."""
    parts = _PROTECTED.split(text)
    parts[::2] = [_BLOCK_ESCAPE.sub(r"\1\2", _INLINE_ESCAPE.sub(_unescape, p))
                  for p in parts[::2]]
    return "".join(parts)


def html_text(html: str, cfg: ExtractConfig) -> str | None:
    """The main content of a page as markdown, or None when it has none."""
    import trafilatura
    text = trafilatura.extract(html, output_format="markdown", include_tables=cfg.tables,
                               include_comments=False, include_images=False,
                               include_links=False, deduplicate=False, fast=True,
                               favor_precision=cfg.favor_precision)
    return text if text is None or cfg.markdown_escapes else unescape_markdown(text)


def pdf_text(raw: bytes) -> Extracted:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            return Extracted(None, "encrypted PDF")
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        return Extracted(None, f"unreadable PDF ({type(e).__name__})")
    except NotImplementedError:  # an encryption algorithm pypdf cannot undo
        return Extracted(None, "encrypted PDF")
    return Extracted(text) if text.strip() else Extracted(None, "PDF without text")


def extract(record: Record, cfg: ExtractConfig) -> Extracted:
    """A record's text as the module's docstring says."""
    if record.text is not None:
        return Extracted(record.text)
    if record.raw is None:
        return Extracted(None, "no text")  # a chat record: not organic text
    kind = record.content_type
    if kind in HTML_TYPES:
        html, note = decode_html(record.raw, record.metadata.get("charset"))
        text = html_text(html, cfg)
        return Extracted(text, None if text else "no main content", note)
    if kind == "application/pdf":
        return pdf_text(record.raw)
    if kind.startswith("text/"):
        text, note = decode_html(record.raw, record.metadata.get("charset"))
        return Extracted(text, note=note) if text.strip() else Extracted(None, "empty text")
    return Extracted(None, f"unsupported content type {kind}")


def quiet_libraries() -> None:
    """trafilatura and pypdf log a line for every odd page; the run's counts say it once."""
    for name in ("trafilatura", "htmldate", "pypdf", "charset_normalizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
