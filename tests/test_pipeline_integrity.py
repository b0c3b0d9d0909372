"""tools.pipeline's integrity checks against the loopback teacher (tests/teacher_server.py):
cut-off answers are failures, never records or cache entries; a run whose seeds mostly fail
exits 1 with counts by cause; a refusing endpoint stops the run at once (exit 2); template,
field and context-length mistakes are one-line errors before the first request."""
import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_server import servers  # noqa: E402
from test_pipeline import FAST, pipeline_dict, secret, write_seeds  # noqa: E402,F401 (a fixture)

from tools.cache import Cache  # noqa: E402
from tools.cli import main as tools_main  # noqa: E402
from tools.pipeline import (PipelineError, PipelineFailed, load_pipeline,  # noqa: E402
                            read_records, run_pipeline)

TEACHER = dict(FAST, max_retries=2, timeout_s=5.0)


@pytest.fixture
def server():
    with servers() as make:
        yield make


def raw_pipeline(srv, tmp: Path, stages=None, **top) -> dict:
    raw = pipeline_dict(srv, tmp, shards=2, **top)
    raw["teacher"] = dict(TEACHER, base_url=srv.url)
    if stages is not None:
        raw["stages"] = stages
    return raw


def run(raw: dict, **kw) -> dict:
    return asyncio.run(run_pipeline(load_pipeline(raw=raw), progress=False, **kw))


def lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def chat_requests(srv) -> int:
    return srv.stats.snapshot()["requests"]


# ---------------------------------------------------------------- cut-off answers


def test_cut_off_answers_fail_the_seed_and_are_never_cached(server, secret, tmp_path):
    write_seeds(tmp_path / "seeds.jsonl", 4)
    cutting = server(fault_rate=1.0, faults=("length",))
    raw = raw_pipeline(cutting, tmp_path)
    with pytest.raises(PipelineFailed) as e:
        run(raw)
    out = tmp_path / "run"
    assert str(e.value) == (f"4 of 4 seeds failed (TeacherError: finish_reason length 4); "
                            f"{out / 'failures.jsonl'} has each")
    fails = lines(out / "failures.jsonl")
    assert sorted(f["seed_id"] for f in fails) == ["s0", "s1", "s2", "s3"]
    for f in fails:
        assert "finish_reason length" in f["reason"] and "3 attempts" in f["reason"], f
        assert f["kind"] == "TeacherError: finish_reason length"
    assert read_records(out) == [] and chat_requests(cutting) == 4 * 3
    with Cache(out / "cache.sqlite") as cache:
        assert len(cache) == 0
    # the endpoint fixed, a rerun of the failed seeds gets whole answers, not cached cut ones
    good = server()
    s = run(dict(raw, teacher=dict(TEACHER, base_url=good.url)), retry_failed=True)
    assert s["seeds_ok"] == 4 and s["seeds_failed"] == 0
    assert sorted(r["answer"] for r in read_records(out)) == \
        [f"echo: Q: what is {i}+{i}?" for i in range(4)]


def test_a_stage_may_accept_cut_off_answers(server, secret, tmp_path):
    write_seeds(tmp_path / "seeds.jsonl", 3)
    cutting = server(fault_rate=1.0, faults=("content_filter",))
    stage = {"name": "answer", "type": "prompt", "template": "Q: {question}",
             "output_field": "answer", "allow_truncated": True}
    raw = raw_pipeline(cutting, tmp_path, stages=[stage])
    s = run(raw)
    assert s["seeds_ok"] == 3 and chat_requests(cutting) == 3
    assert sorted(r["answer"] for r in read_records(tmp_path / "run")) == \
        [f"echo: Q: what is {i}+{i}" for i in range(3)]
    # accepting cut-off answers is another pipeline: it does not resume this run directory
    strict = dict(stage, allow_truncated=False)
    assert load_pipeline(raw=dict(raw, stages=[strict])).fingerprint() != \
        load_pipeline(raw=raw).fingerprint()
    # off, the option leaves the fingerprint as it was before the option existed
    plain = {k: v for k, v in stage.items() if k != "allow_truncated"}
    assert load_pipeline(raw=dict(raw, stages=[strict])).fingerprint() == \
        load_pipeline(raw=dict(raw, stages=[plain])).fingerprint()


# ---------------------------------------------------------------- failed seeds, refusals


def mixed_seeds(path: Path) -> None:
    """10 seeds: s1 and s2 lack the `question` field (the stage fails them), the others ask."""
    with open(path, "w") as f:
        for i in range(10):
            seed = {"id": f"s{i}"} if i in (1, 2) else {"id": f"s{i}", "question": f"q{i}"}
            f.write(json.dumps(seed) + "\n")


def test_mostly_failed_run_exits_1_with_counts_by_cause(server, secret, tmp_path, capsys):
    mixed_seeds(tmp_path / "seeds.jsonl")
    # one seed at a time, no retries: s0 answered, s3..s7 cut off, s8 and s9 answered
    srv = server(script=[None] + ["length"] * 5)
    raw = raw_pipeline(srv, tmp_path, concurrency=1)
    raw["teacher"]["max_retries"] = 0
    cfg = tmp_path / "pipe.json"
    cfg.write_text(json.dumps(raw))
    assert tools_main(["run", str(cfg), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    run_dir = tmp_path / "run"
    assert err.strip() == (
        f"phijax-tools: error: 7 of 10 seeds failed (TeacherError: finish_reason length 5, "
        f"StageError: template field 'question' is missing from record 2); "
        f"{run_dir / 'failures.jsonl'} has each")
    assert json.loads(out)["seeds_failed"] == 7     # the summary is still printed
    assert sorted(r["id"] for r in read_records(run_dir)) == \
        ["s0/answer/0", "s8/answer/0", "s9/answer/0"]          # the records written stay
    # a larger tolerance: the same failures pass
    srv2 = server(script=[None] + ["length"] * 5)
    raw2 = dict(raw, output=str(tmp_path / "run2"), max_failed_fraction=0.8,
                teacher=dict(raw["teacher"], base_url=srv2.url))
    cfg.write_text(json.dumps(raw2))
    assert tools_main(["run", str(cfg), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["seeds_failed"] == 7


def test_refused_model_stops_the_run_and_leaves_seeds_to_do(server, secret, tmp_path, capsys):
    write_seeds(tmp_path / "seeds.jsonl", 6)
    srv = server(model="right-model")
    raw = raw_pipeline(srv, tmp_path, concurrency=1)
    raw["teacher"]["model"] = "wrong-model"
    cfg = tmp_path / "pipe.json"
    cfg.write_text(json.dumps(raw))
    assert tools_main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"phijax-tools: error: teacher {srv.url} refused model 'wrong-model': "
                   f"HTTP 404 model_not_found: The model `wrong-model` does not exist."), err
    assert chat_requests(srv) == 1                      # no retry, no second seed
    assert lines(tmp_path / "run" / "failures.jsonl") == []
    assert lines(tmp_path / "run" / "state" / "done.jsonl") == []
    # with the right model, a rerun does every seed
    assert tools_main(["run", str(cfg), "teacher.model=right-model", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["this_run"]["ok"] == 6


def test_refused_key_stops_before_the_first_request(server, secret, tmp_path, capsys):
    write_seeds(tmp_path / "seeds.jsonl", 3)
    srv = server(api_key="not-the-key-we-send")
    cfg = tmp_path / "pipe.json"
    cfg.write_text(json.dumps(raw_pipeline(srv, tmp_path)))
    assert tools_main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"phijax-tools: error: teacher {srv.url} refused model 'echo-model': "
                          f"HTTP 401 invalid_api_key"), err
    assert chat_requests(srv) == 0 and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- checks before any request


def build(tmp_path, stages, seed=None):
    (tmp_path / "seeds.jsonl").write_text(json.dumps(seed or {"id": "a", "question": "q"})
                                          + "\n")
    raw = {"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": stages}
    return load_pipeline(raw=raw)


def build_error(tmp_path, stages, seed=None) -> str:
    with pytest.raises(PipelineError) as e:
        build(tmp_path, stages, seed)
    msg = str(e.value)
    assert "\n" not in msg and not (tmp_path / "run").exists()
    return msg


def test_template_typo_names_stage_and_field(tmp_path, capsys):
    msg = build_error(tmp_path, [{"type": "prompt", "template": "Q: {questoin}"}])
    assert msg == ("stages[0].template: {questoin} is not a field this template can use "
                   "(id, question); did you mean {question}?"), msg
    msg = build_error(tmp_path, [{"type": "prompt", "template": "{question}",
                                  "system": "You answer {topic} questions."}])
    assert msg.startswith("stages[0].system: {topic} is not a field this template"), msg
    tpl = tmp_path / "critique.txt"
    tpl.write_text("Critique {answer} to {question}, given {critique}")  # no critique yet
    msg = build_error(tmp_path, [{"type": "self_revise", "critique_file": str(tpl)}],
                      {"id": "a", "question": "q", "answer": "x"})
    assert msg == (f"stages[0].critique_file: {tpl}: {{critique}} is not a field this "
                   f"template can use (answer, id, question)"), msg
    # the revision sees the critique: the same file as the revise template is fine
    build(tmp_path, [{"type": "self_revise", "revise_file": str(tpl)}],
          {"id": "a", "question": "q", "answer": "x"})
    # --check finds it without a network call
    raw = {"teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": [{"type": "prompt", "template": "{questoin}"}]}
    (tmp_path / "pipe.json").write_text(json.dumps(raw))
    assert tools_main(["run", str(tmp_path / "pipe.json"), "--check"]) == 2
    assert "stages[0].template: {questoin}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["prompts/answer.txt", "{existing}"])
def test_a_path_is_not_a_template(tmp_path, value):
    existing = tmp_path / "answer.md"
    existing.write_text("Q: {question}")
    value = str(existing) if value == "{existing}" else value
    msg = build_error(tmp_path, [{"type": "prompt", "template": value}])
    assert msg == (f"stages[0].template: {value!r} looks like a file path, not a template; "
                   f"use template_file to read a template from a file"), msg
    assert build(tmp_path, [{"type": "prompt", "template_file": str(existing)}])


def test_record_fields_checked_along_the_stages(tmp_path):
    passage = {"id": "a", "text": "a passage"}
    # rewrite adds instruction/response: difficulty and decontamination may read them ...
    build(tmp_path, [{"type": "rewrite"}, {"type": "difficulty", "field": "instruction"},
                     {"type": "filter", "field": "response", "min_length": 1}], passage)
    # ... but not before it
    msg = build_error(tmp_path, [{"type": "difficulty", "field": "instruction"},
                                 {"type": "rewrite"}], passage)
    assert msg == ("stages[0].field: 'instruction' is not a field of the records this stage "
                   "gets (id, text)"), msg
    msg = build_error(tmp_path, [{"type": "filter", "field": "qestion", "min_length": 1}])
    assert msg.startswith("stages[0].field: 'qestion' is not a field") and \
        msg.endswith("; did you mean 'question'?"), msg
    build(tmp_path, [{"type": "filter", "field": "flag", "exists": False}])   # may be absent
    build(tmp_path, [{"type": "prompt", "template": "{question}", "output_field": "answer"},
                     {"type": "self_revise"}])       # answer: added by the prompt stage
    build(tmp_path, [{"type": "qa_extract", "field": "question"},
                     {"type": "prompt", "template": "{question} {answer}"}])


def test_max_tokens_must_fit_the_served_context(server, secret, tmp_path):
    write_seeds(tmp_path / "seeds.jsonl", 2)
    srv = server(model="echo-model", max_model_len=1000)
    stage = {"name": "answer", "type": "prompt", "template": "Q: {question}",
             "output_field": "answer", "max_tokens": 1000}
    raw = raw_pipeline(srv, tmp_path, stages=[{"type": "filter", "field": "id", "exists": True},
                                              stage])
    with pytest.raises(PipelineError) as e:
        run(raw)
    assert str(e.value) == (f"stages[1].max_tokens: 1000 (plus ~1 for the prompt) exceeds the "
                            f"context length 1000 of model 'echo-model' at {srv.url}"), \
        str(e.value)
    assert chat_requests(srv) == 0 and not (tmp_path / "run").exists()
    stage["max_tokens"] = 900
    assert run(raw)["seeds_ok"] == 2
    assert srv.stats.snapshot()["model_lists"] == 2


def test_no_context_length_known_is_no_check(server, secret, tmp_path):
    """A model the endpoint does not list (or lists without a context length) is not checked."""
    write_seeds(tmp_path / "seeds.jsonl", 2)
    for i, srv in enumerate((server(max_model_len=100), server(model="echo-model"))):
        raw = raw_pipeline(srv, tmp_path, output=str(tmp_path / f"run{i}"),
                           stages=[{"name": "answer", "type": "prompt",
                                    "template": "Q: {question}", "max_tokens": 10 ** 7}])
        assert run(raw)["seeds_ok"] == 2
