"""The teacher runtime: an asyncio client for any OpenAI-compatible chat endpoint.

`Teacher.chat(messages, n=..., ...)` returns the n choices' message contents. Around the official
`openai.AsyncOpenAI` client (its own retries off; one pooled HTTP client with at least
`concurrency` connections) it adds:

* bounded concurrency (an `asyncio.Semaphore` held only while a request is in flight),
* requests-per-minute and tokens-per-minute limits (token buckets holding one second's worth;
  TPM charges len(text)/4 + n*max_tokens before the call and corrects to the reported usage),
* retries with exponential backoff and full jitter, honouring `Retry-After` / `retry-after-ms`
  (seconds or an HTTP date) on 429/503; retried: 408, 429, 5xx, timeouts, connection errors,
  malformed JSON, fewer than n choices, a choice without content, and a choice the endpoint cut
  off (`finish_reason` "length" or "content_filter": not an answer, unless the caller passes
  `allow_truncated=True`); 401, 403 and 404 raise `TeacherRefused` at once (naming the
  endpoint and model), any other 4xx `TeacherError`,
* a content-addressed cache (`tools.cache.Cache`) keyed by the full request, plus in-process
  de-duplication of identical requests in flight; only answers the caller accepts are stored,
  and a request that accepts cut-off answers has a key of its own,
* usage accounting: requests, cache_hits, retries, failures, prompt/completion tokens, cost.

`model_card()` asks `GET {base_url}/models` for the model's entry (its `max_model_len`, as
vLLM and `phijax serve` report the context length).

The API key is read from the environment variable NAMED by `TeacherConfig.api_key_env`; it is
never stored in the config, the cache, the usage numbers or error messages. If the variable is
unset and `base_url` is a loopback address the dummy key "local" is used; otherwise the
constructor fails with a one-line error naming the variable, before any network call.
"""
from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlsplit

import openai

try:  # openai >= 3 ships on httpx2; older releases on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from phijax.config import check_fields, positive, ranged
from phijax.errors import EndpointError
from tools.cache import Cache


@dataclass
class TeacherConfig:
    """The teacher endpoint and client limits: the `teacher` section of a pipeline or judge
    config, loaded with `phijax.config` (ranges declared here, checked by `check_fields`)."""
    base_url: str                        # any OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key (never the key)
    concurrency: int = ranged(64, ge=1)  # requests in flight
    requests_per_minute: Optional[float] = positive(None)
    tokens_per_minute: Optional[float] = positive(None)
    max_retries: int = ranged(8, ge=0)
    timeout_s: float = positive(60.0)    # per attempt
    backoff_base_s: float = ranged(0.5, ge=0)
    backoff_max_s: float = ranged(30.0, ge=0)
    price_prompt_per_1k: float = ranged(0.0, ge=0)      # cost accounting, per 1k tokens
    price_completion_per_1k: float = ranged(0.0, ge=0)


class TeacherError(EndpointError):
    """A chat call failed for good (non-retryable error, or retries exhausted); one-line message.
    `kind` names the cause in a few words ("finish_reason length", "HTTP 500", "timeout"), so
    failures can be counted by cause."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


class TeacherRefused(TeacherError):
    """The endpoint refuses this client or model (HTTP 401, 403, 404): no retry or other seed
    can succeed, so a pipeline stops at the first one."""


TRUNCATED = ("length", "content_filter")   # finish reasons of an answer cut off
REFUSED = (401, 403, 404)                   # statuses no retry or other request gets past


def _kind(why: str) -> str:
    """The cause in a few words: the text before the first colon of a failure description."""
    return why.split(":", 1)[0]


class _Retryable(Exception):
    """An attempt failed in a way worth retrying; `retry_after` is the server's hint, if any;
    `usage` the tokens the attempt cost (an answer cut off is paid for all the same)."""

    def __init__(self, why: str, retry_after: float | None = None,
                 usage: dict | None = None):
        super().__init__(why)
        self.retry_after = retry_after
        self.usage = usage


class _TokenBucket:
    """Refills at `per_minute / 60` per second up to one second's worth (at least one request's
    amount). `acquire(x)` waits until the level reaches min(x, capacity), then takes x (the level
    may go negative, so oversized requests still pay in full). Waiters are served in order.
    `clock` and `sleep` are the time source and the wait (tests pass a simulated clock)."""

    def __init__(self, per_minute: float, burst_s: float = 1.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable] = asyncio.sleep):
        if not per_minute > 0:
            raise ValueError(f"rate limit must be > 0, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.clock, self.sleep = clock, sleep
        self.stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                self._refill()
                if self.level >= need:
                    self.level -= amount
                    return
                await self.sleep((need - self.level) / self.rate)

    def credit(self, amount: float) -> None:
        """Give back `amount` (negative: charge more), e.g. to correct an estimate."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


def _is_loopback(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta-seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            v = float(ms) / 1000.0
            if math.isfinite(v):
                return max(0.0, v)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        v = float(ra)
        return max(0.0, v) if math.isfinite(v) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status_message(e: openai.APIStatusError) -> str:
    """The server's own message of an HTTP error, without the SDK's "Error code: N - "."""
    text = getattr(e, "message", "") or str(e)
    text = re.sub(r"^Error code: \d+ - ", "", str(text))
    return _one_line(text, 200)


def _text_len(messages: list[dict]) -> int:
    total = 0
    for m in messages:
        c = m.get("content")
        total += len(c) if isinstance(c, str) else len(json.dumps(c, default=str)) if c else 0
    return total


class Teacher:
    """Async, rate-limited, retrying, caching chat client; see the module docstring."""

    def __init__(self, cfg: TeacherConfig, cache: Cache | None = None):
        check_fields(cfg, "teacher")
        key = os.environ.get(cfg.api_key_env)
        if not key:
            if not _is_loopback(cfg.base_url):
                raise TeacherError(f"environment variable {cfg.api_key_env} is not set: it must hold "
                                   f"the API key for the teacher endpoint {cfg.base_url}")
            key = "local"
        self.cfg = cfg
        self.cache = cache
        timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0))
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=cfg.concurrency,
                                max_keepalive_connections=cfg.concurrency, keepalive_expiry=30.0),
            timeout=timeout, trust_env=not _is_loopback(cfg.base_url))  # no proxies for loopback
        self._client = openai.AsyncOpenAI(api_key=key, base_url=cfg.base_url, max_retries=0,
                                          timeout=cfg.timeout_s, http_client=self._http)
        del key
        self._sem = asyncio.Semaphore(cfg.concurrency)  # held only while a request is in flight
        self._rpm = _TokenBucket(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self._tpm = _TokenBucket(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        self._inflight: dict[str, asyncio.Future] = {}
        self._rng = random.Random()
        self.usage: dict = dict(requests=0, cache_hits=0, retries=0, failures=0,
                                prompt_tokens=0, completion_tokens=0, cost=0.0)

    def __repr__(self) -> str:
        return f"Teacher(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    # ------------------------------------------------------------------ public API

    async def chat(self, messages: list[dict], *, n: int = 1, temperature: float = 1.0,
                   max_tokens: int | None = None, seed: int | None = None,
                   template_version: str = "", allow_truncated: bool = False,
                   **params) -> list[str]:
        """The n choices' message contents, cached by the full request. A choice the endpoint
        cut off (finish_reason "length" or "content_filter") is retried like a failed attempt
        unless `allow_truncated`."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        request = dict(model=self.cfg.model, messages=messages, n=n, temperature=temperature,
                       max_tokens=max_tokens, seed=seed, template_version=template_version,
                       params=params)
        if allow_truncated:   # its own key: never served to a caller that refuses cut-off text
            request["accept_truncated"] = True
        key = Cache.key(request)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage["cache_hits"] += 1
                return list(hit["choices"])
        shared = self._inflight.get(key)
        if shared is not None:  # an identical request is already on its way: share its answer
            self.usage["cache_hits"] += 1
            return list(await asyncio.shield(shared))
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            choices, reasons, usage = await self._call(messages, n, temperature, max_tokens,
                                                       seed, params, allow_truncated)
            if self.cache is not None:
                self.cache.put(key, {"choices": choices, "finish_reasons": reasons,
                                     "usage": usage, "model": self.cfg.model,
                                     "created": time.time()})
            fut.set_result(choices)
            return list(choices)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else TeacherError("cancelled"))
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]

    async def model_card(self) -> Optional[dict]:
        """This model's entry in `GET {base_url}/models` (e.g. {"id", "max_model_len", ...});
        None when the endpoint does not say (unreachable, no list, model not listed). A 401,
        403 or 404 raises `TeacherRefused`."""
        try:
            async with asyncio.timeout(min(self.cfg.timeout_s, 10.0)):
                raw = await self._client.get("/models", cast_to=httpx.Response)
                data = json.loads(await raw.aread())
        except openai.APIStatusError as e:
            if e.status_code in REFUSED:
                raise self._refused(e) from None
            return None
        except Exception:   # noqa: BLE001 - unreachable or not a list: nothing is known
            return None
        models = data.get("data") if isinstance(data, dict) else None
        return next((m for m in models or [] if isinstance(m, dict)
                     and m.get("id") == self.cfg.model), None)

    async def aclose(self) -> None:
        await self._client.close()
        await self._http.aclose()

    async def __aenter__(self) -> "Teacher":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        jitter = self._rng.uniform(0.0, min(self.cfg.backoff_max_s,
                                            self.cfg.backoff_base_s * (2.0 ** attempt)))
        return jitter if retry_after is None else max(retry_after, jitter)

    async def _call(self, messages, n, temperature, max_tokens, seed, params, allow_truncated):
        body: dict[str, Any] = dict(model=self.cfg.model, messages=messages, n=n,
                                    temperature=temperature)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if seed is not None:
            body["seed"] = seed
        params = dict(params)
        headers = params.pop("extra_headers", None) or {}
        body.update(params.pop("extra_body", None) or {})
        body.update(params)
        options: dict[str, Any] = {"headers": headers} if headers else {}
        estimate = _text_len(messages) / 4.0 + n * (max_tokens or 0)
        last = "no attempt made"
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.usage["retries"] += 1
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                await self._tpm.acquire(estimate)
            try:
                async with self._sem:
                    self.usage["requests"] += 1
                    async with asyncio.timeout(self.cfg.timeout_s):
                        # The documented `post` (the SDK's own request path, status errors and
                        # all) with the body as given: the typed `create` re-walks every message
                        # through its TypedDict transform and builds pydantic models, which
                        # costs more CPU per call than the whole HTTP exchange.
                        raw = await self._client.post("/chat/completions", body=body,
                                                      cast_to=httpx.Response, options=options)
                        data = json.loads(await raw.aread())
                choices, reasons, usage = self._validate(data, n, allow_truncated)
            except _Retryable as e:
                last, retry_after = str(e), e.retry_after
                if e.usage is not None:
                    self._account(e.usage, estimate)
            except Exception as e:
                if self._tpm is not None:
                    self._tpm.credit(estimate)
                retry_after = None
                last = self._classify(e)  # raises TeacherError when not retryable
                if isinstance(e, openai.APIStatusError) and e.status_code in (429, 503):
                    retry_after = parse_retry_after(e.response.headers)
            else:
                self._account(usage, estimate)
                return choices, reasons, usage
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        self.usage["failures"] += 1
        raise TeacherError(_one_line(f"teacher request failed after {self.cfg.max_retries + 1} "
                                     f"attempts; last error: {last}"), _kind(last))

    def _classify(self, e: Exception) -> str:
        """One-line description of a retryable error; raises TeacherError for the others."""
        if isinstance(e, openai.APIStatusError):
            code = e.status_code
            why = f"HTTP {code}: {_status_message(e)}"
            if code in (408, 429) or code >= 500:
                return why
            self.usage["failures"] += 1
            if code in REFUSED or e.code == "model_not_found":
                raise self._refused(e) from None
            raise TeacherError(_one_line(f"teacher request rejected (not retried): {why}"),
                               f"HTTP {code}" + (f" {e.code}" if e.code else "")) from None
        if isinstance(e, (TimeoutError, openai.APITimeoutError)):
            return f"timeout: no answer within {self.cfg.timeout_s:g}s"
        if isinstance(e, (openai.APIConnectionError, httpx.TransportError, ConnectionError)):
            cause = e.__cause__ or e
            detail = _one_line(cause, 150)
            return f"connection error: {type(cause).__name__}" + (f": {detail}" if detail else "")
        if isinstance(e, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError,
                          AttributeError, TypeError, KeyError)):
            return f"malformed response: {type(e).__name__}: {_one_line(e, 150)}"
        self.usage["failures"] += 1
        raise TeacherError(_one_line(f"teacher request failed (not retried): "
                                     f"{type(e).__name__}: {e}"), type(e).__name__) from None

    def _refused(self, e: openai.APIStatusError) -> TeacherRefused:
        """The one-line error for a refusal: the endpoint, the model, the status and code."""
        code = f"HTTP {e.status_code}" + (f" {e.code}" if e.code else "")
        return TeacherRefused(_one_line(f"teacher {self.cfg.base_url} refused model "
                                        f"{self.cfg.model!r}: {code}: {_status_message(e)}"),
                              code)

    @staticmethod
    def _validate(data: Any, n: int,
                  allow_truncated: bool = False) -> tuple[list[str], list, dict]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            raise _Retryable(f"malformed response: no choices list in {type(data).__name__}")
        if len(choices) < n:
            raise _Retryable(f"truncated response: {len(choices)} of {n} choices")

        def index(c):
            i = c.get("index") if isinstance(c, dict) else None
            return i if isinstance(i, int) else 0

        u = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        usage = dict(prompt_tokens=int(u.get("prompt_tokens") or 0),
                     completion_tokens=int(u.get("completion_tokens") or 0))
        out: list[str] = []
        reasons: list = []
        for i, c in enumerate(sorted(choices, key=index)[:n]):
            msg = c.get("message") if isinstance(c, dict) else None
            content = msg.get("content") if isinstance(msg, dict) else None
            if not isinstance(content, str) or not content:
                raise _Retryable(f"truncated response: choice {i} has no content")
            reason = c.get("finish_reason")
            if reason in TRUNCATED and not allow_truncated:
                raise _Retryable(f"finish_reason {reason}: choice {i} of {n} was cut off "
                                 f"after {len(content)} characters", usage=usage)
            out.append(content)
            reasons.append(reason)
        return out, reasons, usage

    def _account(self, usage: dict, estimate: float) -> None:
        p, c = usage["prompt_tokens"], usage["completion_tokens"]
        self.usage["prompt_tokens"] += p
        self.usage["completion_tokens"] += c
        self.usage["cost"] += (p * self.cfg.price_prompt_per_1k
                               + c * self.cfg.price_completion_per_1k) / 1000.0
        if self._tpm is not None and (p or c):
            self._tpm.credit(estimate - (p + c))
