"""`phijax serve` over a trained tiny run, driven by the official `openai` client (streaming
included) and raw HTTP for what a client would refuse to send. The engine's batching on its
own: tests/test_engine.py."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai  # the dev extra's client, to check wire compatibility
import pytest

from conftest import ROOT, run_cli

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


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
    assert not thread.is_alive() and not srv.engine._worker.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)


def _post(server, path: str, body, root: bool = False) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    base = server.url[:-len("/v1")] if root else server.url
    req = urllib.request.Request(base + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(server, path: str) -> dict:
    with urllib.request.urlopen(server.url[:-len("/v1")] + path, timeout=60) as resp:
        return json.loads(resp.read())


@slow
def test_models_lists_the_run(client, server, run_dir):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-serve"] == [server.model_name]
    assert models[0].object == "model"
    assert models[0].max_model_len == server.sampler.max_len   # vLLM's field: the context length
    assert client.models.retrieve("tiny-serve").id == "tiny-serve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert _get(server, "/health") == {"status": "ok"}


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
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == \
            len(lp.top_logprobs)
        assert all(x <= 0 for x in lp.token_logprobs)
        assert lp.text_offset[0] == len(prompt)
        assert lp.text_offset == sorted(lp.text_offset)
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert 1 <= len(top) <= 2 and top[token] == logprob  # the top one, and the chosen
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
    kw = dict(model="tiny-serve", prompt="class ", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0]
    text = full.text
    assert len(text) >= 4, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    never = [f"\u2603never{i}" for i in range(31)]
    cut = client.completions.create(stop=[stop] + never, **kw).choices[0]  # 32 stop strings
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == "stop"
    # A one-character stop string is usually one token: the sampler stops on it early.
    one = client.completions.create(stop=text[-1], **kw).choices[0]
    assert one.text == text[:text.index(text[-1])] and one.finish_reason == "stop"
    # Streamed, the text is held back where a stop string may begin: the same text.
    chunks = client.completions.create(stop=[stop] + never, stream=True, **kw)
    assert "".join(c.choices[0].text for c in chunks) == cut.text


@slow
def test_chat_completion(client, server):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Write a Python function."}]
    out = client.chat.completions.create(model="tiny-serve", messages=messages, max_tokens=6,
                                         seed=1, logprobs=True, n=2)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert len(out.choices) == 2
    assert out.usage.prompt_tokens == len(server.tokenizer.encode_prompt(messages))
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
def test_top_logprobs_on_both_endpoints(client):
    chat = client.chat.completions.create(
        model="tiny-serve", messages=[{"role": "user", "content": "Count: 1, 2,"}],
        max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True})
    for c in chat.choices[0].logprobs.content:
        assert len(c.top_logprobs) == 3
        tops = [t.logprob for t in c.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob
    text = client.completions.create(model="tiny-serve", prompt="x = [", max_tokens=5,
                                     temperature=0, logprobs=5, extra_body={"ignore_eos": True})
    lp = text.choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 5 <= len(top) <= 6 and max(top.values()) == top[token] == logprob  # greedy


@slow
def test_echo_gives_the_prompt_logprobs_as_lm_eval_asks(server):
    """lm-eval's loglikelihood request: token prompts, echo, logprobs 1, max_tokens 1 (or 0),
    temperature 0; it reads token_logprobs[ctxlen:-1] and checks greediness on top_logprobs."""
    prompts = [server.tokenizer.encode([t])[0] for t in ("def f(x):\n    return", "import")]
    expected = server.sampler.prompt_logprobs(prompts, top=1)
    for max_tokens in (0, 1):
        code, out = _post(server, "/completions", {
            "model": "tiny-serve", "prompt": prompts, "echo": True, "logprobs": 1,
            "max_tokens": max_tokens, "temperature": 0, "seed": 1234})
        assert code == 200, out
        for prompt, want, choice in zip(prompts, expected, out["choices"]):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(prompt) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            np.testing.assert_allclose(lp["token_logprobs"][1:len(prompt)], want.logprobs,
                                       atol=1e-5)
            assert choice["text"].startswith(server.tokenizer.decode(prompt))
            assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
            greedy = [max(top.values()) == x for x, top in
                      zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:])]
            assert greedy[len(prompt) - 1:] == [True] * max_tokens  # the greedy new token
        assert out["usage"]["completion_tokens"] == max_tokens * len(prompts)
    # echo without logprobs, and max_tokens 0 without echo
    code, out = _post(server, "/completions", {"model": "tiny-serve", "prompt": "abc",
                                               "echo": True, "max_tokens": 2, "seed": 1})
    assert code == 200 and out["choices"][0]["text"].startswith("abc")
    code, out = _post(server, "/completions", {"model": "tiny-serve", "prompt": "abc",
                                               "max_tokens": 0})
    assert code == 200 and out["choices"][0] | {"index": 0} == {
        "index": 0, "text": "", "logprobs": None, "finish_reason": "length"}


@slow
def test_streaming_matches_the_whole_answer(client):
    kw = dict(model="tiny-serve", prompt="for i in ", n=2, max_tokens=10, seed=7, logprobs=2)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for k, choice in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == k]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine if c.logprobs for t in c.logprobs.token_logprobs] == \
            choice.logprobs.token_logprobs
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + \
            [choice.finish_reason]
    chat_kw = dict(model="tiny-serve", messages=[{"role": "user", "content": "Hello"}],
                   max_tokens=8, seed=2)
    whole = client.chat.completions.create(**chat_kw)
    chunks = list(client.chat.completions.create(stream=True, **chat_kw))
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@slow
def test_concurrent_requests_are_batched(client, server):
    def ask(i):
        return client.completions.create(model="tiny-serve", prompt=f"x = {i}" + " y" * (i % 5),
                                         n=1 + i % 2, max_tokens=1 + i % 4, temperature=0,
                                         seed=i)

    before = server.stats
    # The engine is held until all 32 requests wait: 48 rows, one admission of at most 64.
    with ThreadPoolExecutor(32) as pool:
        with server.engine.paused():
            futures = [pool.submit(ask, i) for i in range(32)]
            assert server.engine.wait_queued(32, timeout=300), server.stats
        answers = [f.result() for f in futures]
    after = server.stats
    assert after["admissions"] - before["admissions"] == 1, after
    assert after["admitted_jobs"] - before["admitted_jobs"] == 32
    assert after["largest_admission"] == 32
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
def test_a_short_request_streams_before_a_long_one_ends(client):
    done = {}

    def run(name, max_tokens):
        stream = client.completions.create(model="tiny-serve", prompt="a", max_tokens=max_tokens,
                                           stream=True, seed=1, extra_body={"ignore_eos": True})
        for chunk in stream:
            done.setdefault(name + " first", time.monotonic())
        done[name] = time.monotonic()

    long = threading.Thread(target=run, args=("long", 600))
    long.start()
    while "long first" not in done:
        time.sleep(0.01)
    run("short", 4)
    long.join()
    assert done["short"] < done["long"], done


@slow
def test_a_client_that_disconnects_frees_its_rows(server):
    body = json.dumps({"model": "tiny-serve", "prompt": "z", "n": 4, "max_tokens": 900,
                       "stream": True, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"data: " not in got:  # the headers, then the first tokens
            got += sock.recv(65536)
        assert server.engine.rows.live == 4
    deadline = time.monotonic() + 60
    while server.engine.rows.live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.rows.live == 0


@slow
def test_tokenizer_endpoints_as_vllm_serves_them(server):
    tok = server.tokenizer
    for prefix, root in (("", True), ("/v1", False)):
        info = _get(server, prefix + "/tokenizer_info")
        # The tokenizer's own specials and chat template, as its Hugging Face export names them.
        assert info["eos_token"] == tok.hf_specials()["eos_token"] == "<|im_end|>"
        assert info["chat_template"] == tok.chat_template and "<|im_start|>" in tok.chat_template
        assert info["model_max_length"] == server.sampler.max_len
        code, out = _post(server, "/tokenize", {"prompt": "def f(): pass",
                                                "add_special_tokens": False,
                                                "return_token_strs": True}, root=root)
        ids = tok.encode(["def f(): pass"])[0]
        assert code == 200 and out == {"count": len(ids), "max_model_len": server.sampler.max_len,
                                       "tokens": ids, "token_strs": out["token_strs"]}
        assert "".join(out["token_strs"]) == "def f(): pass"
        messages = [{"role": "user", "content": "Hi"}]
        code, out = _post(server, "/tokenize", {"messages": messages}, root=root)
        assert code == 200 and out["tokens"] == tok.encode_prompt(messages)
        code, out = _post(server, "/detokenize", {"tokens": ids}, root=root)
        assert code == 200 and out == {"prompt": "def f(): pass"}
    for path, body, param in (("/tokenize", {"prompt": 3}, "prompt"), ("/tokenize", {}, "prompt"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": "1"}, "tokens"),
                              ("/tokenize", {"prompt": "x", "model": "nope"}, "model")):
        code, err = _post(server, path, body, root=True)
        assert 400 <= code < 500 and err["error"]["param"] == param, (path, body, err)


MALFORMED = [
    (b"{not json", None), (b"[1, 2]", None), (b"", None), (b"[" * 100000 + b"]" * 100000, None),
    (b'{"model": "tiny-serve", "prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"model": "tiny-serve", "prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    ({"prompt": [[1, "a"]]}, "prompt"), ({"prompt": [1, [2]]}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}},
                                    "stream_options"),
    ({"stream": True, "stream_options": []}, "stream_options"), ({"echo": 1}, "echo"),
    ({"logprobs": True}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"stop": [1]}, "stop"),
    ({"stop": [""]}, "stop"), ({"n": 1.5}, "n"), ({"seed": "x"}, "seed"), ({"seed": 2 ** 70}, "seed"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": -1}, "max_tokens"), ({"suffix": "x"}, "suffix"),
    ({"logit_bias": {"1": 5}}, "logit_bias"), ({"top_k": "x"}, "top_k"),
]


@slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server,
                                                                     monkeypatch):
    max_len = server.sampler.max_len
    ok = {"model": "tiny-serve", "prompt": "hello", "max_tokens": 2}
    cases = [
        ({**ok, "model": "nope"}, 404, "model"),
        ({k: v for k, v in ok.items() if k != "model"}, 400, "model"),
        ({k: v for k, v in ok.items() if k != "prompt"}, 400, "prompt"),
        ({**ok, "prompt": [1] * max_len}, 400, "prompt"),
        ({**ok, "prompt": [1] * (max_len - 1), "max_tokens": 2}, 400, "prompt"),
        ({**ok, "prompt": [1] * (max_len + 1), "max_tokens": 0, "echo": True}, 400, "prompt"),
        ({**ok, "prompt": [10 ** 6]}, 400, "prompt"),
        ({**ok, "temperature": 2.5}, 400, "temperature"),
        ({**ok, "temperature": -0.1}, 400, "temperature"),
        ({**ok, "temperature": "hot"}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "n": 0}, 400, "n"),
        ({**ok, "n": 129}, 400, "n"),
        ({**ok, "logprobs": 6}, 400, "logprobs"),
        ({**ok, "stop": [f"s{i}" for i in range(65)]}, 400, "stop"),
    ] + [(b if isinstance(b, bytes) else {**ok, **b}, 400, p) for b, p in MALFORMED]
    for body, status, param in cases:
        code, err = _post(server, "/completions", body)
        assert code == status, (body[:80], err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, err
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
        assert err["error"]["param"] == param, (body[:80], err)
    code, err = _post(server, "/chat/completions", {"model": "tiny-serve", "messages": []})
    assert code == 400 and err["error"]["param"] == "messages"
    for chat in ({"max_tokens": 0}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21},
                 {"messages": [{"role": "user", "content": {"x": 1}}]}):
        code, err = _post(server, "/chat/completions", {
            "model": "tiny-serve", "messages": [{"role": "user", "content": "x"}], **chat})
        assert code == 400, (chat, err)
    code, err = _post(server, "/chat/completions", {
        "model": "tiny-serve", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert code == 400 and err["error"]["code"] == "context_length_exceeded"
    assert str(max_len) in err["error"]["message"]
    code, err = _post(server, "/nowhere", ok)
    assert code == 404 and "error" in err
    # The client raises OpenAI's exception types with the server's message.
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-serve", prompt="x", temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "x"}])
    assert server.stats["errors"] == 0  # none of these was a 500
    # A request that makes the engine fail gets a 500 (or an error event when streaming);
    # requests beside it are answered, and the server goes on.
    admit = server.engine.rows.admit

    def boom(seqs):
        if any(s.prompt[:1] == [7] for s in seqs):
            raise RuntimeError("boom")
        return admit(seqs)

    monkeypatch.setattr(server.engine.rows, "admit", boom)
    with ThreadPoolExecutor(2) as pool:
        with server.engine.paused():
            bad = pool.submit(_post, server, "/completions", {**ok, "prompt": [7, 8]})
            good = pool.submit(_post, server, "/completions", ok)
            assert server.engine.wait_queued(2, timeout=60)
        (code, err), (good_code, out) = bad.result(), good.result()
    assert code == 500 and "boom" in err["error"]["message"]
    assert err["error"]["type"] == "server_error"
    assert good_code == 200 and out["choices"][0]["text"] is not None
    with pytest.raises(openai.APIError, match="boom"):
        list(client.completions.create(model="tiny-serve", prompt=[7], stream=True))
    monkeypatch.undo()
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
