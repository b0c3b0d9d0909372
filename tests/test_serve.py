"""`phijax serve`: the batcher on a fake sampler, then the OpenAI-compatible server over a
trained tiny run, driven by the official `openai` client (and raw HTTP for what a client would
refuse to send)."""
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai  # the dev extra's client, to check wire compatibility
import pytest

from conftest import ROOT, run_cli
from phijax.serve import APIError, Batcher

slow = pytest.mark.slow


class FakeSampler:
    """Answers request r with r.n strings "prompt/k"; a prompt "boom" fails its whole call."""

    max_len = 64

    def __init__(self):
        self.calls = []

    def generate(self, requests):
        self.calls.append([r.prompt for r in requests])
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("boom")
        return [[f"{r.prompt}/{k}" for k in range(r.n)] for r in requests]


def job(prompt, n=1):
    return [SimpleNamespace(prompt=prompt, n=n)]


@pytest.fixture
def batcher():
    b = Batcher(FakeSampler(), max_batch=4, batch_wait=0.0)
    yield b
    b.close()


def test_jobs_queued_while_paused_share_one_generate_call(batcher):
    with batcher.paused():
        futures = [batcher.enqueue(job(p)) for p in "abc"]
        assert batcher.wait_queued(3, timeout=60)
        assert not any(f.done() for f in futures)
    assert [f.result(timeout=60) for f in futures] == [[["a/0"]], [["b/0"]], [["c/0"]]]
    assert batcher.sampler.calls == [["a", "b", "c"]]
    assert batcher.stats() == {"generate_calls": 1, "batched_jobs": 3, "samples": 3,
                               "largest_batch": 3}


def test_a_job_that_overflows_max_batch_opens_the_next_batch(batcher):
    with batcher.paused():
        futures = [batcher.enqueue(job(p, n)) for p, n in (("a", 2), ("b", 1), ("c", 2),
                                                            ("d", 2))]
        assert batcher.wait_queued(4, timeout=60)
    assert futures[2].result(timeout=60) == [["c/0", "c/1"]]
    assert [f.result(timeout=60) for f in futures][3] == [["d/0", "d/1"]]
    assert batcher.sampler.calls == [["a", "b"], ["c", "d"]]  # at most 4 samples a call
    assert batcher.stats()["samples"] == 7


def test_a_failing_job_fails_alone_and_the_worker_goes_on(batcher):
    with batcher.paused():
        futures = [batcher.enqueue(job(p)) for p in ("a", "boom", "c")]
        assert batcher.wait_queued(3, timeout=60)
    with pytest.raises(RuntimeError, match="boom"):
        futures[1].result(timeout=60)
    assert futures[0].result(timeout=60) == [["a/0"]]
    assert futures[2].result(timeout=60) == [["c/0"]]
    # the batch, then each job on its own
    assert batcher.sampler.calls == [["a", "boom", "c"], ["a"], ["boom"], ["c"]]
    assert batcher.stats() == {"generate_calls": 4, "batched_jobs": 2, "samples": 2,
                               "largest_batch": 1}
    assert batcher.submit(job("e")) == [["e/0"]]


def test_closing_refuses_new_jobs(batcher):
    assert batcher.submit(job("a")) == [["a/0"]]
    batcher.close()
    with pytest.raises(APIError, match="shutting down") as e:
        batcher.submit(job("b"))
    assert e.value.status == 503 and e.value.type == "server_error"
    with pytest.raises(ValueError, match="max_batch 0"):
        Batcher(FakeSampler(), max_batch=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("serve") / "tiny-serve"
    run_cli("train", ROOT / "configs" / "tiny.yaml", "train.steps=20", f"run.dir={run}",
            f"data.cache_dir={cache_dir}")
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    from phijax.serve import make_server

    srv = make_server(run_dir, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    # The client's idle keep-alive connections were ended: no handler thread outlives the
    # server (one that frees the sampler while the interpreter exits aborts the process).
    handlers = [t for t in threading.enumerate() if "process_request_thread" in t.name]
    assert not handlers, handlers


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)


def _post(server, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@slow
def test_models_lists_the_run(client, server, run_dir):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-serve"] == [server.model_name]
    assert models[0].object == "model"
    assert models[0].max_model_len == server.sampler.max_len   # vLLM's field: the context length
    assert client.models.retrieve("tiny-serve").id == "tiny-serve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@slow
def test_completion_with_n_logprobs_and_usage(client, server):
    prompt = "def main():\n    "
    out = client.completions.create(model="tiny-serve", prompt=prompt, n=2, max_tokens=8,
                                    seed=3, logprobs=1, temperature=1.0, presence_penalty=0,
                                    user="tests")
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.model == "tiny-serve" and out.created > 0
    assert [c.index for c in out.choices] == [0, 1]
    prompt_tokens = len(server.tokenizer.encode([prompt])[0])
    assert out.usage.prompt_tokens == prompt_tokens
    assert 2 <= out.usage.completion_tokens <= 16
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens
    for choice in out.choices:
        assert choice.finish_reason in ("stop", "length")
        lp = choice.logprobs
        assert 1 <= len(lp.tokens) <= 8
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
        assert all(x <= 0 for x in lp.token_logprobs)
        assert lp.text_offset[0] == len(prompt)
        assert lp.text_offset == sorted(lp.text_offset)
        if choice.finish_reason == "length":
            assert len(lp.tokens) == 8
        if not any(t.startswith("bytes:") for t in lp.tokens):
            assert "".join(lp.tokens) == choice.text


@slow
def test_same_seed_same_completion(client):
    kw = dict(model="tiny-serve", prompt="import os\n", n=2, max_tokens=8, logprobs=0)
    a = client.completions.create(seed=11, **kw)
    b = client.completions.create(seed=11, **kw)
    c = client.completions.create(seed=12, **kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert [x.logprobs.token_logprobs for x in a.choices] == \
        [x.logprobs.token_logprobs for x in b.choices]
    assert [x.text for x in a.choices] != [x.text for x in c.choices]
    assert a.choices[0].text != a.choices[1].text  # the n samples differ


@slow
def test_token_prompts_and_several_prompts(client, server):
    ids = server.tokenizer.encode(["The "])[0]
    by_ids = client.completions.create(model="tiny-serve", prompt=ids, max_tokens=4, seed=5)
    by_text = client.completions.create(model="tiny-serve", prompt="The ", max_tokens=4, seed=5)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model="tiny-serve", prompt=["a", "bb", "ccc"], n=2,
                                     max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == list(range(6))
    assert many.usage.prompt_tokens == sum(len(server.tokenizer.encode([p])[0])
                                           for p in ("a", "bb", "ccc"))
    # Greedy: both samples of a prompt agree.
    assert many.choices[0].text == many.choices[1].text


@slow
def test_stop_strings_cut_the_text(client):
    kw = dict(model="tiny-serve", prompt="class ", max_tokens=12, temperature=0)
    full = client.completions.create(**kw).choices[0]
    text = full.text
    assert len(text) >= 4, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(stop=[stop, "\u2603never"], **kw).choices[0]
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == "stop"
    # A one-character stop string is usually one token: the sampler stops on it early.
    one = client.completions.create(stop=text[-1], **kw).choices[0]
    assert one.text == text[:text.index(text[-1])] and one.finish_reason == "stop"


@slow
def test_chat_completion(client, server):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Write a Python function."}]
    out = client.chat.completions.create(model="tiny-serve", messages=messages, max_tokens=6,
                                         seed=1, logprobs=True, n=2)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert len(out.choices) == 2
    from phijax.data.tokenizer import render_chat
    text = render_chat(messages)[0] + "<|im_start|>assistant<|im_sep|>"
    assert out.usage.prompt_tokens == len(server.tokenizer.encode([text])[0])
    for choice in out.choices:
        assert choice.message.role == "assistant"
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        content = choice.logprobs.content
        assert 0 <= len(content) <= 6
        assert all(c.logprob <= 0 and c.top_logprobs == [] for c in content)
        joined = b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace")
        assert joined == choice.message.content
    # Text content parts and max_completion_tokens are accepted too.
    parts = client.chat.completions.create(
        model="tiny-serve", max_completion_tokens=3, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert parts.usage.completion_tokens <= 3 and parts.choices[0].logprobs is None


@slow
def test_concurrent_requests_are_batched(client, server):
    def ask(i):
        return client.completions.create(model="tiny-serve", prompt=f"x = {i}" + " y" * (i % 5),
                                         n=1 + i % 2, max_tokens=1 + i % 4, temperature=0,
                                         seed=i)

    before = server.stats
    # The worker is held until all 32 requests wait: 48 samples, one batch of at most 64.
    with ThreadPoolExecutor(32) as pool:
        with server.batcher.paused():
            futures = [pool.submit(ask, i) for i in range(32)]
            assert server.batcher.wait_queued(32, timeout=300), server.stats
        answers = [f.result() for f in futures]
    after = server.stats
    assert after["generate_calls"] - before["generate_calls"] == 1, after
    assert after["batched_jobs"] - before["batched_jobs"] == 32
    assert after["largest_batch"] == 32
    for i, out in enumerate(answers):
        prompt = f"x = {i}" + " y" * (i % 5)
        assert out.usage.prompt_tokens == len(server.tokenizer.encode([prompt])[0])
        assert len(out.choices) == 1 + i % 2
        assert out.choices[0].text == out.choices[-1].text  # greedy
        assert all(c.finish_reason in ("stop", "length") for c in out.choices)
        assert out.usage.completion_tokens <= (1 + i % 2) * (1 + i % 4)
    # Each answer is its own prompt's: the same request alone gives the same tokens.
    for i in (0, 7, 30):
        assert ask(i).choices[0].text == answers[i].choices[0].text


@slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server,
                                                                     monkeypatch):
    max_len = server.sampler.max_len
    ok = {"model": "tiny-serve", "prompt": "hello", "max_tokens": 2}
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({**ok, "model": "nope"}, 404, "model"),
        ({k: v for k, v in ok.items() if k != "model"}, 400, "model"),
        ({k: v for k, v in ok.items() if k != "prompt"}, 400, "prompt"),
        ({**ok, "prompt": [1] * max_len}, 400, "prompt"),
        ({**ok, "prompt": [1] * (max_len - 1), "max_tokens": 2}, 400, "prompt"),
        ({**ok, "prompt": [10 ** 6]}, 400, "prompt"),
        ({**ok, "temperature": 2.5}, 400, "temperature"),
        ({**ok, "temperature": -0.1}, 400, "temperature"),
        ({**ok, "temperature": "hot"}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "n": 0}, 400, "n"),
        ({**ok, "n": 129}, 400, "n"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "logprobs": 6}, 400, "logprobs"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "stream": True}, 400, "stream"),
        ({**ok, "echo": True}, 400, "echo"),
    ]
    for body, status, param in cases:
        code, err = _post(server, "/completions", body)
        assert code == status, (body, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, err
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
        assert err["error"]["param"] == param, (body, err)
    code, err = _post(server, "/chat/completions", {"model": "tiny-serve", "messages": []})
    assert code == 400 and err["error"]["param"] == "messages"
    code, err = _post(server, "/chat/completions", {
        "model": "tiny-serve", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert code == 400 and err["error"]["code"] == "context_length_exceeded"
    code, err = _post(server, "/nowhere", ok)
    assert code == 404 and "error" in err
    # The client raises OpenAI's exception types with the server's message.
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-serve", prompt="x", temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "x"}])
    # A failure inside generation is a 500; the server goes on.
    def boom(requests):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.sampler, "generate", boom)
    code, err = _post(server, "/completions", ok)
    monkeypatch.undo()
    assert code == 500 and "boom" in err["error"]["message"]
    assert err["error"]["type"] == "server_error"
    code, out = _post(server, "/completions", ok)
    assert code == 200 and out["choices"][0]["text"] is not None
    assert client.completions.create(**ok).usage.completion_tokens <= 2


@slow
def test_sample_cli_prints_n_samples(run_dir):
    out = run_cli("sample", run_dir, "--prompt", "def f(x):", "-n", 3, "--max-new-tokens", 8,
                  "--seed", 1).stdout
    assert out.count("--- sample ") == 3 and "finish length" in out
    again = run_cli("sample", run_dir, "--prompt", "def f(x):", "-n", 3, "--max-new-tokens", 8,
                    "--seed", 1).stdout
    assert again == out  # a seed fixes the samples
    ids = run_cli("sample", run_dir, "--prompt-ids", "5,6,7", "--max-new-tokens", 4,
                  "--temperature", 0).stdout
    assert "4 tokens" in ids
    bad = run_cli("sample", run_dir, "--prompt", "x", "-n", 0, check=False)
    assert bad.returncode == 2 and "n must be at least 1" in bad.stderr
