"""`phijax serve`: the OpenAI-compatible server over a trained tiny run, driven by the official
`openai` client (and raw HTTP for what a client would refuse to send)."""
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai  # the dev extra's client, to check wire compatibility
import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("serve") / "tiny-serve"
    run_cli("train", ROOT / "configs" / "tiny.yaml", "train.steps=20", f"run.dir={run}",
            f"data.cache_dir={cache_dir}")
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    from phijax.serve import make_server

    srv = make_server(run_dir, port=0, batch_wait=0.01)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


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


def test_models_lists_the_run(client, server, run_dir):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-serve"] == [server.model_name]
    assert models[0].object == "model"
    assert client.models.retrieve("tiny-serve").id == "tiny-serve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


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


def test_concurrent_requests_are_batched(client, server):
    def ask(i):
        return client.completions.create(model="tiny-serve", prompt=f"x = {i}" + " y" * (i % 5),
                                         n=1 + i % 2, max_tokens=1 + i % 4, temperature=0,
                                         seed=i)

    client.completions.create(model="tiny-serve", prompt="warm", max_tokens=4)  # compiled
    before = dict(server.stats)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    calls = server.stats["generate_calls"] - before["generate_calls"]
    assert server.stats["batched_jobs"] - before["batched_jobs"] == 32
    assert calls < 32 and server.stats["largest_batch"] > 1, server.stats
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
