"""Text from what the readers give: HTML through trafilatura (or resiliparse), PDF through pypdf,
TeX as source.

HTML: the page's bytes are decoded in the charset its server or its <meta> declared; a page
whose declared charset does not decode it, or that declares none and is not UTF-8, is decoded
in the charset resiliparse detects and flagged ("wrong declared encoding", "undeclared
encoding"). trafilatura then keeps the main content as markdown: headings, code blocks in ```
fences, tables as markdown tables, MathML formulas as their TeX annotation ($...$); navigation,
menus, footers and comments are dropped, and a page with no main content gives nothing
("no main content"); trafilatura's escapes of markdown characters in prose (my\\_name, a\\*b)
are undone outside code and math unless `markdown_escapes`. `favor_precision` (trafilatura's,
as FineWeb ran it) drops more of what might be boilerplate. trafilatura is the default for
what it drops: resiliparse's main-content mode keeps more boilerplate (the mdBook help panel of
the Rust documentation, tables of contents) and drops some lists of short items.

`engine: resiliparse` trades that for speed (13x trafilatura's pages/s on the Debian
documentation pages of the corpus benchmark, 282 vs 23 on one core; DCLM extracts with it): its
main-content mode on the page, each MathML formula first replaced by its TeX annotation (alone,
resiliparse runs MathML's presentation and TeX together: "n(n-1)2\\frac{n(n-1)}{2}"), and its
minimal-HTML output written as the same markdown as trafilatura's (headings, ``` fences around
<pre> text, lists, tables from its tab-separated rows). `favor_precision` does not apply.

PDF: every page's text through pypdf; an encrypted PDF that the empty password does not open,
a PDF pypdf cannot parse, and a PDF without a text layer (a scan) are each removed and counted.
TeX, markdown and plain text are kept as they are.
"""
from __future__ import annotations

import html as html_entities
import io
import logging
import re
from dataclasses import dataclass

from phijax.config import one_of
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
    engine: str = one_of("trafilatura", "resiliparse")  # HTML main content (see above)
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
    if cfg.engine == "resiliparse":
        return resiliparse_text(html, cfg)
    import trafilatura
    text = trafilatura.extract(html, output_format="markdown", include_tables=cfg.tables,
                               include_comments=False, include_images=False,
                               include_links=False, deduplicate=False, fast=True,
                               favor_precision=cfg.favor_precision)
    return text if text is None or cfg.markdown_escapes else unescape_markdown(text)


_PRE = re.compile(r"<pre>(.*?)</pre>", re.S)
_TAG = re.compile(r"(<[^>]+>)")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def resiliparse_text(html: str, cfg: ExtractConfig) -> str | None:
    """The main content of a page by resiliparse, as markdown (see above), or None."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree
    tree = HTMLTree.parse(html)
    if tree.body is None:
        return None
    for formula in tree.body.query_selector_all("math"):
        tex = formula.query_selector('annotation[encoding="application/x-tex"]')
        tex = " ".join(((tex if tex is not None else formula).text or "").split())
        formula.replace_with(tree.create_text_node(f"${tex}$" if tex else ""))
    marked = extract_plain_text(tree, preserve_formatting="minimal_html", main_content=True,
                                list_bullets=True, alt_texts=False, links=False,
                                form_fields=False, noscript=False, comments=False)
    parts = _PRE.split(marked)  # odd parts: the text of a <pre>
    parts[1::2] = ["```\n" + html_entities.unescape(_TAG.sub(_pre_tag, p)).strip("\n") + "\n```"
                   for p in parts[1::2]]
    parts[::2] = [_minimal_html_markdown(p, cfg.tables) for p in parts[::2]]
    text = _BLANK_LINES.sub("\n\n", "".join(parts)).strip()
    return text or None


def _pre_tag(match: re.Match) -> str:
    """Inside <pre>: a line break for <br> (resiliparse writes no newline there), else nothing."""
    return "\n" if match.group(0).lower() in ("<br>", "<br/>") else ""


def _minimal_html_markdown(marked: str, tables: bool) -> str:
    """resiliparse's minimal HTML (h1-h6, p, br, ul/ol/li, each line break already a newline;
    nested lists indented; table rows as cells separated by two tabs) as markdown."""
    out, lists, marker = [], [], False  # lists: per open list, the next number (0: bullets)
    for token in _TAG.split(marked):
        tag = token[1:-1].lower() if token.startswith("<") else None
        if tag is None:
            if marker:  # an item's or a heading's text follows its marker on the same line
                token = token.lstrip()
                marker = not token
            out.append(html_entities.unescape(token))
        elif tag in ("ul", "ol"):
            lists.append(1 if tag == "ol" else 0)
        elif tag in ("/ul", "/ol") and lists:
            lists.pop()
        elif tag == "li":
            number = lists[-1] if lists else 0
            if number:
                lists[-1] += 1
            out.append(f"{number}. " if number else "- ")
            marker = True
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            out.append("#" * int(tag[1]) + " ")
            marker = True
    lines = [line.rstrip() for line in "".join(out).split("\n")]
    return "\n".join(_tables(lines, tables))


def _tables(lines: list[str], keep: bool) -> list[str]:
    """Runs of tab-separated rows as markdown tables (the first row the header), or dropped."""
    out, first = [], True
    for line in lines:
        if "\t\t" not in line:
            out.append(line)
            first = True
            continue
        if not keep:
            continue
        cells = [c.strip().replace("|", "\\|") for c in line.strip().split("\t\t")]
        out.append("| " + " | ".join(cells) + " |")
        if first:
            out.append("|" + "---|" * len(cells))
        first = False
    return out


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
