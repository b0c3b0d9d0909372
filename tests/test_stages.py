"""tools.stages (difficulty, self_revise, verify_code) through tools.pipeline, against the real
loopback teacher server with a scripted responder (tests/teacher_server.py)."""
import asyncio
import json
import re
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_server import start_server  # noqa: E402

from phijax.eval.answers import extract_python  # noqa: E402
from phijax.hashing import sha256_hex  # noqa: E402
from tools import sandbox  # noqa: E402
from tools.pipeline import PipelineError, load_pipeline, read_records, run_pipeline  # noqa: E402
from tools.stages import TEMPLATES, parse_verdict  # noqa: E402

TEACHER = dict(model="scripted", concurrency=8, max_retries=3, timeout_s=10,
               backoff_base_s=0.005, backoff_max_s=0.05)


class Script:
    """A responder that records every call (kind, prompt, n, i) and answers via `fn`."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, messages, n, i):
        prompt = messages[-1]["content"]
        with self.lock:
            self.calls.append((prompt, n, i))
        return self.fn(prompt, n, i)


def run_stage(tmp_path, seeds, stage, responder):
    with open(tmp_path / "seeds.jsonl", "w") as f:
        for s in seeds:
            f.write(json.dumps(s) + "\n")
    srv = start_server(responder=responder)
    try:
        pipe = load_pipeline(raw={"teacher": dict(TEACHER, base_url=srv.url),
                                  "input": str(tmp_path / "seeds.jsonl"),
                                  "output": str(tmp_path / "run"), "shards": 2,
                                  "stages": [stage]})
        summary = asyncio.run(run_pipeline(pipe, progress=False))
        requests = srv.stats.snapshot()["requests"]
    finally:
        srv.stop()
    assert summary["seeds_failed"] == 0, (tmp_path / "run" / "failures.jsonl").read_text()
    recs = {r["provenance"]["seed_id"]: r for r in read_records(tmp_path / "run")}
    return recs, pipe.stages[0], summary, requests


# ---------------------------------------------------------------- difficulty

ANSWERS = {
    "easy": ["\\boxed{3/4}", "0.75", "3/4", "\\boxed{\\dfrac{3}{4}}"],           # all agree
    "hard": ["\\boxed{1}", "2", "The answer is 3", "I am not sure"],         # none agree
    "mid": ["\\boxed{3/4}", "0.75", "The answer is 3/4.", "\\boxed{5}"],     # plurality 3/4
    "pair": ["\\boxed{7}", "7.0", "\\boxed{2}", "\\boxed{9}"],              # plurality 7 (2/4)
}


def test_difficulty_filter(tmp_path):
    def answer(prompt, n, i):
        (q,) = re.findall(r"Problem:\n(\w+)", prompt)
        return f"Working...\n{ANSWERS[q][i]}"
    script = Script(answer)
    seeds = [{"id": q, "question": q} for q in ANSWERS]
    recs, stage, summary, requests = run_stage(
        tmp_path, seeds, {"name": "diff", "type": "difficulty", "k": 4}, script)
    assert requests == len(seeds) == len(script.calls) // 4   # one call per question, n = k
    assert {n for _, n, _ in script.calls} == {4}
    prompt = script.calls[0][0]
    assert prompt == (TEMPLATES / "difficulty.txt").read_text().replace(
        "{question}", prompt.split("Problem:\n")[1].strip()).replace(
        "{{ANSWER}}", "{ANSWER}")
    assert set(recs) == {"mid", "pair"}
    assert recs["mid"]["reference_answer"] == "3/4" and recs["mid"]["agreement"] == 0.75
    assert recs["mid"]["reference_solution"] == "Working...\n\\boxed{3/4}"
    assert recs["pair"]["reference_answer"] == "7" and recs["pair"]["agreement"] == 0.5
    st = recs["mid"]["provenance"]["stages"][-1]
    assert st["stage"] == "diff" and st["model"] == "scripted"
    assert st["template_sha256"] and st["templates"]["difficulty"] == sha256_hex(
        (TEMPLATES / "difficulty.txt").read_text())
    assert st["counts"] == {"3/4": 3, "5": 1} and st["k"] == 4
    assert recs["mid"]["id"] == "mid/diff/0" and recs["mid"]["question"] == "mid"
    assert stage.stats == {"kept": 2, "dropped_all_agree": 1, "dropped_none_agree": 1}
    assert summary["records"] == 2


# ---------------------------------------------------------------- self-revision

def test_self_revise_rounds(tmp_path):
    def reply(prompt, n, i):
        accept_at = int(re.search(r"accept_at=(\d+)", prompt)[1])
        draft = int(re.search(r"draft-(\d+)", prompt)[1])   # the answer comes before a critique
        if prompt.startswith("You are a meticulous reviewer"):
            verdict = "ACCEPT" if draft >= accept_at else "REVISE"
            return f"draft-{draft} has issues (or not).\n\n**VERDICT: {verdict}**"
        assert prompt.startswith("Revise the answer below"), prompt
        assert f"draft-{draft} has issues" in prompt     # the critique is passed on
        return f"draft-{draft + 1}"
    script = Script(reply)
    seeds = [{"id": "now", "question": "q accept_at=0", "answer": "draft-0"},
             {"id": "one", "question": "q accept_at=1", "answer": "draft-0"},
             {"id": "never", "question": "q accept_at=99", "answer": "draft-0"}]
    recs, stage, summary, requests = run_stage(
        tmp_path, seeds, {"name": "rev", "type": "self_revise", "max_rounds": 2}, script)
    per_seed = {s["id"]: sum(s["question"] in p for p, _, _ in script.calls) for s in seeds}
    # accepted at once: 1 critique; after one revision: C R C; never: C R C R (max_rounds 2)
    assert per_seed == {"now": 1, "one": 3, "never": 4} and requests == 8
    assert {r: recs[r]["answer"] for r in recs} == {"now": "draft-0", "one": "draft-1",
                                                    "never": "draft-2"}
    prov = {r: recs[r]["provenance"]["stages"][-1] for r in recs}
    assert (prov["now"]["rounds"], prov["now"]["accepted"]) == (0, True)
    assert (prov["one"]["rounds"], prov["one"]["accepted"]) == (1, True)
    assert (prov["never"]["rounds"], prov["never"]["accepted"]) == (2, False)
    revs = prov["one"]["revisions"]
    assert [r["verdict"] for r in revs] == ["REVISE", "ACCEPT"]
    assert revs[0]["revision"] == "draft-1" and "revision" not in revs[1]
    assert revs[1]["critique"].startswith("draft-1 has issues")
    assert [r.get("revision") for r in prov["never"]["revisions"]] == ["draft-1", "draft-2"]
    assert all(p["original"] == "draft-0" for p in prov.values())
    assert set(prov["one"]["templates"]) == {"critique", "revise"}
    assert stage.stats == {"accepted": 2, "max_rounds": 1}


def test_parse_verdict():
    assert parse_verdict("fine.\nVERDICT: ACCEPT") == "ACCEPT"
    assert parse_verdict("bad\n**Verdict: revise**.\n") == "REVISE"
    assert parse_verdict("VERDICT: ACCEPT\nbut actually more text") is None
    assert parse_verdict("") is None


# ---------------------------------------------------------------- code verification

def test_extract_python():
    assert extract_python("Fixed:\n```python\ndef f():\n    return 1\n```\ndone") == \
        "def f():\n    return 1\n"
    assert extract_python("```\nx = 1\n```\n```py\nx = 2\n```") == "x = 2\n"
    assert extract_python("no code") is None


@pytest.mark.skipif(sandbox.isolation_mode() is None, reason="no sandbox isolation here")
def test_verify_code_repairs_and_drops(tmp_path):
    def repair(prompt, n, i):
        assert prompt.startswith("The Python code below fails its tests"), prompt
        assert "AssertionError" in prompt                  # the error output is passed on
        if "def add" in prompt:
            return "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
        return "Try this:\n```python\ndef mul(a, b):\n    return a + b\n```"   # still wrong
    script = Script(repair)
    seeds = [
        {"id": "ok", "code": "def sub(a, b):\n    return a - b\n",
         "tests": "assert sub(5, 2) == 3\n"},
        {"id": "fixable", "code": "def add(a, b):\n    return a - b\n",
         "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0\n"},
        {"id": "hopeless", "code": "def mul(a, b):\n    return a - b\n",
         "tests": "assert mul(2, 3) == 6\n"}]
    recs, stage, summary, requests = run_stage(
        tmp_path, seeds, {"name": "exec", "type": "verify_code", "wall_seconds": 10}, script)
    assert set(recs) == {"ok", "fixable"} and requests == 2     # one repair each for 2 seeds
    assert recs["ok"]["verified"] is True and recs["fixable"]["verified"] is True
    assert recs["ok"]["code"] == seeds[0]["code"]
    assert recs["fixable"]["code"] == "def add(a, b):\n    return a + b\n"
    p_ok = recs["ok"]["provenance"]["stages"][-1]
    p_fix = recs["fixable"]["provenance"]["stages"][-1]
    assert p_ok["repairs"] == 0 and p_ok["attempts"] == []
    assert p_fix["repairs"] == 1 and len(p_fix["attempts"]) == 1
    assert p_fix["attempts"][0]["reason"] == "nonzero_exit"
    assert "AssertionError" in p_fix["attempts"][0]["error"]
    assert stage.stats == {"verified": 1, "repaired": 1, "dropped_failing": 1}
    assert summary["seeds_ok"] == 3 and summary["records"] == 2


@pytest.mark.skipif(sandbox.isolation_mode() is None, reason="no sandbox isolation here")
def test_verify_code_without_repair(tmp_path):
    script = Script(lambda *a: pytest.fail("no repair expected"))
    seeds = [{"id": "bad", "code": "x = 1\n", "tests": "assert x == 2\n"}]
    recs, stage, _, requests = run_stage(
        tmp_path, seeds, {"name": "exec", "type": "verify_code", "repair_rounds": 0}, script)
    assert recs == {} and requests == 0 and stage.stats == {"dropped_failing": 1}


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("stage,key", [
    ({"name": "d", "type": "difficulty", "k": 1}, "stages[0].k"),
    ({"name": "d", "type": "difficulty", "kind": "essay"}, "stages[0].kind"),
    ({"name": "r", "type": "self_revise", "max_rounds": 0}, "stages[0].max_rounds"),
    ({"name": "r", "type": "self_revise", "critique_file": "/nonexistent"},
     "stages[0].critique_file"),
    ({"name": "v", "type": "verify_code", "repair_rounds": -1}, "stages[0].repair_rounds"),
    ({"name": "v", "type": "verify_code", "repairs": 1}, "stages[0].repairs"),
])
def test_bad_params(tmp_path, stage, key):
    (tmp_path / "seeds.jsonl").write_text('{"id": "a"}\n')
    raw = {"teacher": dict(TEACHER, base_url="http://127.0.0.1:1/v1"),
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": [stage]}
    with pytest.raises(PipelineError, match=re.escape(key)):
        load_pipeline(raw=raw)
