"""Readers: JSONL (plain, gzip, zstandard), parquet by row group, WARC, folders of files; bad
input counted and named, the read going on; `phijax data tokenize` over them."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from corpus_fixtures import (ARTICLE, jsonl_bytes, page, write_gz, write_parquet, write_pdf,
                             write_warc, write_zst)
from phijax.data.corpus import documents
from phijax.data.readers import Skipped, plan_files, read_shard
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import Tokenizer, train_tokenizer
from phijax.errors import DataError


def read_all(path, text_field="text", glob=None, strict=False, shard_bytes=1 << 20):
    skipped = Skipped(strict=strict)
    shards = plan_files(path, glob, shard_bytes, skipped)
    return [r for s in shards for r in read_shard(s, text_field, skipped)], skipped, shards


def rows(start, n):
    return [{"text": f"document {i}", "n": i} for i in range(start, start + n)]


def test_compressed_jsonl_reads_like_plain_and_skips_a_corrupt_member(tmp_path):
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(jsonl_bytes(rows(0, 9)))
    gz, zst = tmp_path / "a.jsonl.gz", tmp_path / "a.jsonl.zst"
    members = [jsonl_bytes(rows(k, 3)) for k in (0, 3, 6)]
    write_gz(gz, members)
    write_zst(zst, members)
    expected = [(f"document {i}", {"n": i}) for i in range(9)]
    for path in (plain, gz, zst):
        records, skipped, _ = read_all(path)
        assert [(r.text, r.metadata) for r in records] == expected and not skipped.counts
    assert [r.id for r in read_all(zst)[0]][:2] == [f"{zst}:1", f"{zst}:2"]

    # The middle member's compressed bytes overwritten: its records are lost, the rest read.
    for path, offsets, codec in ((gz, write_gz(gz, members), "gzip"),
                                 (zst, write_zst(zst, members), "zstandard")):
        data = bytearray(path.read_bytes())
        data[offsets[1] + 12:offsets[2] - 6] = b"\xff" * (offsets[2] - offsets[1] - 18)
        path.write_bytes(bytes(data))
        records, skipped, _ = read_all(path)
        assert [r.text for r in records] == [f"document {i}" for i in (0, 1, 2, 6, 7, 8)]
        assert skipped.counts == {f"corrupt {codec} data": 1}
        assert skipped.examples == [f"{path}@{offsets[1]}: corrupt {codec} data"]
    # A file cut short in its last member: what came before is read, the cut is counted.
    offsets = write_zst(zst, members)
    zst.write_bytes(zst.read_bytes()[:-5])
    records, skipped, _ = read_all(zst)
    assert len(records) == 6 and skipped.examples == [
        f"{zst}@{offsets[2]}: truncated zstandard data"]


def test_parquet_in_the_hugging_face_layout_reads_by_row_group(tmp_path):
    data = tmp_path / "ds" / "data"
    write_parquet(data / "train-00000-of-00002.parquet", rows(0, 10), row_group_size=4)
    write_parquet(data / "train-00001-of-00002.parquet", rows(10, 5), row_group_size=4)
    write_parquet(data / "extra.parquet", [{"body": "no text column"}], row_group_size=4)
    (data / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    records, skipped, shards = read_all(tmp_path / "ds")
    names = ["extra.parquet"] + ["train-00000-of-00002.parquet"] * 3 + \
        ["train-00001-of-00002.parquet"] * 2  # broken.parquet has none
    assert [(os.path.basename(s.paths[0]), s.start, s.line) for s in shards] == \
        list(zip(names, [0, 0, 1, 2, 0, 1], [0, 0, 4, 8, 0, 4]))
    assert [r.text for r in records] == [f"document {i}" for i in range(15)]
    first = data / "train-00000-of-00002.parquet"
    assert records[5].id == f"{first}#5" and records[5].metadata == {"n": 5}
    assert skipped.counts.pop("no column 'text'") == 1
    (reason,) = skipped.counts
    assert reason.startswith("cannot open (") and skipped.counts[reason] == 1
    assert f"{data / 'extra.parquet'}#0: no column 'text'" in skipped.examples
    # The text column is whatever text_field names.
    assert [r.text for r in read_all(data / "extra.parquet", "body")[0]] == ["no text column"]


def test_warc_response_records_and_damaged_archives(tmp_path):
    pages = [(f"https://example.com/{i}", page(f"Page {i}", f"body {i}").encode(),
              "text/html; charset=UTF-8") for i in range(4)]
    pages.append(("https://example.com/doc.pdf", b"%PDF-1.4 bytes", "application/pdf"))
    warc = tmp_path / "crawl.warc.gz"
    offsets = write_warc(warc, pages)
    records, skipped, shards = read_all(warc)
    assert len(shards) == 1 and not skipped.counts
    assert [r.raw for r in records] == [p[1] for p in pages]
    assert [r.content_type for r in records] == ["text/html"] * 4 + ["application/pdf"]
    assert records[1].id == f"{warc}@{offsets[1]}"
    assert records[1].metadata["url"] == "https://example.com/1"
    assert records[1].metadata["charset"] == "utf-8"

    # A corrupt gzip member (record 1): the others are read, the damage named by offset.
    data = bytearray(warc.read_bytes())
    data[offsets[1] + 20:offsets[2] - 10] = b"\x00" * (offsets[2] - offsets[1] - 30)
    corrupt = tmp_path / "corrupt.warc.gz"
    corrupt.write_bytes(bytes(data))
    records, skipped, _ = read_all(corrupt)
    assert [r.metadata["url"][-1] for r in records] == ["0", "2", "3", "f"]
    (reason,) = skipped.counts
    assert reason.startswith("corrupt WARC data") and skipped.counts[reason] == 1

    # Cut short inside the last record, compressed or not.
    plain = tmp_path / "crawl.warc"
    plain_offsets = write_warc(plain, pages, gzip_=False)
    for path, cut in ((warc, offsets[4] + 40), (plain, plain_offsets[4] + 400)):
        truncated = path.with_name("cut-" + path.name)
        truncated.write_bytes(path.read_bytes()[:cut])
        records, skipped, _ = read_all(truncated)
        assert len(records) == 4
        assert sum(skipped.counts.values()) == 1, skipped.counts
        assert skipped.examples[0].startswith(f"{truncated}@")


def test_warc_cut_into_many_shards_reads_every_record_once(tmp_path):
    pages = [(f"https://example.com/{i}", page(f"Page {i}", f"body {i} " * (i * 37 % 90)).encode(),
              "text/html") for i in range(24)]
    for path, gz in ((tmp_path / "crawl.warc.gz", True), (tmp_path / "crawl.warc", False)):
        offsets = write_warc(path, pages, gzip_=gz)
        whole, skipped, shards = read_all(path)
        assert len(shards) == 1 and not skipped.counts
        assert [r.id for r in whole] == [f"{path}@{o}" for o in offsets]
        # Cuts inside records, inside headers, and exactly at a record's first byte.
        for shard_bytes in (61, 397, offsets[3] - offsets[2], offsets[1]):
            records, skipped, shards = read_all(path, shard_bytes=shard_bytes)
            assert len(shards) > 4 and not skipped.counts
            assert [(r.id, r.raw) for r in records] == [(r.id, r.raw) for r in whole]

        # Damage inside one record (a gzip member, or a plain record's header): the same records
        # as a whole-file read, the damage counted once however the file is cut.
        data = bytearray(path.read_bytes())
        at = offsets[7] + (20 if gz else 0)
        data[at:offsets[8] - 10] = b"\x00" * (offsets[8] - 10 - at)
        damaged = path.with_name("damaged-" + path.name)
        damaged.write_bytes(bytes(data))
        whole, skipped, _ = read_all(damaged)
        assert [r.metadata["url"] for r in whole] == [u for u, *_ in pages[:7] + pages[8:]]
        assert sum(skipped.counts.values()) == 1, skipped.counts
        for shard_bytes in (61, 397, offsets[8] - offsets[7] - 5):
            records, skipped, shards = read_all(damaged, shard_bytes=shard_bytes)
            assert [r.id for r in records] == [r.id for r in whole]
            assert sum(skipped.counts.values()) == 1, (shard_bytes, skipped.counts)


def test_folders_of_files_keep_bytes_for_html_and_pdf(tmp_path):
    (tmp_path / "notes.md").write_text("# Notes\n\nSome *markdown*.")
    (tmp_path / "paper.tex").write_text(r"\section{Intro} $x^2$")
    (tmp_path / "page.html").write_text(ARTICLE)
    write_pdf(tmp_path / "doc.pdf", ["Hello"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    records, skipped, shards = read_all(tmp_path)
    kinds = {r.metadata["path"]: (r.content_type, r.text is not None) for r in records}
    assert kinds == {"doc.pdf": ("application/pdf", False), "notes.md": ("text/markdown", True),
                     "page.html": ("text/html", False), "paper.tex": ("text/x-tex", True)}
    assert skipped.examples == [f"{tmp_path / 'latin1.txt'}: invalid UTF-8"]
    # A file gone between planning and reading is one line naming it; strict stops there.
    os.remove(tmp_path / "notes.md")
    skipped = Skipped()
    assert len([r for s in shards for r in read_shard(s, "text", skipped)]) == 3
    assert f"{tmp_path / 'notes.md'}: cannot open (No such file or directory)" in skipped.examples
    with pytest.raises(DataError, match="latin1.txt: invalid UTF-8"):
        list(read_shard(shards[0], "text", Skipped(strict=True)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(documents(["builtin:python-docs"]),
                           tmp_path_factory.mktemp("tok") / "sp", vocab_size=400)
    return Tokenizer(path)


def test_tokenize_reads_zst_parquet_and_warc(tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_zst(corpus / "a.jsonl.zst", [jsonl_bytes(rows(0, 3))])
    write_parquet(corpus / "data" / "train-00000-of-00001.parquet", rows(3, 3), 2)
    html = [(f"https://e.com/{i}", page("T", f"warc {i}").encode("latin-1"),
             "text/html; charset=ISO-8859-1") for i in range(2)]
    write_warc(corpus / "c.warc.gz", html + [("https://e.com/x.pdf", b"%PDF", "application/pdf")])
    out = run_cli("data", "tokenize", corpus, "--tokenizer", tokenizer.path, "--out",
                  tmp_path / "store", "--workers", 1)
    store = TokenStore(tmp_path / "store")
    assert store.documents == 8 and "application/pdf needs extraction" in out.stderr
    texts = [tokenizer.decode(store.read(int(a), int(b) - 1).tolist())
             for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    assert texts[:6] == [f"document {i}" for i in range(6)]
    assert texts[6] == page("T", "warc 0")
    # The same store as one built in-process from the same corpus.
    again = TokenStore(build_store([str(corpus)], tokenizer, tmp_path / "again", workers=1))
    np.testing.assert_array_equal(again.read(0, len(again)), store.read(0, len(store)))
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["skipped"] == {
        "application/pdf needs extraction (phijax-tools corpus run)": 1}
