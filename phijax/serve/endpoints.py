"""The generation endpoints, /v1/completions and /v1/chat/completions.

A request body is validated into a `Plan` (the sampler requests, one `TextStream` per choice,
what to report); a `Run` hands its work to the engine and turns the engine's tokens into
`Delta`s per choice; `respond` answers with one JSON body, `stream` with Server-Sent Events in
OpenAI's format (`data: {chunk}` lines, then `data: [DONE]`; chat chunks carry `delta`s, the
role first; the last chunk of a choice has its finish_reason; with
`stream_options.include_usage` every chunk has `"usage": null` and a last chunk with no choices
has the usage). Choices are numbered prompt by prompt, n per prompt.

Beyond generation: completions `echo` puts the prompt before the text (and, with `logprobs`, the
prompt tokens' log-probs from the model's forward pass, the first one null), and `max_tokens: 0`
generates nothing (with echo: the prompt's log-probs only, as evaluation harnesses ask).
Completions `logprobs: N` lists per token a dict of the N most likely tokens (and the chosen
one); chat `logprobs: true, top_logprobs: N` lists N entries per token. `usage.completion_tokens`
counts every token the engine generated, stop tokens included. `ignore_eos: true` (vLLM's
extension) generates past the end-of-text tokens.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from phijax.decoding import top_bucket
from phijax.sampling import Request
from phijax.serve import schemas
from phijax.serve.engine import Job
from phijax.serve.schemas import APIError, finite, usage
from phijax.serve.text import Delta, TextStream

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """A validated generation request."""
    chat: bool
    prompts: list[list[int]]
    requests: list[Request]   # one per prompt; none when max_tokens is 0
    n: int
    streams: list[TextStream]  # one per choice
    logprobs: int | None      # None: no log-probs; else the most likely tokens listed per token
    echo: bool
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    generated: int = 0        # tokens the engine made


def _plan(ctx, body: dict, prompts: list[list[int]], chat: bool, logprobs: int | None,
          echo: bool) -> Plan:
    """The Plan of `prompts`: sampling parameters, stop tokens, and a context-length check (a
    400 naming the limit); chat with no max tokens generates until the context is full."""
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    s = schemas.sampling(body, keys, len(prompts), min_tokens=1 if chat else 0)
    stream, include_usage = schemas.streaming(body)
    special = tuple(ctx.tokenizer.stop_ids) if chat else (ctx.vocab.eos_id,)
    if schemas.boolean(body, "ignore_eos", False):  # vLLM's extension, for benchmarks
        special = ()
    stop_ids = tuple(dict.fromkeys(special + ctx.vocab.stop_token_ids(s.stops)))
    limit, param = ctx.sampler.max_len, "messages" if chat else "prompt"
    default = None if chat else schemas.COMPLETIONS_MAX_TOKENS
    requests = []
    for prompt in prompts:
        new = s.max_tokens if s.max_tokens is not None else default
        if new is None:
            new = max(limit - len(prompt), 1)
        if len(prompt) + new > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. "
                           f"However, you requested {len(prompt) + new} tokens "
                           f"({len(prompt)} in the {param}, {new} for the completion). "
                           f"Please reduce the {param} or the completion length.",
                           param=param, code="context_length_exceeded")
        requests.append(Request(prompt=prompt, n=s.n, max_new_tokens=new,
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                stop_ids=stop_ids, seed=s.seed, top_logprobs=logprobs or 0))
    if requests and not requests[0].max_new_tokens:
        requests = []
    streams = [TextStream(ctx.vocab, s.stops, special, stop_ids, top=bool(logprobs))
               for _ in range(len(prompts) * s.n)]
    return Plan(chat, prompts, requests, s.n, streams, logprobs, echo, stream, include_usage)


def completions_plan(ctx, body: dict) -> Plan:
    schemas.check_model(body, ctx.model_name)
    schemas.refuse_unsupported(body, chat=False)
    prompts = ctx.vocab.prompts(body.get("prompt"))
    logprobs = schemas.integer(body, "logprobs", None, 0, schemas.MAX_LOGPROBS)
    return _plan(ctx, body, prompts, False, logprobs, schemas.boolean(body, "echo", False))


def chat_plan(ctx, body: dict) -> Plan:
    schemas.check_model(body, ctx.model_name)
    schemas.refuse_unsupported(body, chat=True)
    messages = schemas.chat_messages(body.get("messages"))
    logprobs = schemas.chat_logprobs(body)
    return _plan(ctx, body, [list(ctx.tokenizer.encode_prompt(messages))], True, logprobs, False)


class AsyncSink:
    """Engine events into an asyncio queue (put from the worker thread)."""

    def __init__(self):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def __call__(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    async def get(self):
        kind, payload = await self.queue.get()
        if kind == "error":
            raise payload
        return kind, payload


class Run:
    """A Plan's work in the engine: the prompt scores (echo with log-probs), then the tokens.
    Submitting raises at once if the engine is closed; `cancel` drops what is left."""

    def __init__(self, ctx, plan: Plan):
        self.ctx, self.plan, self.jobs = ctx, plan, []
        try:
            if plan.echo and plan.logprobs is not None:
                self.scores_sink = AsyncSink()
                self._submit(Job(sink=self.scores_sink, score=plan.prompts,
                                 top=top_bucket(plan.logprobs)))
            if plan.requests:
                self.sink = AsyncSink()
                self.job = self._submit(Job(plan.requests, self.sink))
        except BaseException:
            self.cancel()
            raise

    def _submit(self, job: Job) -> Job:
        self.jobs.append(self.ctx.engine.submit(job))
        return job

    def cancel(self) -> None:
        for job in self.jobs:
            self.ctx.engine.cancel(job)

    async def scores(self):
        """Per prompt its `Scored` (echo with log-probs), else None."""
        if not (self.plan.echo and self.plan.logprobs is not None):
            return None
        return (await self.scores_sink.get())[1]

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice, Delta) as the engine's tokens arrive; a choice whose text has ended at a
        stop string needs no more tokens (its row is stopped)."""
        plan = self.plan
        if not plan.requests:
            for k in range(len(plan.streams)):
                yield k, Delta("", [], [], [] if plan.logprobs else None, [], "length")
            return
        while True:
            kind, emits = await self.sink.get()
            if kind == "done":
                return
            for e in emits:
                i, j = e.owner
                k = i * plan.n + j
                plan.generated += len(e.tokens)
                delta = plan.streams[k].feed(e.tokens, e.logprobs, e.top, e.done)
                if delta is not None:
                    yield k, delta
                if plan.streams[k].finish and not e.done:
                    self.ctx.engine.stop_row(self.job, i, j)


# ---------------------------------------------------------------------------------------------
# Answers


def _top_dict(vocab, token: int, logprob: float, top) -> dict:
    out = {vocab.text(i): finite(lp) for i, lp in top or []}
    out.setdefault(vocab.text(token), finite(logprob))
    return out


def completion_logprobs(vocab, tokens, logprobs, tops, offsets, n_top: int) -> dict:
    """The completions `logprobs` object; a None log-prob or top (the echoed first prompt
    token) stays null."""
    tops = tops if tops is not None else [None if lp is None else [] for lp in logprobs]
    return {"tokens": [vocab.text(t) for t in tokens],
            "token_logprobs": [None if lp is None else finite(lp) for lp in logprobs],
            "top_logprobs": [None if lp is None else _top_dict(vocab, t, lp, top[:n_top])
                             for t, lp, top in zip(tokens, logprobs, tops)],
            "text_offset": list(offsets)}


def chat_logprobs(vocab, tokens, logprobs, tops, n_top: int) -> dict:
    entry = lambda t, lp: {"token": vocab.text(t), "logprob": finite(lp),
                           "bytes": list(vocab.bytes(t))}
    tops = tops if tops is not None else [[]] * len(tokens)
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, l) for i, l in top[:n_top]]}
                        for t, lp, top in zip(tokens, logprobs, tops)], "refusal": None}


def _echo(ctx, plan: Plan, scores) -> list[tuple[str, dict | None]]:
    """Per prompt: its text, and (with log-probs) its completions logprobs object."""
    out = []
    for p, prompt in enumerate(plan.prompts):
        text, offsets = ctx.vocab.pieces(prompt)
        lp = None
        if scores is not None:
            s = scores[p]
            lp = completion_logprobs(ctx.vocab, prompt, [None] + s.logprobs,
                                     [None] + (s.top or [[]] * len(s.logprobs)), offsets,
                                     plan.logprobs)
        out.append((text, lp))
    return out


def _offset_base(ctx, plan: Plan, echo) -> list[int]:
    """Per prompt, where the generated text starts in the choice's text offsets."""
    if echo is not None:
        return [len(text) for text, _ in echo]
    if plan.logprobs is None or plan.chat:
        return [0] * len(plan.prompts)
    return [len(ctx.tokenizer.decode(p)) for p in plan.prompts]


def _head(ctx, plan: Plan, chunk: bool) -> dict:
    obj = ("chat.completion" if plan.chat else "text_completion") + (
        ".chunk" if chunk and plan.chat else "")
    return {"id": ("chatcmpl-" if plan.chat else "cmpl-") + plan.id, "object": obj,
            "created": plan.created, "model": ctx.model_name, "system_fingerprint": None}


def _usage(plan: Plan) -> dict:
    return usage(sum(map(len, plan.prompts)), plan.generated)


def server_error(e: Exception) -> APIError:
    return APIError(f"The server had an error while processing your request: "
                    f"{type(e).__name__}: {e}", 500, type="server_error")


def _empty(plan: Plan) -> Delta:
    return Delta("", [], [], [] if plan.logprobs else None, [], None)


def _join(a: Delta, b: Delta) -> Delta:
    return Delta(a.text + b.text, a.tokens + b.tokens, a.logprobs + b.logprobs,
                 None if a.top is None else a.top + (b.top or []), a.offsets + b.offsets,
                 b.finish or a.finish)


def _choice(ctx, plan: Plan, k: int, d: Delta, echo, base: int, chunk: bool) -> dict:
    """Choice k of a body (chunk=False: the whole choice) or of a stream chunk (its delta `d`);
    `echo` (text, logprobs object) goes before d's text."""
    if plan.chat:
        lp = None if plan.logprobs is None else chat_logprobs(ctx.vocab, d.tokens, d.logprobs,
                                                              d.top, plan.logprobs)
        message = ({"content": d.text} if d.text else {}) if chunk else {
            "role": "assistant", "content": d.text, "refusal": None}
        return {"index": k, "delta" if chunk else "message": message, "logprobs": lp,
                "finish_reason": d.finish}
    prefix, lp = echo if echo is not None else ("", None)
    if plan.logprobs is not None:
        own = completion_logprobs(ctx.vocab, d.tokens, d.logprobs, d.top,
                                  [base + o for o in d.offsets], plan.logprobs)
        lp = own if lp is None else {key: lp[key] + own[key] for key in own}
    return {"index": k, "text": prefix + d.text, "logprobs": lp, "finish_reason": d.finish}


async def respond(ctx, plan: Plan) -> dict:
    """The whole answer, once every choice has finished."""
    run = Run(ctx, plan)
    try:
        echo = _echo(ctx, plan, await run.scores()) if plan.echo else None
        got = [_empty(plan) for _ in plan.streams]
        async for k, d in run.deltas():
            got[k] = _join(got[k], d)
    finally:
        run.cancel()
    base = _offset_base(ctx, plan, echo)
    choices = [_choice(ctx, plan, k, d, echo and echo[k // plan.n], base[k // plan.n], False)
               for k, d in enumerate(got)]
    return {**_head(ctx, plan, False), "choices": choices, "usage": _usage(plan)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def stream(ctx, plan: Plan) -> AsyncIterator[str]:
    """The answer as Server-Sent Events; the work is submitted now (a closed engine raises
    here, before any response is sent)."""
    return _events(ctx, plan, Run(ctx, plan))


async def _events(ctx, plan: Plan, run: Run) -> AsyncIterator[str]:
    head = _head(ctx, plan, True)
    extra = {"usage": None} if plan.include_usage else {}
    chunk = lambda choice: _sse({**head, "choices": [choice], **extra})
    try:
        echo = None
        for k in range(len(plan.streams) if plan.chat else 0):
            yield chunk({"index": k, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
        if plan.echo:
            echo = _echo(ctx, plan, await run.scores())
            for k in range(len(plan.streams)):
                yield chunk(_choice(ctx, plan, k, _empty(plan), echo[k // plan.n], 0, True))
        base = _offset_base(ctx, plan, echo)
        async for k, d in run.deltas():
            yield chunk(_choice(ctx, plan, k, d, None, base[k // plan.n], True))
        if plan.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(plan)})
    except APIError as e:
        yield _sse(e.body())
    except Exception as e:  # noqa: BLE001 - reported in the stream, the server goes on
        log.exception("generation failed")
        yield _sse(server_error(e).body())
    finally:
        run.cancel()
    yield "data: [DONE]\n\n"
