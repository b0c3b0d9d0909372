"""Small corpus inputs the corpus tests build: WARC files written with warcio from HTML strings,
parquet in the Hugging Face layout, compressed JSONL, and PDFs written by pypdf."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

ARTICLE = """<html><head><title>Sorting</title></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/blog">Blog</a></li>
<li><a href="/about">About us</a></li></ul></nav>
<article><h1>Sorting integers quickly</h1>
<p>Insertion sort is simple and fast on short arrays. The following function sorts a list in
place, and we will measure how long it takes on inputs of different sizes.</p>
<p>Call it as insertion_sort(my_list); it makes at most n*n comparisons of [adjacent] items.</p>
<pre><code>def insertion_sort(xs):
    for i in range(1, len(xs)):
        j = i
        while j and xs[j - 1] &gt; xs[j]:
            xs[j - 1], xs[j] = xs[j], xs[j - 1]
            j -= 1
</code></pre>
<p>Its running time grows quadratically with the input length, as the table of measurements
below shows for two sizes.</p>
<table><tr><th>n</th><th>seconds</th></tr><tr><td>1000</td><td>0.05</td></tr>
<tr><td>10000</td><td>4.9</td></tr></table>
<p>The number of comparisons in the worst case is
<math xmlns="http://www.w3.org/1998/Math/MathML"><semantics><mrow><mfrac><mrow><mi>n</mi>
<mo>(</mo><mi>n</mi><mo>-</mo><mn>1</mn><mo>)</mo></mrow><mn>2</mn></mfrac></mrow>
<annotation encoding="application/x-tex">\\frac{n(n-1)}{2}</annotation></semantics></math>
which is why it is only used for short arrays in practice.</p>
</article>
<footer>Copyright 2024 Example Corp. All rights reserved. Privacy policy. Terms of use.</footer>
</body></html>"""

NAVIGATION = """<html><body><nav><a href="/">Home</a> | <a href="/x">Products</a> |
<a href="/y">Contact</a></nav><div class="menu"><ul><li><a href="/a">Login</a></li>
<li><a href="/b">Register</a></li><li><a href="/c">Cart (0)</a></li></ul></div>
<footer>Copyright 2024 Example Corp. All rights reserved. <a href="/p">Privacy policy</a>
<a href="/t">Terms</a></footer></body></html>"""


def page(title: str, body: str) -> str:
    return f"<html><head><title>{title}</title></head><body><article><h1>{title}</h1>" \
           f"<p>{body}</p></article></body></html>"


def write_warc(path: Path, pages: list[tuple[str, bytes, str]], gzip_: bool = True) -> list[int]:
    """A WARC of response records (url, payload bytes, Content-Type); the records' offsets."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter
    offsets = []
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip_)
        for url, payload, content_type in pages:
            offsets.append(f.tell())
            headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)],
                                       protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                url, "response", payload=io.BytesIO(payload), http_headers=headers))
    return offsets


def write_parquet(path: Path, rows: list[dict], row_group_size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_zst(path: Path, frames: list[bytes]) -> list[int]:
    """Each item compressed as its own zstandard frame; the frames' offsets."""
    import zstandard
    offsets, data = [], b""
    for frame in frames:
        offsets.append(len(data))
        data += zstandard.ZstdCompressor().compress(frame)
    path.write_bytes(data)
    return offsets


def write_gz(path: Path, members: list[bytes]) -> list[int]:
    offsets, data = [], b""
    for member in members:
        offsets.append(len(data))
        data += gzip.compress(member)
    path.write_bytes(data)
    return offsets


def write_pdf(path: Path, lines: list[str], password: str | None = None) -> Path:
    """A one-page PDF showing `lines` (Helvetica), encrypted with `password` when given."""
    from pypdf import PdfWriter
    from pypdf.generic import DictionaryObject, NameObject, StreamObject
    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    text = " ".join(f"({line}) Tj T*" for line in lines)
    stream = StreamObject()
    stream.set_data(f"BT /F1 12 Tf 14 TL 72 720 Td {text} ET".encode())
    page[NameObject("/Contents")] = writer._add_object(stream)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                             NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
        {NameObject("/F1"): writer._add_object(font)})})
    if password:
        writer.encrypt(password, algorithm="RC4-128")
    with open(path, "wb") as f:
        writer.write(f)
    return path
