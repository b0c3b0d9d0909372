"""tools.teacher / tools.cache against a real loopback OpenAI-compatible server with faults."""
from __future__ import annotations

import asyncio
import email.utils
import functools
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, Path(__file__).resolve().parent):  # `tools` is a top-level package; the server
    if str(p) not in sys.path:                    # module lives next to this file
        sys.path.insert(0, str(p))

pytest.importorskip("openai")

from teacher_server import CLIENT_TIMEOUT_S, FAULTS, HANG_S, servers  # noqa: E402
from tools import teacher as teacher_module  # noqa: E402
from tools.cache import Cache  # noqa: E402
from tools.teacher import (Teacher, TeacherConfig, TeacherError, TeacherRefused,  # noqa: E402
                           parse_retry_after)

SECRET = "sk-test-7f3a9c1e-DO-NOT-LEAK-5b2d"
KEY_ENV = "PHIJAX_TEST_TEACHER_KEY"


def fast_cfg(url: str, **kw) -> TeacherConfig:
    base = dict(base_url=url, model="echo-1", api_key_env=KEY_ENV, concurrency=32, max_retries=20,
                timeout_s=CLIENT_TIMEOUT_S, backoff_base_s=0.005, backoff_max_s=0.05)
    base.update(kw)
    return TeacherConfig(**base)


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


async def _run(teacher: Teacher, coros_fn):
    try:
        return await coros_fn(teacher)
    finally:
        await teacher.aclose()


def _raises(exc_type, coro_fn):
    """A coroutine function for `_run` that expects `exc_type` and returns it."""
    async def go(t):
        with pytest.raises(exc_type) as ei:
            await coro_fn(t)
        return ei.value
    return go


@pytest.fixture
def server():
    with servers() as make:
        yield make


def test_faulty_server_all_calls_right(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(fault_rate=0.3, seed=1234, hang_s=HANG_S)
    teacher = Teacher(fast_cfg(srv.url))

    async def go(t):
        return await asyncio.gather(*(t.chat(user(f"q{i}"), n=1 + i % 3, temperature=0.0)
                                      for i in range(300)))

    results = asyncio.run(_run(teacher, go))
    for i, r in enumerate(results):
        assert r == [f"echo: q{i}"] * (1 + i % 3)
    st = srv.stats.snapshot()
    # every kind of fault was injected (answers cut off at max_tokens or by a content filter
    # among them: never returned) and each cost one retry
    assert set(st["faults"]) == set(FAULTS)
    assert st["fault_total"] > 50
    assert teacher.usage["retries"] == st["fault_total"]
    assert teacher.usage["requests"] == st["requests"] == 300 + st["fault_total"]
    assert teacher.usage["failures"] == 0
    assert teacher.usage["prompt_tokens"] > 0 and teacher.usage["completion_tokens"] > 0
    assert f"Bearer {SECRET}" in st["auth_headers"]


def test_retry_after_is_honoured(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(script=["429"], retry_after_s=0.2)
    teacher = Teacher(fast_cfg(srv.url, backoff_base_s=0.001, backoff_max_s=0.001))

    out = asyncio.run(_run(teacher, lambda t: t.chat(user("wait for me"))))
    assert out == ["echo: wait for me"]
    st = srv.stats.snapshot()
    assert st["requests"] == 2 and teacher.usage["retries"] == 1
    # the retry reached the server no sooner than Retry-After (0.2 s, the backoff is 1 ms)
    assert st["times"][1] - st["times"][0] >= 0.2


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(7.0, abs=1.0)
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_bad_request_not_retried(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(script=["400"])
    teacher = Teacher(fast_cfg(srv.url, backoff_base_s=1.0, backoff_max_s=5.0))
    err = asyncio.run(_run(teacher, _raises(TeacherError, lambda t: t.chat(user("bad")))))
    assert "400" in str(err) and "\n" not in str(err) and SECRET not in str(err)
    # raised at once: a retry would have reached the server (and, the script spent, succeeded)
    assert srv.stats.snapshot()["requests"] == 1
    assert teacher.usage["failures"] == 1 and teacher.usage["retries"] == 0


def test_retries_exhausted_one_line_error(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(fault_rate=1.0, faults=("500",))
    teacher = Teacher(fast_cfg(srv.url, max_retries=3))
    err = asyncio.run(_run(teacher, _raises(TeacherError, lambda t: t.chat(user("never")))))
    assert "4 attempts" in str(err) and "HTTP 500" in str(err) and "\n" not in str(err)
    assert srv.stats.snapshot()["requests"] == 4


def test_cut_off_answers_are_retried_never_cached(server, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(script=["length", "content_filter"])
    cache = Cache(tmp_path / "c.sqlite")
    teacher = Teacher(fast_cfg(srv.url), cache=cache)
    out = asyncio.run(_run(teacher, lambda t: t.chat(user("ANSWER"), max_tokens=8)))
    assert out == ["echo: ANSWER"]
    assert srv.stats.snapshot()["requests"] == 3 and teacher.usage["retries"] == 2
    (entry,) = [cache.get(k) for k in _keys(cache)]
    assert entry["choices"] == ["echo: ANSWER"] and entry["finish_reasons"] == ["stop"]
    cache.close()


def _keys(cache: Cache) -> list[str]:
    with cache._lock:
        return [k for (k,) in cache._db.execute("SELECT key FROM responses")]


def test_still_cut_off_after_retries_fails_and_caches_nothing(server, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(fault_rate=1.0, faults=("length",))
    cache = Cache(tmp_path / "c.sqlite")
    teacher = Teacher(fast_cfg(srv.url, max_retries=2), cache=cache)
    err = asyncio.run(_run(teacher, _raises(TeacherError, lambda t: t.chat(user("ANSWER"), n=2))))
    msg = str(err)
    assert "3 attempts" in msg and "finish_reason length" in msg and "\n" not in msg, msg
    assert err.kind == "finish_reason length"
    assert srv.stats.snapshot()["requests"] == 3 and len(cache) == 0
    assert teacher.usage["completion_tokens"] > 0       # cut-off answers are paid for too
    cache.close()


def test_accepting_cut_off_answers_is_opt_in_with_its_own_cache_key(server, monkeypatch,
                                                                    tmp_path):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(script=["length"])
    cache = Cache(tmp_path / "c.sqlite")

    async def go(t):
        cut = await t.chat(user("ANSWER"), allow_truncated=True)
        again = await t.chat(user("ANSWER"), allow_truncated=True)     # from the cache
        whole = await t.chat(user("ANSWER"))     # not the accepted cut-off answer: a request
        return cut, again, whole

    teacher = Teacher(fast_cfg(srv.url), cache=cache)
    cut, again, whole = asyncio.run(_run(teacher, go))
    assert cut == again == ["echo: ANSWE"] and whole == ["echo: ANSWER"]
    assert srv.stats.snapshot()["requests"] == 2 and teacher.usage["cache_hits"] == 1
    assert len(cache) == 2
    cache.close()


@pytest.mark.parametrize("how", ["model", "key", "403"])
def test_refusal_stops_at_once_naming_endpoint_and_model(server, monkeypatch, how):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(model="real-model" if how == "model" else None,
                 api_key="another-key" if how == "key" else None,
                 script=["403"] if how == "403" else None)
    teacher = Teacher(fast_cfg(srv.url, model="wrong-model", backoff_base_s=1.0))
    err = asyncio.run(_run(teacher, _raises(TeacherRefused, lambda t: t.chat(user("hi")))))
    msg = str(err)
    code = {"model": "HTTP 404 model_not_found", "key": "HTTP 401 invalid_api_key",
            "403": "HTTP 403 permission_denied"}[how]
    assert msg.startswith(f"teacher {srv.url} refused model 'wrong-model': {code}"), msg
    assert "\n" not in msg and SECRET not in msg
    assert srv.stats.snapshot()["requests"] == 1 and teacher.usage["retries"] == 0


def test_model_card(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(model="echo-1", max_model_len=4096)
    card = asyncio.run(_run(Teacher(fast_cfg(srv.url)), lambda t: t.model_card()))
    assert card["id"] == "echo-1" and card["max_model_len"] == 4096
    other = asyncio.run(_run(Teacher(fast_cfg(srv.url, model="x")), lambda t: t.model_card()))
    assert other is None                       # not listed: nothing known, not an error
    down = Teacher(fast_cfg("http://127.0.0.1:9/v1"))   # nothing listens: nothing known
    assert asyncio.run(_run(down, lambda t: t.model_card())) is None
    locked = server(api_key="another-key")
    err = asyncio.run(_run(Teacher(fast_cfg(locked.url)),
                           _raises(TeacherRefused, lambda t: t.model_card())))
    assert f"teacher {locked.url} refused model 'echo-1': HTTP 401" in str(err)


def test_cache_hits_make_no_requests(server, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server()
    path = tmp_path / "teacher.sqlite"
    msgs = user("cache me")

    async def twice(t):
        a = await t.chat(msgs, n=2, temperature=0.7, max_tokens=64, seed=3, template_version="v1")
        b = await t.chat(msgs, n=2, temperature=0.7, max_tokens=64, seed=3, template_version="v1")
        # anything in the request changes the key
        c = await t.chat(msgs, n=2, temperature=0.7, max_tokens=64, seed=3, template_version="v2")
        return a, b, c

    cache = Cache(path)
    t1 = Teacher(fast_cfg(srv.url), cache=cache)
    a, b, c = asyncio.run(_run(t1, twice))
    assert a == b == c == ["echo: cache me"] * 2
    assert srv.stats.snapshot()["requests"] == 2
    assert t1.usage["cache_hits"] == 1 and t1.usage["requests"] == 2
    cache.close()

    cache2 = Cache(path)  # a new Teacher on the same cache file: no HTTP at all
    t2 = Teacher(fast_cfg(srv.url), cache=cache2)
    a2, b2, c2 = asyncio.run(_run(t2, twice))
    assert a2 == b2 == c2 == a
    assert srv.stats.snapshot()["requests"] == 2
    assert t2.usage["requests"] == 0 and t2.usage["cache_hits"] == 3
    cache2.close()


def test_identical_inflight_requests_share_one_call(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    release = threading.Event()

    def held(messages, n, i):   # the server answers only once the test says so
        release.wait(10)
        return "echo: " + messages[-1]["content"]
    srv = server(responder=held)
    teacher = Teacher(fast_cfg(srv.url))

    async def go(t):
        calls = [asyncio.create_task(t.chat(user("same"))) for _ in range(10)]
        while srv.stats.snapshot()["requests"] == 0:   # the first call is at the server, held
            await asyncio.sleep(0.005)
        release.set()   # every call has started by now: each shares the one or sends its own
        return await asyncio.gather(*calls)

    out = asyncio.run(_run(teacher, go))
    assert out == [["echo: same"]] * 10
    assert srv.stats.snapshot()["requests"] == 1 and teacher.usage["cache_hits"] == 9


def test_api_key_never_stored(server, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server(fault_rate=0.3, seed=5, faults=("429", "500", "malformed"))
    path = tmp_path / "c.sqlite"
    cache = Cache(path)
    teacher = Teacher(fast_cfg(srv.url), cache=cache)

    async def go(t):
        return await asyncio.gather(*(t.chat(user(f"k{i}")) for i in range(40)))

    asyncio.run(_run(teacher, go))
    assert srv.stats.snapshot()["auth_headers"] == [f"Bearer {SECRET}"]  # it was sent
    cache.close()
    blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert len(blobs) > 0 and SECRET.encode() not in blobs
    for text in (repr(teacher.cfg), repr(teacher), repr(teacher.usage), repr(cache)):
        assert SECRET not in text


def test_missing_key_nonloopback_fails_before_network(monkeypatch):
    monkeypatch.delenv("PHIJAX_SURELY_UNSET_KEY", raising=False)
    cfg = TeacherConfig(base_url="https://teacher.example.invalid/v1", model="m",
                        api_key_env="PHIJAX_SURELY_UNSET_KEY")
    with pytest.raises(TeacherError) as ei:
        Teacher(cfg)
    msg = str(ei.value)
    assert "PHIJAX_SURELY_UNSET_KEY" in msg and "\n" not in msg


def test_missing_key_loopback_uses_local(server, monkeypatch):
    monkeypatch.delenv("PHIJAX_SURELY_UNSET_KEY", raising=False)
    srv = server()
    teacher = Teacher(fast_cfg(srv.url, api_key_env="PHIJAX_SURELY_UNSET_KEY"))
    out = asyncio.run(_run(teacher, lambda t: t.chat(user("hi"))))
    assert out == ["echo: hi"]
    assert srv.stats.snapshot()["auth_headers"] == ["Bearer local"]


class SimulatedClock:
    """Time that passes only when the code under test waits: pacing is checked exactly, on
    any machine load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1e-9)   # a float step too small to add up would never end
        await asyncio.sleep(0)


def test_token_bucket_paces_requests():
    clock = SimulatedClock()
    bucket = teacher_module._TokenBucket(1200, clock=clock, sleep=clock.sleep)   # 20/s
    granted = []

    async def go():
        for _ in range(30):
            await bucket.acquire(1)
            granted.append(clock.now)
    asyncio.run(go())
    # a one-second burst (20 requests) at once, then one every 1/20 s
    assert granted[:20] == [0.0] * 20
    assert granted[20:] == pytest.approx([k / 20 for k in range(1, 11)])


def _simulated_buckets(monkeypatch) -> SimulatedClock:
    clock = SimulatedClock()
    monkeypatch.setattr(teacher_module, "_TokenBucket", functools.partial(
        teacher_module._TokenBucket, clock=clock, sleep=clock.sleep))
    return clock


def test_rate_limits(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server()
    # 1200 RPM = 20/s with a one-second burst: 30 requests wait (30 - 20) / 20 = 0.5 s
    clock = _simulated_buckets(monkeypatch)
    teacher = Teacher(fast_cfg(srv.url, requests_per_minute=1200, timeout_s=30))
    asyncio.run(_run(teacher, lambda t: asyncio.gather(*(t.chat(user(f"r{i}"))
                                                         for i in range(30)))))
    assert teacher.usage["retries"] == 0 and srv.stats.snapshot()["requests"] == 30
    assert clock.now == pytest.approx(0.5)
    # 60000 TPM = 1000 tokens/s with a one-second burst; each call is charged 414/4 + 100
    # (max_tokens) = 203.5 tokens up front: 10 calls wait (2035 - 1000) / 1000 s, plus the
    # 2.5 tokens per call the server reports beyond the estimate once answers come back
    clock = _simulated_buckets(monkeypatch)
    teacher = Teacher(fast_cfg(srv.url, tokens_per_minute=60000, timeout_s=30))
    asyncio.run(_run(teacher, lambda t: asyncio.gather(
        *(t.chat(user(f"{i:04d}" + "y" * 396), max_tokens=100) for i in range(10)))))
    assert teacher.usage["retries"] == 0
    assert 1.035 - 1e-6 <= clock.now <= 1.035 + 10 * 2.5 / 1000 + 1e-6
    assert 1800 <= teacher.usage["prompt_tokens"] + teacher.usage["completion_tokens"] <= 2400


def test_usage_cost(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = server()
    teacher = Teacher(fast_cfg(srv.url, price_prompt_per_1k=1.0, price_completion_per_1k=2.0))
    asyncio.run(_run(teacher, lambda t: t.chat(user("price"))))
    u = teacher.usage
    assert u["cost"] == pytest.approx((u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1000)


def test_cache_key_canonical():
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 1, "temperature": 1.0}
    b = dict(reversed(list(a.items())))
    assert Cache.key(a) == Cache.key(b)
    assert Cache.key(a) != Cache.key({**a, "n": 2})
    assert len(Cache.key(a)) == 64


_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tools.cache import Cache
    wid = int(sys.argv[1])
    c = Cache({path!r})
    for i in range({n}):
        c.put(Cache.key({{"w": wid, "i": i}}), {{"w": wid, "i": i, "pad": "x" * 200}})
        c.put(Cache.key({{"shared": i}}), {{"shared": i}})   # the same keys from every writer
        if i % 50 == 0:
            assert c.get(Cache.key({{"w": wid, "i": i}}))["i"] == i
    c.close()
""")


def test_cache_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite"
    n = 400
    code = _WRITER.format(root=str(ROOT), path=str(path), n=n)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], stderr=subprocess.PIPE, text=True)
             for w in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with Cache(path) as c:
        assert len(c) == 4 * n + n
        for w in range(4):
            for i in range(n):
                assert c.get(Cache.key({"w": w, "i": i})) == {"w": w, "i": i, "pad": "x" * 200}
        assert all(c.get(Cache.key({"shared": i})) == {"shared": i} for i in range(n))
        assert c.get("0" * 64) is None
