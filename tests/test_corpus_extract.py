"""Extraction: HTML main content keeps code, tables and math; boilerplate pages give nothing;
encodings; PDF text, encrypted and broken PDFs; TeX as source."""
from corpus_fixtures import ARTICLE, NAVIGATION, page, write_pdf
from phijax.data.readers import Record
from tools.corpus.extract import ExtractConfig, extract

CFG = ExtractConfig()


def html(raw: bytes, **meta) -> Record:
    return Record("page", raw=raw, content_type="text/html", metadata=meta)


def test_html_keeps_code_tables_and_math_and_drops_boilerplate():
    out = extract(html(ARTICLE.encode()), CFG)
    assert out.removed is None and out.note is None
    text = out.text
    assert "```\ndef insertion_sort(xs):\n    for i in range(1, len(xs)):" in text  # code block
    assert "| 1000 | 0.05 |" in text and "| n | seconds |" in text  # table
    assert r"$\frac{n(n-1)}{2}$" in text  # MathML as its TeX annotation
    # prose as written, without markdown's escapes (insertion\_sort, n\*n, \[adjacent\])
    assert "insertion_sort(my_list); it makes at most n*n comparisons of [adjacent] items" in text
    escaped = extract(html(ARTICLE.encode()), ExtractConfig(markdown_escapes=True)).text
    assert r"insertion\_sort(my\_list)" in escaped
    for boilerplate in ("Home", "About us", "Copyright", "Privacy"):
        assert boilerplate not in text
    nav = extract(html(NAVIGATION.encode()), CFG)
    assert nav.text is None and nav.removed == "no main content"


def test_the_resiliparse_engine_writes_the_same_markdown_elements():
    fast = ExtractConfig(engine="resiliparse")
    text = extract(html(ARTICLE.encode()), fast).text
    assert "# Sorting integers quickly\n" in text
    assert "```\ndef insertion_sort(xs):\n    for i in range(1, len(xs)):" in text
    assert "        while j and xs[j - 1] > xs[j]:" in text  # entities undone in code
    assert "| n | seconds |\n|---|---|\n| 1000 | 0.05 |\n| 10000 | 4.9 |" in text
    assert r"worst case is $\frac{n(n-1)}{2}$ which" in text  # the TeX, not MathML's text too
    assert "insertion_sort(my_list); it makes at most n*n comparisons of [adjacent] items" in text
    for boilerplate in ("Home", "About us", "Copyright", "Privacy"):
        assert boilerplate not in text
    nav = extract(html(NAVIGATION.encode()), fast)
    assert nav.text is None and nav.removed == "no main content"
    page_ = ("<html><body><article><h2> Steps &amp; notes</h2><p>" + "A sentence of prose. " * 8 +
             "</p><ol><li><p>first</p></li><li>second<ul><li>inner</li></ul></li></ol>"
             "<pre>int f(int a,<br>      int b);</pre></article></body></html>")
    text = extract(html(page_.encode()), fast).text
    assert text.startswith("## Steps & notes\n")
    assert "1. first" in text and "2. second" in text and "- inner" in text
    assert "```\nint f(int a,\n      int b);\n```" in text  # <br> inside <pre> a line break
    blank = page("Blank", "A formula with no text: <math><semantics><annotation encoding="
                 "'application/x-tex'></annotation></semantics></math> leaves nothing behind. " * 4)
    assert "$" not in extract(html(blank.encode()), fast).text
    no_tables = extract(html(ARTICLE.encode()), ExtractConfig(engine="resiliparse", tables=False))
    assert "1000" not in no_tables.text and "insertion_sort(xs)" in no_tables.text


def test_html_encodings_declared_wrong_and_undeclared():
    body = ("Le café est une boisson préparée à partir des grains torréfiés du caféier, très "
            "appréciée en Europe et ailleurs depuis des siècles.")
    latin = page("Café", body).encode("latin-1")
    declared = extract(html(latin.replace(b"<head>", b'<head><meta charset="iso-8859-1">')), CFG)
    undeclared = extract(html(latin), CFG)
    wrong = extract(html(latin, charset="utf-8"), CFG)
    for out in (declared, undeclared, wrong):
        assert body in out.text
    assert declared.note is None
    assert undeclared.note == "undeclared encoding (read as cp1252)"
    assert wrong.note == "wrong declared encoding utf-8 (read as cp1252)"
    server = extract(html(page("Москва", "столица России " * 8).encode("cp1251"),
                          charset="windows-1251"), CFG)
    assert "столица России" in server.text and server.note is None


def test_pdf_text_encrypted_and_broken(tmp_path):
    def pdf(path):
        return Record(str(path), raw=path.read_bytes(), content_type="application/pdf")

    good = extract(pdf(write_pdf(tmp_path / "a.pdf", ["Hello PDF world", "second line"])), CFG)
    assert good.text.split("\n")[:2] == ["Hello PDF world", "second line"]
    locked = extract(pdf(write_pdf(tmp_path / "b.pdf", ["secret"], password="pw")), CFG)
    assert locked.text is None and locked.removed == "encrypted PDF"
    (tmp_path / "c.pdf").write_bytes(b"%PDF-1.4\nthis is no pdf at all")
    broken = extract(pdf(tmp_path / "c.pdf"), CFG)
    assert broken.text is None and broken.removed.startswith("unreadable PDF")


def test_tex_and_text_are_kept_as_source():
    tex = r"\section{Intro} Let $x^2 + y^2 = z^2$. \begin{equation}E = mc^2\end{equation}"
    assert extract(Record("t", text=tex, content_type="text/x-tex"), CFG).text == tex
    raw = Record("w", raw="plain words".encode(), content_type="text/plain")
    assert extract(raw, CFG).text == "plain words"
    image = Record("i", raw=b"\x89PNG", content_type="image/png")
    assert extract(image, CFG).removed == "unsupported content type image/png"
