"""Pivotal Token Search (tools/pts/): Algorithm 1 against exact success probabilities with
planted jumps, the log-prob split, memoized and batched estimates, the p-range filter, the
re-check, pair choice, and the CLI end to end over a tiny real checkpoint."""
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import pytest

from conftest import run_script
from phijax.errors import ConfigError
from tools import pts
from tools.cli import main as tools_main
from tools.pts import PTSConfig, Rollouts, split_point

ANSWER = tuple(range(10, 34))  # a 24-token answer


def steps(*jumps, base=0.3):
    """p(prefix) of a prefix of ANSWER-like tokens: `base`, plus each (token, dp) jump once the
    token is in the prefix."""
    def p(prefix):
        return round(base + sum(dp for t, dp in jumps if t in prefix), 6)
    return p


@dataclass
class Planted:
    p: Callable  # exact p(success | prefix)
    answers: list = field(default_factory=lambda: [ANSWER])
    logprobs: list = None  # per answer; default -1 per token
    p_top_up: Callable = None  # what the re-check's extra rollouts show (default: p)
    first: Callable = None  # first(prefix, success, i) -> first token of rollout i of that group


class Exact:
    """An estimator with exact fractions: round(n * p) of n rollouts succeed (n a multiple of 100
    keeps them exact). The empty prefix's first rollouts are the planted answers. Records every
    call."""

    def __init__(self, questions: list[Planted]):
        self.questions, self.calls, self.seen = questions, [], set()

    def __call__(self, jobs):
        self.calls.append(list(jobs))
        out = []
        for j in jobs:
            spec = self.questions[j.question]
            top_up = (j.question, j.prefix) in self.seen
            self.seen.add((j.question, j.prefix))
            p = (spec.p_top_up or spec.p)(j.prefix) if top_up else spec.p(j.prefix)
            k = round(j.n * p)
            success = [i < k for i in range(j.n)]
            first = spec.first or (lambda prefix, ok, i: 100 if ok else 101)
            group = Counter()
            tokens = []
            for ok in success:
                tokens.append([first(j.prefix, ok, group[ok])])
                group[ok] += 1
            logprobs = [[-1.0] for _ in tokens]
            if j.prefix == () and not top_up:
                for a, answer in enumerate(spec.answers):
                    tokens[a] = list(answer)
                    logprobs[a] = list(spec.logprobs[a] if spec.logprobs else [-1.0] * len(answer))
            out.append(Rollouts(success, tokens, logprobs))
        return out


CFG = PTSConfig(rollouts=100, recheck=400, batch_rows=10_000)


def run(questions, cfg=CFG):
    est = Exact(questions)
    pairs, stats = pts.pts([(f"q{i}", [1, 2, 3]) for i in range(len(questions))], est, cfg,
                           log=lambda line: None)
    return pairs, stats, est


def test_finds_exactly_the_planted_pivotal_tokens():
    # p: 0.3, up to 0.9 at the 7th token (16), down to 0.6 at the 15th (24), flat elsewhere
    kept, _, stats = pts.find_pivots(1, Exact([Planted(steps((16, 0.6), (24, -0.3)))]), CFG,
                                     log=lambda line: None)
    assert [(len(k.prefix), k.token, k.p_before, k.p_after) for k in kept] == \
        [(6, 16, 0.3, 0.9), (14, 24, 0.9, 0.6)]
    assert all(k.prefix == ANSWER[:len(k.prefix)] for k in kept)
    assert stats.candidates == stats.kept == 2 and stats.searched == 1


def test_jumps_that_cancel_over_the_answer_are_not_searched():
    # Algorithm 1 as written: |p([]) - p(T)| = 0.1 < p_gap stops at the top
    kept, _, stats = pts.find_pivots(1, Exact([Planted(steps((16, 0.6), (24, -0.5)))]), CFG,
                                     log=lambda line: None)
    assert kept == [] and stats.candidates == 0


def test_split_rule():
    assert split_point([-5.0] + [-0.1] * 7) == 1  # the token-count midpoint would be 4
    assert split_point([-1.0] * 4) == 2  # exactly half consumed
    assert split_point([-0.1, -0.1, -0.1, -5.0]) == 3  # never half before the end: n - 1
    assert split_point([-3.0, -1.0, -1.0]) == 1
    assert split_point([0.0, 0.0]) == 1


def test_search_splits_at_the_log_prob_midpoint():
    logprobs = [-10.0] + [-0.5] * 23  # half the mass is consumed after 3 tokens, not 12
    est = Exact([Planted(steps((16, 0.6), (24, -0.3)), logprobs=[logprobs])])
    pts.find_pivots(1, est, CFG, log=lambda line: None)
    requested = [[j.prefix for j in call] for call in est.calls]
    assert requested[0] == [()]
    assert requested[1] == [ANSWER]  # p(T_full): the gap 0.3 >= 0.2, so split
    assert requested[2] == [ANSWER[:3]]  # left half [:3], right half [3:]


def test_no_prefix_estimated_twice_and_levels_batched_across_questions():
    other = ANSWER[:10] + tuple(range(50, 64))  # a second answer sharing a prefix
    questions = [Planted(steps((16, 0.6), (24, -0.3)), answers=[ANSWER, other]),
                 Planted(steps((12, 0.5), base=0.4), answers=[ANSWER, other]),
                 Planted(steps((30, 0.4), (31, -0.7), base=0.5), answers=[ANSWER, other])]
    cfg = PTSConfig(rollouts=100, recheck=400, batch_rows=10_000, answers_per_question=2)
    pairs, stats, est = run(questions, cfg)
    seen = Counter()
    for call in est.calls:
        for j in call:
            seen[j.question, j.prefix] += 1
            # the first draw is an estimate of N, the second (if any) the top-up to `recheck`
            assert j.n == (100 if seen[j.question, j.prefix] == 1 else 300)
    assert max(seen.values()) <= 2
    assert stats.prefixes == sum(seen.values()) == sum(len(c) for c in est.calls)
    # seeds: the top-up draws other rollouts than the estimate
    seeds = {}
    for call in est.calls:
        for j in call:
            assert seeds.setdefault((j.question, j.prefix, j.n), j.seed) == j.seed
    assert all(seeds[q, pre, 100] != seeds[q, pre, 300] for q, pre, n in seeds if n == 300)
    # one call per round: all questions' prefixes of a recursion level go together
    assert len({j.question for j in est.calls[1]}) == 3
    alone = [len(run([q], cfg)[2].calls) for q in questions]
    assert len(est.calls) == max(alone) < sum(alone)
    # the shared pivot at token 16 (both answers of question 0) gives one pair, from answer 0
    assert [p["id"] for p in pairs if p["question_id"] == "q0"] == ["q0/pts/0/6", "q0/pts/0/14"]
    assert stats.candidates == stats.kept == 5


def test_calls_hold_at_most_batch_rows_rollouts():
    questions = [Planted(steps((16, 0.6), (24, -0.3))) for _ in range(5)]
    _, stats, est = run(questions, PTSConfig(rollouts=100, recheck=400, batch_rows=300))
    assert all(sum(j.n for j in call) <= 300 for call in est.calls)
    assert len(est.calls[0]) == 3 and len(est.calls[1]) == 2  # 5 root prefixes: 3 + 2
    assert stats.calls == len(est.calls) > stats.rounds


def test_questions_outside_the_p_range_are_not_searched():
    bases = [0.1, 0.2, 0.5, 0.8, 0.9, 0.0]
    questions = [Planted(steps((16, 0.05), base=b)) for b in bases]
    _, stats, est = run(questions)
    searched = {j.question for call in est.calls[1:] for j in call}
    assert searched == {1, 2, 3}  # p_min and p_max are inclusive
    assert (stats.questions, stats.searched, stats.skipped_p_range) == (6, 3, 3)
    _, stats, est = run(questions, PTSConfig(rollouts=100, recheck=400, p_min=0.0, p_max=1.0))
    assert stats.searched == 6


def test_recheck_drops_a_candidate_whose_pooled_gap_falls_below_p_gap():
    def noisy_top_up(prefix):
        return 0.3 if prefix[-1:] == (16,) else steps((16, 0.6))(prefix)
    questions = [Planted(steps((16, 0.6)), p_top_up=noisy_top_up),  # a fluke: 0.9 was noise
                 Planted(steps((16, 0.6)))]
    pairs, stats, est = run(questions)
    assert (stats.candidates, stats.kept) == (2, 1)
    assert [p["question_id"] for p in pairs] == ["q1"]
    top_ups = [j for j in est.calls[-1]]
    assert {(j.question, j.prefix, j.n) for j in top_ups} == \
        {(q, pre, 300) for q in (0, 1) for pre in (ANSWER[:6], ANSWER[:7])}
    # pooled for question 0: (100 * 0.9 + 300 * 0.3) / 400 = 0.45 against 0.3


def test_pair_choice_and_no_eos():
    def first(prefix, ok, i):
        if len(prefix) == 6 and not ok:  # failures at the rising pivot: 16 most, then 5 = 7
            return [16, 16, 16, 7, 5][i % 5]
        if len(prefix) == 14 and ok:  # successes at the falling pivot: 24 most, then 8 = 9
            return [24, 24, 9, 8][i % 4]
        return 100 if ok else 101
    pairs, stats, _ = run([Planted(steps((16, 0.6), (24, -0.3)), first=first)])
    rise, fall = pairs
    assert rise["chosen_ids"] == [16] and rise["rejected_ids"] == [5]  # tie -> smallest id
    assert fall["chosen_ids"] == [8] and fall["rejected_ids"] == [24]
    assert rise == {"id": "q0/pts/0/6", "prompt_ids": [1, 2, 3, *ANSWER[:6]],
                    "chosen_ids": [16], "rejected_ids": [5], "question_id": "q0", "prefix_len": 6,
                    "p_before": 0.3, "p_after": 0.9, "p_gap": 0.2,
                    "samples_used": stats.rollouts, "kind": "pts"}
    assert fall["prompt_ids"] == [1, 2, 3, *ANSWER[:14]] and len(fall["rejected_ids"]) == 1


def test_no_alternative_token_means_no_pair():
    first = lambda prefix, ok, i: 16 if not ok else 100  # every failure starts with the pivot
    pairs, stats, _ = run([Planted(steps((16, 0.6)), first=first)])
    assert pairs == [] and stats.kept == 1 and stats.no_alternative == 1


def test_bad_config_names_the_setting():
    with pytest.raises(ConfigError, match=r"^recheck 10: must be at least rollouts \(64\)$"):
        PTSConfig(recheck=10).validate()
    with pytest.raises(ConfigError, match=r"^p_max 0.1: must be at least p_min \(0.2\)$"):
        PTSConfig(p_max=0.1).validate()
    with pytest.raises(ConfigError, match="^pts.batch_rows 100: must hold one request"):
        PTSConfig(batch_rows=100).validate("pts.")
    with pytest.raises(ConfigError, match=r"^p_gap must be in \(0, 1\], got 0$"):
        PTSConfig(p_gap=0).validate()


def _cli(*args):
    return run_script("phijax-tools", "pts", *args)


def test_bad_question_line_is_one_line_error_and_no_output(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "a", "kind": "math", "prompt": "1+1?", "answer": "2"}\n\n'
                         '{"id": "b", "kind": "math", "prompt": "x?"}\n')
    out = tmp_path / "pairs.jsonl"
    got = _cli(tmp_path / "no-such-run", questions, "--out", out)
    assert got.returncode == 2 and not out.exists() and not got.stdout
    assert got.stderr == (f"phijax-tools: error: {questions}:3: a math question needs a string "
                          f"answer\n")
    got = _cli(tmp_path, questions, "--out", out, "p_gap=0")
    assert got.stderr == "phijax-tools: error: p_gap must be in (0, 1], got 0.0\n"
    assert got.returncode == 2 and not out.exists()


# ------------------------------------------------------------------ a real tiny checkpoint

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Random weights biased (through one residual dimension) to a unigram over "1", "2", "x"
    and <|im_end|>: answers like "x1xx2<|im_end|>", whose last number is 1 about a third of
    the time."""
    import numpy as np
    from flax import nnx

    from phijax.config import Config, ModelConfig
    from phijax.data.corpus import documents
    from phijax.data.tokenizer import Tokenizer, train_tokenizer
    from phijax.model import init_model
    from phijax.weights import save_params

    tmp = tmp_path_factory.mktemp("pts")
    tok_path = train_tokenizer(documents(["builtin:python-docs"]), tmp / "tok", 512,
                               sample_bytes=200_000)
    tok = Tokenizer(tok_path)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0)))
    embed, head = np.array(params["embed"]), np.array(params["lm_head"])
    embed[:, 0] = 8.0  # dimension 0 dominates the final norm: h_0 ~ 8 at every position
    head[0, :] = 0.0
    for piece, logit in [("1", 10), ("2", 10), ("x", 11), ("<|im_end|>", 9.5)]:
        head[0, tok.sp.piece_to_id(piece)] = logit / 8
    params["embed"], params["lm_head"] = embed, head
    run = save_params(tmp / "run", Config(model=cfg), params)
    shutil.copy(tok_path, run / "tokenizer.model")
    return run


def test_cli_end_to_end_on_a_tiny_checkpoint(run_dir, tmp_path, capsys):
    from phijax.data.tokenizer import Tokenizer

    tok = Tokenizer(run_dir / "tokenizer.model")
    questions = [{"id": "one", "kind": "math", "prompt": "Say a number.", "answer": "1"},
                 {"id": "two", "kind": "math", "prompt_ids": tok.encode_prompt(
                     [{"role": "user", "content": "Another number?"}]), "answer": "2"},
                 {"id": "rare", "kind": "math", "prompt": "Say 2121.", "answer": "2121"}]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "pairs.jsonl"
    rc = tools_main(["pts", str(run_dir), str(path), "--out", str(out), "rollouts=32",
                     "recheck=64", "max_new_tokens=24", "batch_rows=256", "p_min=0.1",
                     "p_max=0.9", "seed=2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert "pts root round 1: 3 prefixes" in captured.err
    assert summary["questions"] == 3 and summary["skipped_p_range"] >= 1  # "2121" is rare
    assert summary["searched"] == 3 - summary["skipped_p_range"]
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == summary["pairs"] == summary["kept"] - summary["no_alternative"]
    assert pairs  # with this seed: "stop now" pivots, e.g. "2xxxx" + <|im_end|> answers 2
    assert summary["rollouts"] > 0 and summary["rollouts_per_s"] > 0
    prompts = {q["id"]: q.get("prompt_ids") or tok.encode_prompt(
        [{"role": "user", "content": q["prompt"]}]) for q in questions}
    for p in pairs:
        prompt = prompts[p["question_id"]]
        assert p["kind"] == "pts" and p["question_id"] in ("one", "two")
        assert p["prompt_ids"][:len(prompt)] == prompt
        assert p["prefix_len"] == len(p["prompt_ids"]) - len(prompt) < 24
        assert p["id"] == f"{p['question_id']}/pts/0/{p['prefix_len']}"
        ids = p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]
        assert all(isinstance(t, int) and 0 <= t < tok.vocab_size for t in ids)
        assert len(p["chosen_ids"]) == len(p["rejected_ids"]) == 1
        assert p["chosen_ids"] != p["rejected_ids"]
        assert abs(p["p_after"] - p["p_before"]) >= p["p_gap"] == 0.2
        assert 0 <= p["p_before"] <= 1 and 0 <= p["p_after"] <= 1
        assert p["samples_used"] >= 32
