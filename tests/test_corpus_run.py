"""`phijax-tools corpus run`: WARC, parquet, zstandard JSONL and PDF inputs through extraction,
language ID, heuristics and dedup on two processes; counts per step and reason, samples of
what was removed, per-language outputs, resume, strict mode."""
import json
from pathlib import Path

import pytest

from corpus_fixtures import NAVIGATION, jsonl_bytes, write_parquet, write_pdf, write_warc, write_zst
from test_corpus_heuristics import PROSE
from tools.cli import main as tools_main
from tools.corpus.steps import read_docs

ROOT = Path(__file__).resolve().parent.parent
NOTE = ["The committee met on Monday to discuss the new budget for the school.",
        "Most members agreed that the library needs more books and longer hours.",
        "A final vote will take place next month after the public meeting."]


def article(extra: str = "") -> str:
    """A page of prose that passes every filter, with navigation and a footer around it."""
    body = "\n".join(f"<p>{p}</p>" for p in PROSE)
    return f"<html><head><title>The town</title></head><body><nav><a href='/'>Home</a></nav>" \
           f"<article><h1>The town</h1>{body}<p>{extra}</p></article>" \
           f"<footer>Privacy policy</footer></body></html>"


def topic(name: str) -> str:
    """A Python reference topic: real English prose that passes every filter."""
    from pydoc_data.topics import topics
    return topics[name]


FRENCH = ("Le fleuve traverse la vieille ville et passe devant le moulin construit au siècle "
          "dernier. Les paysans apportent leurs légumes au marché le samedi matin, et la place "
          "est pleine d'acheteurs venus des villages voisins. En hiver, l'eau gèle près des "
          "rives, et les enfants y patinent pendant que leurs parents regardent depuis le pont. "
          "Un petit musée garde les outils des meuniers, avec des dessins qui montrent comment "
          "la roue faisait tourner les lourdes meules. Aujourd'hui la ville est connue pour son "
          "pain, ses rues calmes et un festival de musique chaque été.")


def make_inputs(root: Path) -> Path:
    inputs = root / "inputs"
    inputs.mkdir()
    pdf = write_pdf(root / "note.pdf", NOTE).read_bytes()
    write_warc(inputs / "crawl.warc.gz", [
        ("https://e.com/town", article().encode(), "text/html; charset=utf-8"),
        ("https://e.com/copy", article().encode(), "text/html"),  # an exact copy
        ("https://e.com/near", article("One more line.").encode(), "text/html"),
        ("https://e.com/nav", NAVIGATION.encode(), "text/html"),
        ("https://e.com/fr", f"<html><body><article><p>{FRENCH}</p></article></body></html>"
         .encode(), "text/html"),
        ("https://e.com/note.pdf", pdf, "application/pdf")])
    write_zst(inputs / "docs.jsonl.zst", [jsonl_bytes([
        {"text": topic("augassign"), "source": "docs"},
        {"text": "buy cheap watches today\n" * 200, "source": "spam"}])])
    write_parquet(inputs / "data" / "train-00000-of-00001.parquet",
                  [{"text": topic("binary")}, {"text": topic("class")}], row_group_size=1)
    (inputs / "data" / "broken.parquet").write_bytes(b"not parquet")
    return inputs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    inputs, out = make_inputs(root), root / "out"
    overrides = [f"inputs=[{inputs}]", f"output={out}", "workers=2", "samples_per_reason=1",
                 "langid.languages=[en, fr]", "heuristics.gopher_quality.min_stop_words=0",
                 "dedup.partitions=2"]
    assert tools_main(["corpus", "run", str(ROOT / "configs/corpus/web.yaml"), *overrides,
                       "--no-progress"]) == 0
    return root, out, overrides


def test_every_step_counts_what_it_removes_and_routes_by_language(run):
    root, out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["read", "extract", "langid", "heuristics", "dedup"]
    assert [steps[s]["in"] for s in steps] == [11, 10, 9, 9, 7]
    (reason,) = steps["read"]["removed"]
    assert reason.startswith("cannot open") and "broken.parquet" in steps["read"]["examples"][0]
    assert steps["extract"]["removed"] == {"no main content": 1}
    assert steps["heuristics"]["removed"] == {"corruption: compression ratio too low": 1,
                                              "gopher_quality: word count": 1}
    assert steps["dedup"]["removed"] == {"exact duplicate": 1, "near duplicate": 1}
    assert summary["outputs"] == {"en": 4, "fr": 1} and summary["documents"] == 5
    assert summary["dedup"]["sizes"] == {"3": 1}
    docs = [d for p in sorted(out.glob("*/part-*.jsonl.zst")) for d in read_docs(p)]
    assert len(docs) == 5
    town = next(d for d in docs if d.get("url") == "https://e.com/town")
    assert town["language"] == "en" and town["language_score"] > 0.65
    assert town["id"] == town["cluster"] == f"{root / 'inputs' / 'crawl.warc.gz'}@0"
    assert town["text"].startswith("# The town\n\nThe river runs through the old town")
    assert "Privacy" not in town["text"] and "Home" not in town["text"]
    fr = next(d for d in docs if d["language"] == "fr")
    assert fr["url"] == "https://e.com/fr"
    assert {d.get("source") for d in docs} == {None, "docs"}
    augassign = next(d for d in docs if d.get("source") == "docs")["text"]
    assert "Augmented assignment is the combination" in augassign
    assert "*****" not in augassign  # C4 dropped the one-word underline
    near = [json.loads(l) for l in open(out / "removed" / "dedup" / "near-duplicate.jsonl")]
    assert near[0]["url"] == "https://e.com/near"
    assert near[0]["removed"] == {"step": "dedup", "reason": "near duplicate"}
    spam = (out / "removed" / "heuristics" / "corruption-compression-ratio-too-low.jsonl")
    assert json.loads(spam.read_text())["source"] == "spam"


def test_the_resiliparse_engine_keeps_and_removes_the_same_documents(run, tmp_path):
    _, out, overrides = run
    fast = tmp_path / "fast"
    assert tools_main(["corpus", "run", str(ROOT / "configs/corpus/web.yaml"), *overrides,
                       f"output={fast}", "extract.engine=resiliparse", "--no-progress"]) == 0
    slow, quick = (json.loads((o / "summary.json").read_text()) for o in (out, fast))
    for step in ("extract", "langid", "heuristics", "dedup"):
        assert quick["steps"][step]["in"] == slow["steps"][step]["in"]
        assert quick["steps"][step]["removed"] == slow["steps"][step]["removed"]
    assert quick["outputs"] == slow["outputs"]
    town = next(d for p in sorted(fast.glob("en/part-*.jsonl.zst")) for d in read_docs(p)
                if d.get("url") == "https://e.com/town")
    assert town["text"].startswith("# The town\n\nThe river runs through the old town")
    assert "Privacy" not in town["text"] and "Home" not in town["text"]


def test_the_run_times_each_step(run):
    _, out, _ = run
    seconds = json.loads((out / "timing.json").read_text())["seconds"]
    assert sorted(seconds) == ["dedup", "extract", "heuristics", "langid", "signatures"]
    assert all(s > 0 for s in seconds.values())


def test_a_rerun_redoes_only_unfinished_shards(run, caplog):
    root, out, overrides = run
    before = json.loads((out / "summary.json").read_text())
    counts = sorted((out / ".work" / "counts").glob("0*[0-9].json"))
    stamps = {p: p.stat().st_mtime_ns for p in counts}
    counts[0].unlink()  # as if killed before this shard finished
    with caplog.at_level("INFO", logger="phijax"):
        assert tools_main(["corpus", "run", str(ROOT / "configs/corpus/web.yaml"), *overrides,
                           "--no-progress"]) == 0
    assert f"resuming, {len(counts) - 1} of {len(counts)} shards already filtered" in caplog.text
    assert [p.stat().st_mtime_ns == stamps[p] for p in counts[1:]] == [True] * (len(counts) - 1)
    assert json.loads((out / "summary.json").read_text()) == before


def test_strict_stops_at_the_first_bad_input(run, capsys):
    root, out, overrides = run
    strict = [o for o in overrides if not o.startswith("output=")] + \
        [f"output={root / 'strict'}", "strict=true", "workers=1"]
    assert tools_main(["corpus", "run", str(ROOT / "configs/corpus/web.yaml"), *strict,
                       "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("phijax-tools: error: ") and "broken.parquet: cannot open" in line
