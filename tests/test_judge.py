"""tools.judge: judge-guided DPO pairs, judged in both orders by a real loopback teacher, sampled
from a real tiny phijax checkpoint."""
import asyncio
import json
import re
import shutil

import pytest
from flax import nnx

from phijax.config import Config, ModelConfig, load
from phijax.errors import ConfigError
from phijax.data.tokenizer import Tokenizer, train_tokenizer
from phijax.model import init_model
from phijax.weights import save_params
from teacher_server import start_server
from phijax.sampling import load_sampler
from tools.cli import main as tools_main
from tools.judge import (JudgeConfig, Prompt, Sampled, judge_pairs, load_prompts, load_template,
                         parse_verdict, sample_answers)
from tools.teacher import Teacher, TeacherConfig

TEACHER = ["teacher.base_url=http://127.0.0.1:9/v1", "teacher.model=judge-x"]

_FIELD = {k: re.compile(rf"{k}:\n<<<\n(.*?)\n>>>", re.S) for k in ("Request", "Answer A",
                                                                       "Answer B")}


def _parts(messages) -> tuple[str, str, str]:
    """(question, answer A, answer B) of a judge request rendered from tools/templates/judge.txt."""
    text = messages[-1]["content"]
    return tuple(_FIELD[k].search(text)[1] for k in ("Request", "Answer A", "Answer B"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [f"The quick brown fox jumps over the lazy dog. Answer: {i} plus {i + 1} is "
            f"{2 * i + 1}. Which MARK answer is better?" for i in range(300)]
    return Tokenizer(train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tok", 400))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A tiny real checkpoint (random weights) with the tokenizer: what `load_sampler` reads."""
    model = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        max_position_embeddings=128, tie_word_embeddings=False, dtype="float32",
                        remat="none")
    run = tmp_path_factory.mktemp("judge") / "run"
    save_params(run, Config(model=model), nnx.to_pure_dict(nnx.state(init_model(model, 0))))
    shutil.copy(tokenizer.path, run / "tokenizer.model")
    return run


def _judge(samples, tokenizer, responder):
    """judge_pairs against a loopback server answering with `responder`; (pairs, stats, seen)."""
    seen = []

    def recording(messages, n, i):
        seen.append(_parts(messages))
        return responder(*seen[-1])

    with start_server(responder=recording) as srv:
        async def go():
            cfg = TeacherConfig(base_url=srv.url, model="judge-x", max_retries=0, concurrency=4)
            async with Teacher(cfg) as teacher:
                return await judge_pairs(samples, tokenizer, teacher)
        pairs, stats = asyncio.run(go())
        assert srv.stats.snapshot()["requests"] == stats["teacher_calls"] == len(seen)
    return pairs, stats, seen


def _sampled(tokenizer, i: int, x: str, y: str) -> Sampled:
    """Prompt i with answers x (stopped: ends with <|im_end|>) and y (cut off at the length)."""
    prompt = Prompt(f"q{i}", tokenizer.encode_prompt([{"role": "user", "content": f"Q{i}"}]),
                    f"Q{i}")
    return Sampled(prompt, [tokenizer.encode([x])[0] + [tokenizer.im_end_id],
                            tokenizer.encode([y])[0]])


def _marked(q, a, b):  # a consistent judge: the answer with the marker wins wherever it stands
    return "Answer A has it.\nVerdict: A" if "MARK" in a else "B has it.\n**Verdict: b**"


def test_parse_verdict_reads_the_last_verdict_line():
    assert parse_verdict("A looks right.\nVerdict: A") == "A"
    assert parse_verdict("verdict: b") == "B"
    assert parse_verdict("**Verdict:** B.") == "B"
    assert parse_verdict("Verdict: A\nOn reflection...\nVerdict: B") == "B"
    assert parse_verdict("Verdict: A\nVerdict: tie") is None  # the last verdict line counts
    for text in ("A is better", "Verdict: A or B", "Verdict: C", "Verdict:", "", None):
        assert parse_verdict(text) is None


def test_template_uses_the_three_fields(tmp_path):
    assert "{answer_a}" in load_template() and "Verdict: A" in load_template()
    bad = tmp_path / "bad.txt"
    bad.write_text("Which of {answer_a} is better?")
    with pytest.raises(ValueError, match="must use"):
        load_template(bad)


def test_consistent_judge_sees_both_orders_and_chooses_the_sampled_ids(tokenizer):
    samples = [_sampled(tokenizer, i, *(("the MARK answer", "an answer") if i % 2 else
                                        ("an answer", "the MARK answer"))) for i in range(6)]
    pairs, stats, seen = _judge(samples, tokenizer, _marked)
    for s in samples:  # every prompt judged as (A=x, B=y) and as (A=y, B=x)
        x, y = (tokenizer.decode([t for t in a if t != tokenizer.im_end_id]) for a in s.answers)
        assert sorted((a, b) for q, a, b in seen if q == s.prompt.question) == sorted(
            [(x, y), (y, x)])
    assert [p["prompt_id"] for p in pairs] == [s.prompt.id for s in samples]
    for p, s in zip(pairs, samples):
        first_wins = "MARK" in tokenizer.decode(s.answers[0])
        chosen, rejected = s.answers if first_wins else s.answers[::-1]
        assert p["chosen_ids"] == chosen and p["rejected_ids"] == rejected  # the sampled ids
        assert p["verdicts"] == (["A", "B"] if first_wins else ["B", "A"])
        assert p["prompt_ids"] == s.prompt.prompt_ids and p["id"] == f"{s.prompt.id}/judge"
        assert p["kind"] == "judge" and p["judge_model"] == "judge-x"
    assert any(p["chosen_ids"][-1] == tokenizer.im_end_id for p in pairs)  # stop token kept
    assert stats["pairs"] == 6 and stats["teacher_calls"] == 12 and stats["chosen_first"] == 3
    assert stats["skipped"] == dict(identical=0, unparseable=0, inconsistent=0, teacher_error=0)


def test_position_biased_judge_gives_no_pairs(tokenizer):
    samples = [_sampled(tokenizer, i, "the MARK answer", f"answer {i}") for i in range(4)]
    pairs, stats, _ = _judge(samples, tokenizer, lambda q, a, b: "Verdict: A")
    assert pairs == [] and stats["skipped"]["inconsistent"] == 4
    assert stats["verdicts"] == {"A": 8, "B": 0, "unparseable": 0}


def test_unparseable_identical_and_failed_verdicts_are_skipped_and_counted(tokenizer):
    samples = [_sampled(tokenizer, 0, "the MARK answer", "plain"),
               _sampled(tokenizer, 1, "some answer", "other answer"),   # judge cannot decide
               _sampled(tokenizer, 2, "same", "same"),                  # identical
               _sampled(tokenizer, 3, "the MARK one", "lazy"),          # teacher call fails
               _sampled(tokenizer, 4, "plain", "the MARK answer")]

    def judge(q, a, b):
        if q == "Q1":
            return "Both are fine." if "some" in a else "Verdict: A"
        if q == "Q3":
            raise RuntimeError("teacher down")
        return _marked(q, a, b)

    pairs, stats, seen = _judge(samples, tokenizer, judge)
    assert [p["prompt_id"] for p in pairs] == ["q0", "q4"]
    assert stats["skipped"] == dict(identical=1, unparseable=1, inconsistent=0, teacher_error=1)
    assert stats["prompts"] == 5 and stats["teacher_calls"] == 8  # identical answers: no call
    assert "Q2" not in {q for q, _, _ in seen}
    assert "HTTP 500" in stats["last_error"]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_cli_end_to_end_with_a_tiny_checkpoint(run_dir, tokenizer, tmp_path, capsys):
    chats = {"p1": [{"role": "user", "content": "Which answer is better?"}],
             "p3": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "The quick brown fox?"}]}
    ids = tokenizer.encode_prompt([{"role": "user", "content": "1 plus 2"}])
    prompts = _write(tmp_path / "p.jsonl", [
        {"id": "p1", "prompt": "Which answer is better?", "kind": "math", "answer": "3"},
        {"id": 2, "prompt_ids": ids}, {"id": "p3", "messages": chats["p3"]}])
    out = tmp_path / "out" / "pairs.jsonl"
    seen = []

    def larger(messages, n, i):  # consistent and total: the larger text wins in either order
        q, a, b = _parts(messages)
        seen.append((q, a, b))
        return "Verdict: A" if a > b else "Verdict: B"

    with start_server(responder=larger) as srv:
        rc = tools_main(["judge", str(run_dir), str(prompts), "--out", str(out),
                         f"teacher.base_url={srv.url}", "teacher.model=judge-x",
                         "teacher.api_key_env=PHIJAX_TEST_UNSET_KEY", "teacher.concurrency=4",
                         "max_new_tokens=12", "seed=3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    stats = json.loads(captured.out.strip().splitlines()[-1])
    assert "judged 3 prompts" in captured.err
    assert stats["prompts"] == 3 and stats["teacher_calls"] == len(seen) == 6
    assert stats["pairs"] + stats["skipped"]["identical"] == 3 and stats["pairs"] >= 2
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == stats["pairs"] and not list(out.parent.glob("*.tmp"))
    expected = {"p1": tokenizer.encode_prompt(chats["p1"]), 2: ids,
                "p3": tokenizer.encode_prompt(chats["p3"])}
    assert "System: Be brief.\n\nUser: The quick brown fox?" in {q for q, _, _ in seen}
    stops = (tokenizer.im_end_id, tokenizer.eos_id)
    for p in pairs:
        assert set(p) == {"id", "prompt_ids", "chosen_ids", "rejected_ids", "kind", "prompt_id",
                          "verdicts", "judge_model"}
        assert p["id"] == f"{p['prompt_id']}/judge" and p["prompt_ids"] == expected[p["prompt_id"]]
        for key in ("chosen_ids", "rejected_ids"):
            toks = p[key]
            assert 1 <= len(toks) <= 12 and all(type(t) is int for t in toks)
            assert all(0 <= t < tokenizer.vocab_size for t in toks)
            assert all(t not in stops for t in toks[:-1])  # a stop token only ends a sample
        text = lambda key: tokenizer.decode([t for t in p[key] if t not in stops])
        assert text("chosen_ids") > text("rejected_ids") and p["judge_model"] == "judge-x"
        assert p["verdicts"] in (["A", "B"], ["B", "A"])
    # the pairs hold exactly the sampled ids: sampling again with the same seed gives them
    sampler, _ = load_sampler(run_dir)
    again = sample_answers(sampler, tokenizer, load_prompts(
        prompts, tokenizer, vocab_size=tokenizer.vocab_size, max_len=128, max_new_tokens=12),
        load(JudgeConfig, overrides=TEACHER + ["max_new_tokens=12", "seed=3"]))
    answers = {s.prompt.id: s.answers for s in again}
    for p in pairs:
        first = p["verdicts"] == ["A", "B"]
        assert [p["chosen_ids"], p["rejected_ids"]] == answers[p["prompt_id"]][::1 if first else -1]


@pytest.mark.parametrize("bad, why", [
    ('{"id": "b", "prompt": "x", "prompt_ids": [1]}', "exactly one of"),
    ('{"prompt": "no id"}', "no id"),
    ('{"id": "b", "messages": [{"role": "user", "content": "x"}, '
     '{"role": "assistant", "content": "y"}]}', "end with a user turn"),
    ('{"id": "b", "prompt_ids": [1, 99999]}', "outside"),
    ('{"id": "a", "prompt": "again"}', "duplicate id"),
    ('[1, 2]', "JSON object"),
])
def test_a_bad_prompt_record_fails_before_sampling_or_network(run_dir, tmp_path, capsys,
                                                              monkeypatch, bad, why):
    import phijax.sampling

    def no_sampling(*a, **k):
        raise AssertionError("sampled despite a bad record")
    monkeypatch.setattr(phijax.sampling, "load_sampler", no_sampling)
    prompts = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "fine"}, bad])
    out = tmp_path / "pairs.jsonl"
    with start_server() as srv:
        rc = tools_main(["judge", str(run_dir), str(prompts), "--out", str(out),
                         f"teacher.base_url={srv.url}", "teacher.model=judge-x",
                         "max_new_tokens=12"])
        assert srv.stats.snapshot()["requests"] == 0
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"{prompts}:2:" in err and why in err
    assert not out.exists()


@pytest.mark.parametrize("overrides, why", [
    (["temperature=0"], "temperature must be > 0, got 0.0 (greedy answers are identical, so no "
                        "pair could form)"),
    (["top_p=0"], "top_p must be in (0, 1], got 0.0"),
    (["top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
    (["chunk_size=0"], "chunk_size must be positive, got 0"),
    (["judge_max_tokens=0"], "judge_max_tokens must be positive, got 0"),
    (["max_new_tokens=-1"], "max_new_tokens must be positive, got -1"),
    (["temprature=0.5"], "unknown key temprature (did you mean temperature?)"),
])
def test_config_ranges_are_declared_and_checked_on_load(overrides, why):
    with pytest.raises(ConfigError) as e:
        load(JudgeConfig, overrides=TEACHER + overrides)
    assert str(e.value) == why
    with pytest.raises(ConfigError, match="teacher: required"):
        load(JudgeConfig, overrides=["temperature=1.0"])
    cfg = load(JudgeConfig, overrides=TEACHER + ["cache=c.sqlite", "teacher.concurrency=4"])
    assert cfg.teacher == TeacherConfig(base_url="http://127.0.0.1:9/v1", model="judge-x",
                                        concurrency=4)
    assert (cfg.cache, cfg.template, cfg.max_new_tokens, cfg.judge_max_tokens) == \
        ("c.sqlite", None, 256, None)


def test_bad_config_or_template_fails_before_loading_anything(run_dir, tmp_path, capsys,
                                                             monkeypatch):
    import phijax.weights

    def no_loading(*a, **k):
        raise AssertionError("loaded the run despite a bad config")
    monkeypatch.setattr(phijax.weights, "load_config", no_loading)
    prompts = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "fine"}])
    bad = tmp_path / "bad.txt"
    bad.write_text("Which of {answer_a} is better?")
    out = tmp_path / "pairs.jsonl"
    for extra, why in ((["temperature=0"], "no pair could form"),
                       ([f"template={bad}"], "must use {question}"),
                       ([f"template={tmp_path / 'none.txt'}"], "does not exist")):
        rc = tools_main(["judge", str(run_dir), str(prompts), "--out", str(out)] + TEACHER + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("phijax-tools: error: ") and why in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
