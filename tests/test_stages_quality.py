"""tools.stages quality_label / quality_filter / chunk through tools.pipeline (the loopback
teacher server with a scripted responder), and the `phijax-tools seeds` command."""
import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_stages import TEACHER, Script, run_stage, start_server  # noqa: E402

from tools import seeds  # noqa: E402
from tools.pipeline import PipelineError, load_pipeline, read_records, run_pipeline  # noqa: E402
from tools.quality import SCORE_PROMPT, QualityClassifier  # noqa: E402
from tools.seeds import count_words  # noqa: E402
from tools.stages import TEMPLATES  # noqa: E402

DOCS = {"a": "Derivation: the derivative of x squared is two x, by the limit definition.",
        "b": "BUY NOW cheap pills click here best offer",
        "c": "A proof by induction: base case, then the inductive step.",
        "d": "The teacher replies with nonsense for this one."}
REPLIES = {"a": "Rigorous.\nScore: 5", "b": "Spam.\n**Score:** 0", "c": "Good.\nScore = 4/5",
           "d": "I cannot rate this."}


def test_score_prompt_single_source():
    assert SCORE_PROMPT == (TEMPLATES / "quality_score.txt").read_text()


def test_quality_label(tmp_path):
    def reply(prompt, n, i):
        (k,) = [k for k, v in DOCS.items() if v in prompt]
        assert prompt == SCORE_PROMPT.replace("{text}", DOCS[k])
        return REPLIES[k]
    script = Script(reply)
    seeds_ = [{"id": k, "text": v} for k, v in DOCS.items()]
    recs, stage, summary, requests = run_stage(
        tmp_path, seeds_, {"name": "ql", "type": "quality_label"}, script)
    assert requests == 4 and set(recs) == {"a", "b", "c"}
    assert {k: r["quality_score"] for k, r in recs.items()} == {"a": 5, "b": 0, "c": 4}
    assert recs["a"]["id"] == "a/ql/0" and recs["a"]["text"] == DOCS["a"]
    assert recs["a"]["provenance"]["stages"][-1]["reply"] == REPLIES["a"]
    assert stage.stats == {"kept": 3, "score_5": 1, "score_0": 1, "score_4": 1,
                           "dropped_unparsed": 1}


GOOD = ["the proof uses induction on n with a base case and an inductive step",
        "we derive the formula step by step and explain each lemma carefully",
        "the algorithm sorts the list and we prove its running time bound",
        "this theorem follows from the definition and a short derivation"]
BAD = ["buy now cheap pills click here best offer limited deal",
       "click here to win free money casino bonus offer now",
       "cheap deals buy now discount click subscribe offer",
       "best offer free bonus click here buy cheap now"]


@pytest.fixture
def model_path(tmp_path):
    clf = QualityClassifier.train(GOOD * 3 + BAD * 3, [5] * 12 + [0] * 12)
    return str(clf.save(tmp_path / "model.npz"))


def _no_teacher(prompt, n, i):
    raise AssertionError("this stage must not call the teacher")


def _run(tmp_path, seeds_, stage):
    """Run one teacher-free stage; all output records by id."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds_))
    srv = start_server(responder=Script(_no_teacher))
    try:
        pipe = load_pipeline(raw={"teacher": dict(TEACHER, base_url=srv.url),
                                  "input": str(tmp_path / "seeds.jsonl"),
                                  "output": str(tmp_path / "run"), "stages": [stage]})
        summary = asyncio.run(run_pipeline(pipe, progress=False))
        assert srv.stats.snapshot()["requests"] == 0
    finally:
        srv.stop()
    assert summary["seeds_failed"] == 0
    return {r["id"]: r for r in read_records(tmp_path / "run")}, pipe.stages[0]


def test_quality_filter(tmp_path, model_path):
    seeds_ = [{"id": "good", "text": "we prove the theorem by induction with a careful derivation"},
              {"id": "bad", "text": "click here buy cheap pills best offer now"}]
    clf = QualityClassifier.load(model_path)
    probs = clf.score([s["text"] for s in seeds_])
    assert probs[0] > 0.5 > probs[1]
    recs, stage = _run(tmp_path, seeds_, {"name": "qf", "type": "quality_filter",
                                          "model": model_path, "threshold": 0.5})
    assert set(recs) == {"good/qf/0"}
    assert recs["good/qf/0"]["quality_prob"] == round(float(probs[0]), 6)
    assert stage.stats == {"kept": 1, "dropped_low_quality": 1}
    # a threshold of 0 keeps everything
    recs, _ = _run(tmp_path / "t0", seeds_, {"name": "qf", "type": "quality_filter",
                                             "model": model_path, "threshold": 0.0})
    assert set(recs) == {"good/qf/0", "bad/qf/0"}


def test_quality_filter_validation(tmp_path, model_path):
    base = {"teacher": dict(TEACHER, base_url="http://127.0.0.1:9"),
            "input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "run")}
    (tmp_path / "in.jsonl").write_text("")
    with pytest.raises(PipelineError, match="model"):
        load_pipeline(raw=dict(base, stages=[{"name": "qf", "type": "quality_filter"}]))
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(raw=dict(base, stages=[{"name": "qf", "type": "quality_filter",
                                              "model": str(tmp_path / "nope.npz")}]))
    (tmp_path / "junk.npz").write_text("not a model")
    with pytest.raises(PipelineError, match="cannot load"):
        load_pipeline(raw=dict(base, stages=[{"name": "qf", "type": "quality_filter",
                                              "model": str(tmp_path / "junk.npz")}]))
    with pytest.raises(PipelineError, match="threshold"):
        load_pipeline(raw=dict(base, stages=[{"name": "qf", "type": "quality_filter",
                                              "model": model_path, "threshold": 1.5}]))


LONG = "# Title\n\n" + "\n\n".join(
    " ".join(f"w{p}_{i}." for i in range(12)) for p in range(6))


def test_chunk_stage(tmp_path):
    seeds_ = [{"id": "doc", "text": LONG, "source": "web"}, {"id": "empty", "text": "   "}]
    recs, stage = _run(tmp_path, seeds_, {"name": "ch", "type": "chunk", "max_tokens": 30})
    expected = seeds.chunk_document(LONG, max_tokens=30)
    assert len(expected) > 1
    assert [recs[f"doc/ch/{i}"]["text"] for i in range(len(expected))] == expected
    assert len(recs) == len(expected)
    assert all(count_words(r["text"]) <= 30 and r["source"] == "web" for r in recs.values())
    assert recs["doc/ch/0"]["provenance"]["stages"][-1]["chunks"] == len(expected)
    assert stage.stats == {"chunks": len(expected), "dropped_empty": 1}
    # stable ids: a rerun elsewhere gives the same ids and texts
    recs2, _ = _run(tmp_path / "again", seeds_, {"name": "ch", "type": "chunk", "max_tokens": 30})
    assert {k: r["text"] for k, r in recs2.items()} == {k: r["text"] for k, r in recs.items()}


def test_chunk_stage_validation(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    with pytest.raises(PipelineError, match="max_tokens"):
        load_pipeline(raw={"teacher": dict(TEACHER, base_url="http://127.0.0.1:9"),
                           "input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "r"),
                           "stages": [{"name": "ch", "type": "chunk", "max_tokens": 0}]})


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_seeds_cli_chunk_and_dedup(tmp_path, capsys):
    from tools.cli import main
    inp = _jsonl(tmp_path / "in.jsonl", [{"id": "doc", "text": LONG}, {"id": "s", "text": "short"}])
    assert main(["seeds", "chunk", inp, str(tmp_path / "chunks.jsonl"), "--max-tokens", "30"]) == 0
    out = [json.loads(l) for l in (tmp_path / "chunks.jsonl").read_text().splitlines()]
    expected = seeds.chunk_document(LONG, max_tokens=30)
    assert [r["id"] for r in out] == [f"doc/chunk/{i}" for i in range(len(expected))] + \
        ["s/chunk/0"]
    assert [r["text"] for r in out[:-1]] == expected and out[0]["source_id"] == "doc"
    assert json.loads(capsys.readouterr().out) == {"records": 2, "chunks": len(expected) + 1}

    text = "the quick brown fox jumps over the lazy dog " * 5
    inp = _jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": text}, {"id": 2, "text": text.upper()},
                                        {"id": 3, "text": "something else entirely here"}])
    assert main(["seeds", "dedup", inp, str(tmp_path / "dd.jsonl")]) == 0
    kept = [json.loads(l)["id"] for l in (tmp_path / "dd.jsonl").read_text().splitlines()]
    assert kept == [1, 3]
    assert json.loads(capsys.readouterr().out)["exact_duplicates"] == 1


def test_seeds_cli_code_subprocess(tmp_path):
    import subprocess
    src = "def f():\n    return 1\n\n\nclass C:\n    pass\n"
    inp = _jsonl(tmp_path / "code.jsonl", [{"path": "m.py", "text": src}])
    cli = Path(sys.executable).parent / "phijax-tools"
    r = subprocess.run([str(cli), "seeds", "code", inp, str(tmp_path / "units.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    units = [json.loads(l) for l in (tmp_path / "units.jsonl").read_text().splitlines()]
    assert [(u["name"], u["kind"]) for u in units] == [("f", "function"), ("C", "class")]
