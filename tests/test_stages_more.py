"""tools.stages (rewrite, qa_extract, reverse_instruction, decontaminate) through tools.pipeline,
against the real loopback teacher server with a scripted responder (tests/teacher_server.py)."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_stages import TEACHER, Script, run_stage  # noqa: E402

from phijax.hashing import sha256_hex  # noqa: E402
from tools import sandbox  # noqa: E402
from tools.decontam import Index  # noqa: E402
from tools.export import to_chat, write_chat_jsonl  # noqa: E402
from tools.pipeline import PipelineError, load_pipeline  # noqa: E402
from tools.stages import (TEMPLATES, code_similarity, normalise_code,  # noqa: E402
                          parse_problem_solution, parse_qa_pairs)

PASSAGES = {"p1": "Binary search halves the interval each step.",
            "p2": "A hash table maps keys to buckets.",
            "bad": "This one gets a reply without sections."}


# ---------------------------------------------------------------- rewrite

def test_parse_problem_solution():
    assert parse_problem_solution("Sure!\n### Problem\nWhat is 2+2?\n\n### Solution\n4") == \
        ("What is 2+2?", "4")
    assert parse_problem_solution("## problem:\nQ\n## SOLUTION\nA\nmore") == ("Q", "A\nmore")
    assert parse_problem_solution("### Solution\nA\n### Problem\nQ") is None
    assert parse_problem_solution("### Problem\n\n### Solution\nA") is None
    assert parse_problem_solution("### Problem\nQ only") is None
    assert parse_problem_solution("no sections") is None


def rewrite_reply(prompt, n, i):
    (passage,) = [p for p in PASSAGES.values() if p in prompt]
    if "without sections" in passage:
        return "I would rather not."
    kind = ("exercise" if prompt.startswith("Turn the passage below into a self-contained")
            else "discussion" if "discussion question" in prompt else "reasoning")
    return f"### Problem\n{kind} about: {passage}\n### Solution\nStep 1. Think.\n\\boxed{{42}}"


def test_rewrite_single_kind(tmp_path):
    script = Script(rewrite_reply)
    seeds = [{"id": k, "text": v} for k, v in PASSAGES.items()]
    recs, stage, summary, requests = run_stage(
        tmp_path, seeds, {"name": "rw", "type": "rewrite", "kind": "reasoning"}, script)
    assert requests == 3 and set(recs) == {"p1", "p2"}
    r = recs["p1"]
    assert r["id"] == "p1/rw/0" and r["rewrite_kind"] == "reasoning"
    assert r["instruction"] == f"reasoning about: {PASSAGES['p1']}"
    assert r["response"] == "Step 1. Think.\n\\boxed{42}"
    assert r["text"] == PASSAGES["p1"]                       # the seed's fields stay
    prompt = next(p for p, _, _ in script.calls if PASSAGES["p1"] in p)
    assert prompt == (TEMPLATES / "rewrite_reasoning.txt").read_text().replace(
        "{text}", PASSAGES["p1"]).replace("{{ANSWER}}", "{ANSWER}")
    st = r["provenance"]["stages"][-1]
    assert st["kind"] == "reasoning" and st["model"] == "scripted"
    assert st["templates"] == {"reasoning": sha256_hex(
        (TEMPLATES / "rewrite_reasoning.txt").read_text())}
    assert stage.stats == {"kept_reasoning": 2, "dropped_unparsed": 1}


def test_rewrite_several_kinds(tmp_path):
    script = Script(rewrite_reply)
    seeds = [{"id": "p1", "text": PASSAGES["p1"]}]
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
    from test_stages import start_server
    from tools.pipeline import read_records, run_pipeline
    import asyncio
    srv = start_server(responder=script)
    try:
        pipe = load_pipeline(raw={"teacher": dict(TEACHER, base_url=srv.url),
                                  "input": str(tmp_path / "seeds.jsonl"),
                                  "output": str(tmp_path / "run"),
                                  "stages": [{"name": "rw", "type": "rewrite",
                                              "kind": ["exercise", "discussion", "reasoning"]}]})
        summary = asyncio.run(run_pipeline(pipe, progress=False))
    finally:
        srv.stop()
    recs = {r["id"]: r for r in read_records(tmp_path / "run")}
    assert summary["records"] == 3 and len(script.calls) == 3
    assert {i: r["rewrite_kind"] for i, r in recs.items()} == {
        "p1/rw/0": "exercise", "p1/rw/1": "discussion", "p1/rw/2": "reasoning"}
    assert all(r["instruction"].startswith(r["rewrite_kind"]) for r in recs.values())
    assert set(pipe.stages[0].templates) == {"exercise", "discussion", "reasoning"}


# ---------------------------------------------------------------- Q&A extraction

def test_parse_qa_pairs():
    assert parse_qa_pairs("Here:\nQ: one?\nA: 1\n\nQ: two?\nA: 2\nand more") == \
        [("one?", "1"), ("two?", "2\nand more")]
    assert parse_qa_pairs("Q: one?\nA: 1\nQ: two?\nA: 2") == [("one?", "1"), ("two?", "2")]
    assert parse_qa_pairs("**Q:** a long\nquestion\n**A:** yes") == [("a long\nquestion", "yes")]
    assert parse_qa_pairs("Q: one?\nQ: two?\nA: 2") is None          # question without answer
    assert parse_qa_pairs("A: 1") is None                              # answer without question
    assert parse_qa_pairs("Q: one?\nA: 1\nQ: two?") is None            # trailing question
    assert parse_qa_pairs("Q: one?\nA:") is None                       # empty answer
    assert parse_qa_pairs("no pairs here") is None


def test_qa_extract(tmp_path):
    def reply(prompt, n, i):
        assert prompt.startswith("Read the passage below and write question-answer pairs")
        if PASSAGES["bad"] in prompt:
            return "Q: what?\nQ: really?"                                 # malformed
        if PASSAGES["p1"] in prompt:
            return "Q: What halves each step?\nA: The interval.\nQ: Name the method.\nA: Binary search."
        return "Q: What does a hash table map?\nA: Keys to buckets."
    script = Script(reply)
    seeds = [{"id": k, "text": v} for k, v in PASSAGES.items()]
    stage = {"name": "qa", "type": "qa_extract"}
    from tools.pipeline import read_records
    _, st, summary, requests = run_stage(tmp_path, seeds, stage, script)
    recs = {r["id"]: r for r in read_records(tmp_path / "run")}
    assert requests == 3 and summary["records"] == 3
    assert sorted(recs) == ["p1/qa/0", "p1/qa/1", "p2/qa/0"]              # stable by index
    assert (recs["p1/qa/1"]["question"], recs["p1/qa/1"]["answer"]) == \
        ("Name the method.", "Binary search.")
    assert recs["p2/qa/0"]["answer"] == "Keys to buckets."
    assert recs["p1/qa/0"]["provenance"]["stages"][-1]["pairs"] == 2
    assert st.stats == {"pairs": 3, "dropped_malformed": 1}


# ---------------------------------------------------------------- instruction reversal

ORIGINAL = "def add(a, b):\n    # sum of two numbers\n    return a + b\n"


def test_code_similarity():
    assert normalise_code(ORIGINAL) == "def add(a, b):\n    return a + b"
    assert code_similarity(ORIGINAL, "def add(a,b):\n\n    return a+b  # plus\n") == 1.0
    assert code_similarity(ORIGINAL, "import os\nos.system('ls')\n") < 0.5
    assert 0 <= code_similarity("def f(:", "def f(:\n  # x\n") <= 1.0   # unparsable: line based


def reverse_reply(regen):
    def reply(prompt, n, i):
        if prompt.startswith("Write the instruction that a user would give"):
            name = re.search(r"def (\w+)", prompt)[1]
            return f"  Write a function {name}(a, b) that returns the sum of a and b.  "
        assert prompt.startswith("Write a function "), prompt   # the instruction, then the ask
        name = re.search(r"function (\w+)", prompt)[1]
        return regen[name]
    return reply


def test_reverse_instruction_similarity_only(tmp_path):
    regen = {"add": "```python\ndef add(a, b):\n    return a + b\n```",
             "plus": "```python\nimport math\nprint(math.pi)\n```",
             "sum2": "I cannot write code."}
    seeds = [{"id": k, "code": ORIGINAL.replace("add", k)} for k in regen]
    script = Script(reverse_reply(regen))
    recs, stage, summary, requests = run_stage(
        tmp_path, seeds, {"name": "rev", "type": "reverse_instruction", "threshold": 0.8},
        script)
    assert requests == 6 and set(recs) == {"add"}
    r = recs["add"]
    assert r["instruction"] == "Write a function add(a, b) that returns the sum of a and b."
    assert r["response"] == r["code"] == ORIGINAL and r["fidelity"] == 1.0
    st = r["provenance"]["stages"][-1]
    assert st["similarity"] == 1.0 and st["tests_passed"] is None
    assert st["regenerated"] == "def add(a, b):\n    return a + b\n"
    assert set(st["templates"]) == {"instruction", "regenerate"}
    assert stage.stats == {"kept": 1, "dropped_low_fidelity": 2}


@pytest.mark.skipif(sandbox.isolation_mode() is None, reason="no sandbox isolation here")
def test_reverse_instruction_with_tests(tmp_path):
    # same shape, different behaviour: similarity is high but the original's tests fail
    regen = {"add": "```python\ndef add(x, y):\n    '''Add.'''\n    total = x + y\n    return total\n```",
             "plus": "```python\ndef plus(a, b):\n    return a - b\n```"}
    seeds = [{"id": k, "code": ORIGINAL.replace("add", k),
              "tests": f"assert {k}(2, 3) == 5\nassert {k}(-1, 1) == 0\n"} for k in regen]
    script = Script(reverse_reply(regen))
    recs, stage, _, _ = run_stage(
        tmp_path, seeds, {"name": "rev", "type": "reverse_instruction", "threshold": 0.7,
                          "wall_seconds": 10}, script)
    assert set(recs) == {"add"}
    st = recs["add"]["provenance"]["stages"][-1]
    assert st["tests_passed"] is True and st["similarity"] < 1.0
    assert recs["add"]["fidelity"] == pytest.approx(0.5 + 0.5 * st["similarity"], abs=1e-6)
    assert stage.stats == {"kept": 1, "dropped_low_fidelity": 1}
    assert recs.get("plus") is None    # similar code (> 0.4) but failing tests: below 0.7


# ---------------------------------------------------------------- decontamination

EVAL_Q = ("Natalia sold clips to forty eight of her friends in April and then she sold half "
          "as many clips in May how many clips did she sell altogether")


def make_index(tmp_path) -> Path:
    evals = tmp_path / "gsm8k.jsonl"
    evals.write_text(json.dumps({"question": EVAL_Q}) + "\n" + json.dumps(
        {"question": "A robe takes two bolts of blue fiber and half that much white fiber "
                     "how many bolts in total does it take"}) + "\n")
    other = tmp_path / "math.jsonl"
    other.write_text(json.dumps({"question": "Find the number of ordered pairs of positive "
                                             "integers whose product is exactly one thousand "
                                             "and whose sum is odd"}) + "\n")
    path = tmp_path / "suite.npz"
    Index.build([evals, other], text_field="question").save(path)
    return path


def test_decontaminate(tmp_path):
    index = make_index(tmp_path)
    seeds = [{"id": "clean", "instruction": "Compute 2 + 2.", "response": "4"},
             {"id": "copy", "instruction": "Q: " + EVAL_Q + "?", "response": "72"},
             {"id": "math", "instruction": "Solve it.", "response":
              "find the number of ordered pairs of positive integers whose product is exactly "
              "one thousand and whose sum is odd"}]
    script = Script(lambda *a: pytest.fail("no teacher call expected"))
    recs, stage, summary, requests = run_stage(
        tmp_path, seeds, {"name": "dc", "type": "decontaminate", "index": str(index),
                          "field": ["instruction", "response"]}, script)
    assert requests == 0 and set(recs) == {"clean"}
    assert recs["clean"]["id"] == "clean" and recs["clean"]["provenance"]["stages"] == []
    assert stage.stats == {"kept": 1, "dropped_contaminated": 2}
    assert stage.hits_by_benchmark == {"gsm8k": 1, "math": 1}
    assert len(stage.fingerprint["index_sha256"]) == 64


# ---------------------------------------------------------------- export

def test_write_chat_jsonl(tmp_path):
    recs = [{"id": "a", "instruction": "Q?", "response": "A."}, {"id": "b", "instruction": ""}]
    assert to_chat(recs[1]) is None
    assert write_chat_jsonl(recs, tmp_path / "c.jsonl", system="Be brief.") == (1, 1)
    (line,) = (tmp_path / "c.jsonl").read_text().splitlines()
    assert json.loads(line)["messages"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Q?"},
                                            {"role": "assistant", "content": "A."}]


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("stage,key", [
    ({"name": "r", "type": "rewrite", "kind": "poem"}, "stages[0].kind"),
    ({"name": "r", "type": "rewrite", "kind": ["exercise", "exercise"]}, "stages[0].kind"),
    ({"name": "r", "type": "rewrite", "kind": []}, "stages[0].kind"),
    ({"name": "r", "type": "rewrite", "exercise_file": "/nonexistent", "kind": "exercise"},
     "stages[0].exercise_file"),
    ({"name": "q", "type": "qa_extract", "max_pairs": 0}, "stages[0].max_pairs"),
    ({"name": "v", "type": "reverse_instruction", "threshold": 1.5}, "stages[0].threshold"),
    ({"name": "v", "type": "reverse_instruction", "test_weight": -1}, "stages[0].test_weight"),
    ({"name": "d", "type": "decontaminate"}, "stages[0].index"),
    ({"name": "d", "type": "decontaminate", "index": "/nonexistent.npz"}, "stages[0].index"),
    ({"name": "d", "type": "decontaminate", "index": "SEEDS", "field": []}, "stages[0].field"),
    ({"name": "d", "type": "decontaminate", "index": "SEEDS"}, "stages[0].index"),  # not an npz
])
def test_bad_params(tmp_path, stage, key):
    (tmp_path / "seeds.jsonl").write_text('{"id": "a"}\n')
    stage = {k: (str(tmp_path / "seeds.jsonl") if v == "SEEDS" else v) for k, v in stage.items()}
    raw = {"teacher": dict(TEACHER, base_url="http://127.0.0.1:1/v1"),
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": [stage]}
    with pytest.raises(PipelineError, match=re.escape(key)):
        load_pipeline(raw=raw)
