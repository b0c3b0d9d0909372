"""Pivotal Token Search, the Phi-4 report's Algorithm 1, over a pluggable estimator of p(success).

    phijax-tools pts RUN_DIR QUESTIONS.jsonl --out PAIRS.jsonl [key=value ...]

For a question Q and a sampled answer T, p(prefix) is the fraction of `rollouts` continuations
of (Q, prefix), sampled from the model, that the oracle (`phijax.eval.questions.check`) accepts.
`Subdivide(prefix, T)` returns [T] when |T| <= 1 or |p(prefix) - p(prefix + T)| < p_gap, else
splits T at its cumulative log-probability midpoint and recurses on both halves; every single
token t of the result with |p(prefix) - p(prefix + t)| >= p_gap is a candidate pivotal token.

  split    with log-probs l_1..l_n (n >= 2) and L = sum, split after the smallest i in [1, n-1]
           with l_1 + ... + l_i <= L / 2 (at least half the log-prob mass consumed); if there is
           none, i = n - 1.  Halves carry equal surprise, not equal token counts.
  filter   only questions with p_min <= p(empty prefix) <= p_max are searched; their answers T
           are the first `answers_per_question` rollouts of that first estimate.
  batching each (question, answer) search is a generator that yields the prefixes it needs; the
           driver estimates, per round, every prefix all searches need that is not yet memoized
           in one batched call (one Request of n rollouts per prefix: shared-prefix fan-out),
           chunked to `batch_rows` rows. The two halves of a split are searched in lockstep, so
           a round is one recursion level of every search. No prefix is estimated twice.
  re-check each candidate's p(prefix) and p(prefix + t) are topped up to `recheck` rollouts
           (only the extra ones are drawn, with another seed, and pooled with the first);
           candidates whose pooled |dp| falls below p_gap are dropped.
  pairs    if t raises p, t is chosen and rejected is the most frequent first token != t of
           the FAILED rollouts at that prefix (ties: the smallest id); if t lowers p, t is
           rejected and chosen is the most frequent first token != t of the SUCCESSFUL ones.
           Everything is token ids; a single-token completion has no EOS appended.

A prefix that ends with a stop token (<|im_end|>, <|endoftext|>) or has used max_new_tokens is a
finished answer: its rollouts are the prefix itself, judged once, and sample nothing. A
continuation of a prefix of k tokens gets max_new_tokens - k new tokens, so every rollout is an
answer of at most max_new_tokens tokens, like the answers searched.

Seeds: the rollouts of (question, prefix) use a seed hashed from (`seed`, question index,
prefix, draw), draw 0 for the first estimate and 1 for the top-up, so estimates of different
prefixes are independent and a run is reproducible.

Output: one JSON line per pair, what `phijax dpo` reads: {"id": "QID/pts/ANSWER/PREFIX_LEN",
"prompt_ids" (the question's prompt + the answer prefix), "chosen_ids": [a], "rejected_ids": [b],
"question_id", "prefix_len", "p_before", "p_after" (pooled after the re-check), "p_gap" (the
threshold it passed), "samples_used" (rollouts sampled for that question in all), "kind": "pts"}.
"""
from __future__ import annotations

import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence

from phijax.config import check_fields, positive, ranged
from phijax.errors import ConfigError

Prefix = tuple[int, ...]


@dataclass
class PTSConfig:
    rollouts: int = positive(64)  # N: rollouts per prefix estimate
    recheck: int = positive(256)  # rollouts per candidate prefix after the top-up
    p_gap: float = ranged(0.2, gt=0, le=1)
    p_min: float = ranged(0.2, ge=0, le=1)
    p_max: float = ranged(0.8, ge=0, le=1)
    max_new_tokens: int = positive(512)  # answer length, prefix included
    temperature: float = positive(1.0)  # PTS needs sampled rollouts
    seed: int = 0
    answers_per_question: int = positive(1)
    batch_rows: int = positive(512)  # rollouts per sampler call

    def validate(self, prefix: str = "") -> None:
        """ConfigError naming the first bad setting (ranges, then the settings that depend on
        each other)."""
        check_fields(self, prefix.rstrip("."))
        key = lambda name: f"{prefix}{name}"
        if self.recheck < self.rollouts:
            raise ConfigError(f"{key('recheck')} {self.recheck}: must be at least "
                              f"{key('rollouts')} ({self.rollouts})")
        if self.p_max < self.p_min:
            raise ConfigError(f"{key('p_max')} {self.p_max}: must be at least "
                              f"{key('p_min')} ({self.p_min})")
        if self.answers_per_question > self.rollouts:
            raise ConfigError(f"{key('answers_per_question')} {self.answers_per_question}: "
                              f"must be at most {key('rollouts')} ({self.rollouts})")
        need = max(self.rollouts, self.recheck - self.rollouts)
        if self.batch_rows < need:
            raise ConfigError(f"{key('batch_rows')} {self.batch_rows}: must hold one request: "
                              f"at least {need} ({key('rollouts')} and {key('recheck')} minus "
                              f"{key('rollouts')})")


@dataclass(frozen=True)
class Job:
    """Sample `n` rollouts continuing question `question`'s prompt + answer `prefix`."""
    question: int
    prefix: Prefix
    n: int
    seed: int


@dataclass
class Rollouts:
    """Rollouts of one prefix: per rollout, success and the continuation's tokens (empty for a
    finished prefix, which samples nothing) with their model log-probs (may be empty lists
    where nobody needs them: only the empty prefix's rollouts become searched answers)."""
    success: list[bool]
    tokens: list[list[int]]
    logprobs: list[list[float]] = field(default_factory=list)

    @property
    def p(self) -> float:
        return sum(self.success) / len(self.success)

    @property
    def sampled(self) -> int:
        return sum(1 for t in self.tokens if t)

    def first(self, success: bool) -> list[int]:
        """First tokens of the rollouts that (did not) succeed."""
        return [t[0] for s, t in zip(self.success, self.tokens) if s == success and t]

    def __add__(self, other: Rollouts) -> Rollouts:
        return Rollouts(self.success + other.success, self.tokens + other.tokens,
                        self.logprobs + other.logprobs)


Estimate = Callable[[list[Job]], list[Rollouts]]


@dataclass
class Pivot:
    question: int
    answer: int
    prefix: Prefix
    token: int
    p_before: float
    p_after: float


@dataclass
class Stats:
    questions: int = 0
    searched: int = 0
    skipped_p_range: int = 0
    answers: int = 0
    candidates: int = 0
    kept: int = 0
    pairs: int = 0
    no_alternative: int = 0
    prefixes: int = 0
    rollouts: int = 0
    rounds: int = 0
    calls: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        out = dict(self.__dict__, seconds=round(self.seconds, 2))
        out["rollouts_per_s"] = round(self.rollouts / self.seconds, 1) if self.seconds else 0.0
        return out


# ------------------------------------------------------------------ Algorithm 1, as generators
# A search yields a tuple of prefixes it needs p of and is sent back `p`, a function of a prefix.

def split_point(logprobs: Sequence[float]) -> int:
    """Where to split a piece of n >= 2 tokens: its cumulative log-probability midpoint."""
    half, total = sum(logprobs) / 2, 0.0
    for i, lp in enumerate(logprobs[:-1], 1):
        total += lp
        if total <= half:
            return i
    return len(logprobs) - 1


def _gather(searches: list[Generator]):
    """Run sub-searches in lockstep: each round asks for the union of what they all need; returns
    their results."""
    results, need = [None] * len(searches), {}

    def step(i, sent):
        try:
            need[i] = searches[i].send(sent)
        except StopIteration as stop:
            results[i] = stop.value
            need.pop(i, None)

    for i in range(len(searches)):
        step(i, None)
    while need:
        p = yield tuple(dict.fromkeys(x for wanted in need.values() for x in wanted))
        for i in list(need):
            step(i, p)
    return results


def subdivide(prefix: Prefix, piece: Prefix, logprobs: Sequence[float], p_gap: float):
    if len(piece) <= 1:
        return [piece]
    p = yield (prefix, prefix + piece)
    if abs(p(prefix) - p(prefix + piece)) < p_gap:
        return [piece]
    i = split_point(logprobs)
    left, right = yield from _gather([subdivide(prefix, piece[:i], logprobs[:i], p_gap),
                                      subdivide(prefix + piece[:i], piece[i:], logprobs[i:],
                                                p_gap)])
    return left + right


def search(answer: Sequence[int], logprobs: Sequence[float], p_gap: float):
    """Candidate pivotal tokens of one answer: [(prefix, token, p(prefix), p(prefix + token))]."""
    pieces = yield from subdivide((), tuple(answer), list(logprobs), p_gap)
    singles, prefix = [], ()
    for piece in pieces:
        if len(piece) == 1:
            singles.append((prefix, piece[0]))
        prefix += piece
    if not singles:
        return []
    p = yield tuple(x for pre, t in singles for x in (pre, pre + (t,)))
    return [(pre, t, p(pre), p(pre + (t,))) for pre, t in singles
            if abs(p(pre) - p(pre + (t,))) >= p_gap]


def _tagged(question: int, gen: Generator):
    """`gen`'s prefixes as (question, prefix) keys."""
    try:
        need = next(gen)
    except StopIteration as stop:
        return stop.value
    while True:
        p = yield tuple((question, x) for x in need)
        try:
            need = gen.send(lambda prefix: p((question, prefix)))
        except StopIteration as stop:
            return stop.value


# ------------------------------------------------------------------ the driver

def _seed(base: int, question: int, prefix: Prefix, draw: int) -> int:
    h = hashlib.blake2b(repr((base, question, prefix, draw)).encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


class _Driver:
    """Memoized, batched estimates: every (question, prefix) is estimated once with `rollouts`
    and topped up at most once."""

    def __init__(self, estimate: Estimate, cfg: PTSConfig, stats: Stats, log):
        self.estimate, self.cfg, self.stats, self.log = estimate, cfg, stats, log
        self.memo: dict[tuple[int, Prefix], Rollouts] = {}
        self.topped: set[tuple[int, Prefix]] = set()
        self.sampled: Counter = Counter()  # rollouts sampled per question
        self.start = time.perf_counter()

    def p(self, key) -> float:
        return self.memo[key].p

    def ensure(self, keys, stage: str) -> None:
        keys = [k for k in dict.fromkeys(keys) if k not in self.memo]
        jobs = [Job(q, pre, self.cfg.rollouts, _seed(self.cfg.seed, q, pre, 0)) for q, pre in keys]
        for job, got in zip(jobs, self._run(jobs, stage)):
            self.memo[job.question, job.prefix] = got

    def top_up(self, keys, stage: str) -> None:
        keys = [k for k in dict.fromkeys(keys) if k not in self.topped]
        self.topped.update(keys)
        jobs = [Job(q, pre, self.cfg.recheck - len(self.memo[q, pre].success),
                    _seed(self.cfg.seed, q, pre, 1)) for q, pre in keys]
        jobs = [j for j in jobs if j.n > 0]
        for job, got in zip(jobs, self._run(jobs, stage)):
            self.memo[job.question, job.prefix] += got

    def _chunks(self, jobs: list[Job]):
        """Consecutive jobs of at most batch_rows rollouts together."""
        chunk, rows = [], 0
        for job in jobs:
            if chunk and rows + job.n > self.cfg.batch_rows:
                yield chunk
                chunk, rows = [], 0
            chunk.append(job)
            rows += job.n
        if chunk:
            yield chunk

    def _run(self, jobs: list[Job], stage: str) -> list[Rollouts]:
        if not jobs:
            return []
        t0, out = time.perf_counter(), [None] * len(jobs)
        # Calls of similar prefix lengths: a call decodes until its longest row's budget
        # (max_new_tokens - prefix length), so mixing short and long prefixes wastes steps.
        order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].prefix))
        done, last = 0, t0
        for chunk in self._chunks([jobs[i] for i in order]):
            got = self.estimate(chunk)
            if len(got) != len(chunk):
                raise RuntimeError(f"estimate gave {len(got)} results for {len(chunk)} jobs")
            for r in got:
                out[order[done]] = r
                done += 1
            self.stats.calls += 1
            now = time.perf_counter()
            if now - last > 30 and done < len(jobs):  # a long round: progress and ETA
                last = now
                self.log(f"pts {stage} round {self.stats.rounds + 1}: {done}/{len(jobs)} "
                         f"prefixes in {now - t0:.0f}s, ETA "
                         f"{(now - t0) * (len(jobs) - done) / done:.0f}s")
        sampled = 0
        for job, got in zip(jobs, out):
            if len(got.success) != job.n:
                raise RuntimeError(f"estimate returned {len(got.success)} rollouts for n={job.n}")
            self.sampled[job.question] += got.sampled
            sampled += got.sampled
        self.stats.rounds += 1
        self.stats.prefixes += len(jobs)
        self.stats.rollouts += sampled
        dt, elapsed = time.perf_counter() - t0, time.perf_counter() - self.start
        self.log(f"pts {stage} round {self.stats.rounds}: {len(jobs)} prefixes, {sampled} "
                 f"rollouts, {sampled / max(dt, 1e-9):.0f} rollouts/s, {elapsed:.1f}s")
        return out


def find_pivots(n_questions: int, estimate: Estimate, cfg: PTSConfig, log=None):
    """Algorithm 1 over questions 0..n_questions-1 with a pluggable estimator.
    Returns (kept pivots, the driver (memo, rollouts per question), stats)."""
    cfg.validate()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    stats = Stats(questions=n_questions)
    d = _Driver(estimate, cfg, stats, log)
    d.ensure([(q, ()) for q in range(n_questions)], "root")
    searched = [q for q in range(n_questions) if cfg.p_min <= d.p((q, ())) <= cfg.p_max]
    stats.searched, stats.skipped_p_range = len(searched), n_questions - len(searched)
    order = []  # (question, answer index) of each search
    searches = []
    for q in searched:
        root = d.memo[q, ()]
        for a in range(cfg.answers_per_question):
            order.append((q, a))
            searches.append(_tagged(q, search(root.tokens[a], root.logprobs[a], cfg.p_gap)))
    stats.answers = len(searches)
    gen = _gather(searches)
    try:
        need = next(gen)
        while True:
            d.ensure(need, "search")
            need = gen.send(d.p)
    except StopIteration as stop:
        results = stop.value
    candidates = {}  # (question, prefix, token) -> answer index; the first answer wins
    for (q, a), found in zip(order, results):
        for pre, t, _, _ in found:
            candidates.setdefault((q, pre, t), a)
    stats.candidates = len(candidates)
    d.top_up([k for q, pre, t in candidates for k in ((q, pre), (q, pre + (t,)))], "recheck")
    kept = [Pivot(q, a, pre, t, d.p((q, pre)), d.p((q, pre + (t,))))
            for (q, pre, t), a in candidates.items()
            if abs(d.p((q, pre)) - d.p((q, pre + (t,)))) >= cfg.p_gap]
    stats.kept = len(kept)
    stats.seconds = time.perf_counter() - d.start
    return kept, d, stats


