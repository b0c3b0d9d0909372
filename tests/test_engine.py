"""The serving engine on a small random model: continuous batching gives each request the
tokens `Sampler.generate` gives it, requests join a running batch at the next segment, a
cancelled request frees its rows, and a request that makes the engine fail fails alone."""
import queue
import threading
import time

import numpy as np
import pytest
from flax import nnx

from phijax.model import init_model
from phijax.sampling import Request, Sampler
from phijax.serve import APIError, Engine, Job
from test_sampling import CFG, _prompts

POISON = 13  # a prompt starting with this token makes the (patched) engine fail


@pytest.fixture(scope="module")
def sampler():
    return Sampler(CFG, nnx.to_pure_dict(nnx.state(init_model(CFG, 3))))


@pytest.fixture
def engine(sampler):
    e = Engine(sampler, max_batch=8, segment=8, batch_wait=0.0)
    yield e
    e.close()


def _requests():
    p = _prompts()
    return [Request(p[0], n=3, max_new_tokens=40, seed=1, top_logprobs=2),
            Request(p[1], max_new_tokens=20, temperature=0.0),
            Request(p[2], n=2, max_new_tokens=50, seed=4, top_p=0.9)]


def _tokens(results):
    return [[s.tokens for s in r] for r in results]


class Events:
    """A job's events, each with the time it arrived."""

    def __init__(self):
        self.q = queue.Queue()

    def __call__(self, event):
        self.q.put((time.monotonic(), event))

    def until_done(self, timeout=300):
        out = []
        while True:
            at, (kind, payload) = self.q.get(timeout=timeout)
            out.append((at, kind, payload))
            if kind in ("done", "error"):
                return out


def test_engine_gives_the_samplers_tokens_whenever_requests_arrive(sampler, engine):
    requests = _requests()
    reference = sampler.generate(requests)
    together = engine.generate(requests)
    assert _tokens(together) == _tokens(reference)
    assert [s.top_logprobs for s in together[0]] is not None
    got = [None] * 3

    def ask(k):  # one request at a time, each joining the batch the others decode
        time.sleep(0.1 * k)
        got[k] = engine.generate([requests[k]])[0]

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _tokens(got) == _tokens(reference)
    for mine, theirs in zip(got, reference):
        np.testing.assert_allclose([s.logprobs for s in mine], [s.logprobs for s in theirs],
                                   atol=1e-4)
        assert [s.top_logprobs and [i for i, _ in t] for s in mine for t in s.top_logprobs or []] \
            == [s.top_logprobs and [i for i, _ in t] for s in theirs for t in s.top_logprobs or []]
        assert [s.finish_reason for s in mine] == [s.finish_reason for s in theirs]


def test_a_short_request_joins_a_long_one_and_finishes_first(engine):
    p = _prompts()
    long, short = Events(), Events()
    engine.submit(Job([Request(p[2], n=2, max_new_tokens=200, seed=1)], long))
    assert long.q.get(timeout=300)[1][0] == "tokens"  # the long one is decoding
    engine.submit(Job([Request(p[0], max_new_tokens=4, seed=2)], short))
    short_events, long_events = short.until_done(), long.until_done()
    assert short_events[-1][1] == long_events[-1][1] == "done"
    assert short_events[-1][0] < long_events[-1][0]
    stats = engine.stats()
    assert stats["admissions"] == 2 and stats["largest_batch"] == 3  # decoded together


def test_a_cancelled_request_frees_its_rows(engine):
    p = _prompts()
    hog, other = Events(), Events()
    # 8 rows fill the batch for a long time (the engine leaves length checks to the server)
    job = engine.submit(Job([Request(p[2], n=8, max_new_tokens=2000, seed=1)], hog))
    assert hog.q.get(timeout=300)[1][0] == "tokens"
    engine.submit(Job([Request(p[0], max_new_tokens=3, seed=2)], other))
    time.sleep(0.5)
    assert other.q.empty() and engine.stats()["admitted_jobs"] == 1  # no room: it waits
    engine.cancel(job)
    assert other.until_done()[-1][1] == "done"
    assert engine.rows.live == 0
    assert "done" not in [kind for _, (kind, _) in list(hog.q.queue)]


def _poison_admission(engine, monkeypatch):
    admit = engine.rows.admit

    def failing(seqs):
        if any(s.prompt[0] == POISON for s in seqs):
            raise RuntimeError("poisoned prefill")
        return admit(seqs)

    monkeypatch.setattr(engine.rows, "admit", failing)


def _poison_segments(engine, monkeypatch):
    rows, step = engine.rows, engine.rows.step

    def failing():
        if any(o is not None and not d and o[0].requests[o[1]].prompt[0] == POISON
               for o, d in zip(rows.owners, rows.done)):
            rows.reset()  # as a failed segment leaves the batch
            raise RuntimeError("poisoned segment")
        return step()

    monkeypatch.setattr(rows, "step", failing)


@pytest.mark.parametrize("poison", [_poison_admission, _poison_segments])
def test_a_request_that_makes_the_engine_fail_fails_alone(sampler, engine, monkeypatch, poison):
    requests = _requests()
    reference = sampler.generate(requests)
    poison(engine, monkeypatch)
    bad = Request([POISON] + _prompts()[0], max_new_tokens=30, seed=3)
    sinks = [Events() for _ in range(4)]
    with engine.paused():  # all four are admitted together
        for r, sink in zip(requests + [bad], sinks):
            engine.submit(Job([r], sink))
        assert engine.wait_queued(4, timeout=60)
    outcomes = [s.until_done() for s in sinks]
    assert outcomes[3][-1][1] == "error" and "poisoned" in str(outcomes[3][-1][2])
    for k, events in enumerate(outcomes[:3]):
        assert events[-1][1] == "done"
        rows = {}
        for _, kind, emits in events[:-1]:
            for e in emits:
                rows.setdefault(e.owner, []).extend(e.tokens)
        assert [rows[0, j] for j in range(requests[k].n)] == _tokens([reference[k]])[0]
    assert engine.stats()["failures"] >= 1
    assert _tokens(engine.generate(requests[1:2])) == _tokens(reference[1:2])  # it goes on


def test_paused_jobs_are_admitted_together_and_closing_refuses(engine):
    p = _prompts()
    before = engine.stats()["admissions"]
    with engine.paused():
        sinks = [Events() for _ in range(3)]
        for k, sink in enumerate(sinks):
            engine.submit(Job([Request(p[k], max_new_tokens=2, seed=k)], sink))
        assert engine.wait_queued(3, timeout=60)
    assert all(s.until_done()[-1][1] == "done" for s in sinks)
    stats = engine.stats()
    assert stats["admissions"] == before + 1 and stats["largest_admission"] == 3
    waiting = Events()
    with engine.paused():
        engine.submit(Job([Request(p[0], max_new_tokens=2)], waiting))
        engine.close()
    assert waiting.until_done()[-1][1] == "error"
    with pytest.raises(APIError, match="shutting down") as e:
        engine.submit(Job([Request(p[0])]))
    assert e.value.status == 503


def test_bad_engine_settings(sampler):
    with pytest.raises(ValueError, match="max_batch 0"):
        Engine(sampler, max_batch=0)
    with pytest.raises(ValueError, match="segment 0"):
        Engine(sampler, segment=0)
