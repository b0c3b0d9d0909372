"""`phijax serve RUN_DIR`: an OpenAI-compatible HTTP API over the batched JAX sampler.

Endpoints (OpenAI wire format, JSON in and out, no streaming):
  GET  /v1/models               the one model, named after the run directory (or --model-name)
  GET  /v1/models/{id}
  POST /v1/completions          prompt: a string, a list of strings, token ids, or lists of ids
  POST /v1/chat/completions     messages rendered with phi-4's chat template
  GET  /health

Handler threads validate a request completely, then put it on a queue. One worker thread owns
the sampler: it takes everything waiting (up to `max_batch` samples, waiting `batch_wait`
seconds after the first arrival for more) and makes one `Sampler.generate` call for the whole
batch, so concurrent requests share one batched sampling pass. `Server.stats` counts the calls.

Beyond OpenAI's parameters, `top_k` (0 = off) is accepted as an extension. Known parameters this
server cannot honour (echo, suffix, logit_bias, penalties, tools, top log-probs, streaming...)
are refused with a 400 when set to anything but their neutral value; unknown ones are ignored.
`usage.completion_tokens` counts every token the sampler generated, stop tokens included.
"""
from __future__ import annotations

import codecs
import json
import logging
import math
import queue
import random
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from phijax.data.tokenizer import IM_SEP, IM_START, render_chat

log = logging.getLogger("phijax.serve")

MAX_N = 128                   # choices per prompt
MAX_PROMPTS = 256             # prompts in one completions request
MAX_STOP = 4                  # stop strings
MAX_LOGPROBS = 5              # completions `logprobs`
MAX_BODY = 32 << 20           # request body bytes
COMPLETIONS_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = (message, status, param,
                                                                        code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Parameter validation


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _bad_type(key: str, expected: str, value) -> APIError:
    return APIError(f"Invalid type for '{key}': expected {expected}, but got "
                    f"{_type_name(value)} instead.", param=key, code="invalid_type")


def _bad_value(key: str, message: str) -> APIError:
    return APIError(f"Invalid '{key}': {message}", param=key, code="invalid_value")


def _integer(body: dict, key: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(key, "an integer", value)
    if lo is not None and value < lo:
        raise _bad_value(key, f"integer below minimum value. Expected a value >= {lo}, but got "
                              f"{value} instead.")
    if hi is not None and value > hi:
        raise _bad_value(key, f"integer above maximum value. Expected a value <= {hi}, but got "
                              f"{value} instead.")
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_type(key, "a decimal", value)
    value = float(value)
    if not (lo < value if lo_open else lo <= value):
        raise _bad_value(key, f"decimal below minimum value. Expected a value "
                              f"{'>' if lo_open else '>='} {lo:g}, but got {value:g} instead.")
    if not value <= hi:
        raise _bad_value(key, f"decimal above maximum value. Expected a value <= {hi:g}, but got "
                              f"{value:g} instead.")
    return value


def _boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad_type(key, "a boolean", value)
    return value


def _unsupported(key: str, what: str = "") -> APIError:
    return APIError(f"'{key}' is not supported by this server{what}.", param=key,
                    code="unsupported_parameter")


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """Refuse known parameters set to values this server cannot honour."""
    if _boolean(body, "stream", False):
        raise _unsupported("stream", ": streaming is not supported, send stream=false")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise _unsupported(key, " (only 0)")
    if body.get("logit_bias"):
        raise _unsupported("logit_bias")
    if chat:
        for key in ("tools", "functions", "audio", "prediction"):
            if body.get(key):
                raise _unsupported(key)
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise _unsupported("tool_choice")
        if body.get("function_call") not in (None, "none", "auto"):
            raise _unsupported("function_call")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise _unsupported("response_format", " (only {\"type\": \"text\"})")
        if body.get("modalities") not in (None, ["text"]):
            raise _unsupported("modalities", " (only [\"text\"])")
    else:
        if _boolean(body, "echo", False):
            raise _unsupported("echo")
        if body.get("suffix"):
            raise _unsupported("suffix")
        best_of = _integer(body, "best_of", None, 1, MAX_N)
        if best_of is not None and best_of != _integer(body, "n", 1):
            raise _unsupported("best_of", " (other than n)")


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad_type("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP:
        raise _bad_value("stop", f"array too long. Expected an array with maximum length "
                                 f"{MAX_STOP}, but got an array with length {len(stop)} instead.")
    if any(s == "" for s in stop):
        raise _bad_value("stop", "stop strings must not be empty.")
    return stop


# ---------------------------------------------------------------------------------------------
# The server and its batching worker


@dataclass
class _Job:
    requests: list          # list[phijax.sampling.Request]
    future: Future

    @property
    def rows(self) -> int:
        return sum(r.n for r in self.requests)


class Server(ThreadingHTTPServer):
    """The HTTP server plus the worker thread that batches generation. Run `serve_forever()`
    (in any thread), stop with `shutdown()`, then `server_close()` (also stops the worker)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sampler, tokenizer, model_name: str, host: str = "127.0.0.1",
                 port: int = 8000, max_batch: int = 64, batch_wait: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: must be at least 1")
        self.sampler, self.tokenizer, self.model_name = sampler, tokenizer, model_name
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.created = int(time.time())
        sp = tokenizer.sp
        self.vocab_size = sp.get_piece_size()
        self.token_bytes = [_piece_bytes(sp, i) for i in range(self.vocab_size)]
        self.eos_id = tokenizer.eos_id
        self.stats = {"requests": 0, "generate_calls": 0, "batched_jobs": 0, "samples": 0,
                      "largest_batch": 0, "errors": 0}
        self._stats_lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self._worker = threading.Thread(target=self._work, name="phijax-serve-worker",
                                        daemon=True)
        self._worker.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    def count(self, key: str, by: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += by

    def submit(self, requests: list) -> list:
        """Queue sampler requests and block until the worker has generated them."""
        if self._closed:
            raise APIError("the server is shutting down", 503, type="server_error")
        job = _Job(requests, Future())
        self._queue.put(job)
        return job.future.result()

    def server_close(self) -> None:
        super().server_close()
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join(timeout=60)

    # The worker: the only thread that calls the sampler.

    def _work(self) -> None:
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                break
            jobs, rows, stop = [job], job.rows, False
            deadline = time.monotonic() + self.batch_wait
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if rows + nxt.rows > self.max_batch:
                    carry = nxt
                    break
                jobs.append(nxt)
                rows += nxt.rows
            self._generate(jobs)
            if stop:
                break
        # Anything still queued is refused.
        leftovers = [carry] if carry is not None else []
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftovers:
            if job is not None:
                job.future.set_exception(APIError("the server is shutting down", 503,
                                                  type="server_error"))

    def _generate(self, jobs: list[_Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        try:
            results = self.sampler.generate(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"the sampler answered {len(results)} of {len(requests)} "
                                   f"requests")
        except Exception as e:  # noqa: BLE001 - answered as a 500, the worker keeps going
            with self._stats_lock:
                self.stats["generate_calls"] += 1
            if len(jobs) > 1:  # find the culprit: the others still get their answers
                log.warning("a batch of %d requests failed (%s); generating them one by one",
                            len(jobs), e)
                for job in jobs:
                    self._generate([job])
                return
            log.exception("generation failed")
            jobs[0].future.set_exception(e)
            return
        with self._stats_lock:
            self.stats["generate_calls"] += 1
            self.stats["batched_jobs"] += len(jobs)
            self.stats["samples"] += sum(job.rows for job in jobs)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        i = 0
        for job in jobs:
            job.future.set_result(results[i:i + len(job.requests)])
            i += len(job.requests)

    # Request handling (called from handler threads).

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise APIError("you must provide a model parameter", param="model",
                           code="missing_required_parameter")
        if not isinstance(model, str):
            raise _bad_type("model", "a string", model)
        if model != self.model_name:
            raise APIError(f"The model `{model}` does not exist. This server serves "
                           f"`{self.model_name}`.", 404, param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "phijax"}

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode([text])[0]) if text else []

    def _prompts(self, prompt) -> list[list[int]]:
        """`prompt` -> token id lists: a string, strings, token ids or lists of token ids."""
        def ids(seq, key):
            bad = [t for t in seq if isinstance(t, bool) or not isinstance(t, int)
                   or not 0 <= t < self.vocab_size]
            if bad:
                raise _bad_value(key, f"token ids must be integers in [0, {self.vocab_size}), "
                                      f"got {bad[0]!r}.")
            return list(seq)

        if prompt is None:
            raise APIError("you must provide a prompt parameter", param="prompt",
                           code="missing_required_parameter")
        if isinstance(prompt, str):
            prompts = [self._encode(prompt)]
        elif isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                prompts = [self._encode(p) for p in prompt]
            elif all(isinstance(p, int) for p in prompt):
                prompts = [ids(prompt, "prompt")]
            elif all(isinstance(p, list) and p for p in prompt):
                prompts = [ids(p, "prompt") for p in prompt]
            else:
                raise _bad_type("prompt", "a string, an array of strings, an array of token ids "
                                          "or an array of token id arrays", prompt)
        else:
            raise _bad_type("prompt", "a string, an array of strings, an array of token ids or "
                                      "an array of token id arrays", prompt)
        if len(prompts) > MAX_PROMPTS:
            raise _bad_value("prompt", f"at most {MAX_PROMPTS} prompts per request, got "
                                       f"{len(prompts)}.")
        # An empty prompt starts a new document, as after <|endoftext|> in training.
        return [p if p else [self.eos_id] for p in prompts]

    def _chat_prompt(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            if messages is None:
                raise APIError("you must provide a messages parameter", param="messages",
                               code="missing_required_parameter")
            raise _bad_value("messages", "expected a non-empty array of messages.")
        rendered = []
        for i, m in enumerate(messages):
            key = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _bad_type(key, "an object", m)
            role = CHAT_ROLES.get(m.get("role"))
            if role is None:
                raise _bad_value(f"{key}.role", f"expected one of {', '.join(CHAT_ROLES)}, got "
                                                f"{m.get('role')!r}.")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):
                        raise _bad_value(f"{key}.content", "only text content parts are "
                                                           "supported.")
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise _bad_type(f"{key}.content", "a string or an array of text parts", content)
            rendered.append({"role": role, "content": content})
        text = render_chat(rendered)[0] + f"{IM_START}assistant{IM_SEP}"
        return self._encode(text)

    def _check_length(self, prompt: list[int], max_tokens: int, param: str) -> None:
        limit = self.sampler.max_len
        if len(prompt) + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, "
                           f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in "
                           f"the {param}, {max_tokens} for the completion). Please reduce the "
                           f"{param} or the completion length.", param=param,
                           code="context_length_exceeded")

    def _stop_token_ids(self, stops: list[str]) -> tuple[int, ...]:
        """Tokens whose text is exactly a stop string: the sampler can stop on them early."""
        out = []
        for s in stops:
            ids = self._encode(s)
            if len(ids) == 1 and self.token_bytes[ids[0]] == s.encode():
                out.append(ids[0])
        return tuple(out)

    def _sampling(self, body: dict, prompts: list[list[int]], default_max_tokens: int | None,
                  max_tokens_keys: tuple[str, ...], param: str, stop_ids: tuple[int, ...]):
        from phijax.sampling import Request

        n = _integer(body, "n", 1, 1, MAX_N)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        top_k = _integer(body, "top_k", 0, -1)
        top_k = max(top_k, 0)  # -1 = off, as in vLLM
        seed = _integer(body, "seed", None, -(1 << 63), (1 << 63) - 1)
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 31)
        seed %= 1 << 31
        stops = _stop_strings(body)
        max_tokens = None
        for key in max_tokens_keys:
            max_tokens = _integer(body, key, None, 1)
            if max_tokens is not None:
                break
        if len(prompts) * n > MAX_N * 8:
            raise _bad_value("n", f"n times the number of prompts is at most {MAX_N * 8}.")
        stop_ids = tuple(dict.fromkeys(stop_ids + self._stop_token_ids(stops)))
        requests = []
        for prompt in prompts:
            new = max_tokens if max_tokens is not None else default_max_tokens
            if new is None:  # chat: until the context is full
                new = max(self.sampler.max_len - len(prompt), 1)
            self._check_length(prompt, new, param)
            requests.append(Request(prompt=prompt, n=n, max_new_tokens=new,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    stop_ids=stop_ids, seed=seed))
        return requests, stops

    def _finish(self, sample, special_ids: tuple[int, ...], stops: list[str]):
        """A sample -> (kept tokens, their log-probs, their char offsets, text, finish reason).

        A final special stop token (<|endoftext|>, <|im_end|>) is not part of the text; the
        text is cut before the first stop string, keeping the tokens that start before it."""
        tokens, logprobs, reason = list(sample.tokens), list(sample.logprobs), sample.finish_reason
        if reason == "stop" and tokens and tokens[-1] in special_ids:
            tokens, logprobs = tokens[:-1], logprobs[:-1]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces, offsets, size = [], [], 0
        for t in tokens:
            offsets.append(size)
            piece = decoder.decode(self.token_bytes[t] if 0 <= t < self.vocab_size else b"")
            pieces.append(piece)
            size += len(piece)
        pieces.append(decoder.decode(b"", final=True))
        text = "".join(pieces)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            cut = min(cuts)
            text, reason = text[:cut], "stop"
            keep = sum(1 for o in offsets if o < cut)
            tokens, logprobs, offsets = tokens[:keep], logprobs[:keep], offsets[:keep]
        return tokens, logprobs, offsets, text, reason

    def _token_text(self, t: int) -> str:
        raw = self.token_bytes[t] if 0 <= t < self.vocab_size else b""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def completions(self, body: dict) -> dict:
        self.check_model(body)
        _refuse_unsupported(body, chat=False)
        prompts = self._prompts(body.get("prompt"))
        logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        requests, stops = self._sampling(body, prompts, COMPLETIONS_MAX_TOKENS, ("max_tokens",),
                                         "prompt", (self.eos_id,))
        results = self.submit(requests)
        choices, generated = [], 0
        for prompt, samples in zip(prompts, results):
            prompt_chars = len(self.tokenizer.decode(prompt)) if logprobs is not None else 0
            for sample in samples:
                generated += len(sample.tokens)
                tokens, lps, offsets, text, reason = self._finish(sample, (self.eos_id,), stops)
                choice = {"text": text, "index": len(choices), "logprobs": None,
                          "finish_reason": reason}
                if logprobs is not None:
                    choice["logprobs"] = {
                        "tokens": [self._token_text(t) for t in tokens],
                        "token_logprobs": [_finite(lp) for lp in lps],
                        "top_logprobs": None,
                        "text_offset": [prompt_chars + o for o in offsets]}
                choices.append(choice)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": None, "choices": choices,
                "usage": _usage(sum(map(len, prompts)), generated)}

    def chat_completions(self, body: dict) -> dict:
        self.check_model(body)
        _refuse_unsupported(body, chat=True)
        prompt = self._chat_prompt(body.get("messages"))
        logprobs = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", None, 0, 20)
        if top and not logprobs:
            raise _bad_value("top_logprobs", "requires logprobs to be true.")
        if top:
            raise _unsupported("top_logprobs", " (only 0)")
        special = self.tokenizer.stop_ids
        requests, stops = self._sampling(body, [prompt], None,
                                         ("max_completion_tokens", "max_tokens"), "messages",
                                         special)
        (samples,) = self.submit(requests)
        choices, generated = [], 0
        for sample in samples:
            generated += len(sample.tokens)
            tokens, lps, _, text, reason = self._finish(sample, special, stops)
            choice = {"index": len(choices),
                      "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": reason}
            if logprobs:
                choice["logprobs"] = {"content": [
                    {"token": self._token_text(t), "logprob": _finite(lp),
                     "bytes": list(self.token_bytes[t]) if 0 <= t < self.vocab_size else [],
                     "top_logprobs": []} for t, lp in zip(tokens, lps)], "refusal": None}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": None, "choices": choices,
                "usage": _usage(len(prompt), generated)}


def _piece_bytes(sp, i: int) -> bytes:
    """The bytes token `i` decodes to (sentencepiece's decode, one token at a time)."""
    if sp.is_byte(i):
        return bytes([int(sp.id_to_piece(i)[1:-1], 16)])
    if sp.is_control(i) or sp.is_unused(i):
        return b""
    if sp.is_unknown(i):
        return sp.decode([i]).encode()
    return sp.id_to_piece(i).replace("\u2581", " ").encode()


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else -9999.0


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: every response has a Content-Length
    server_version = "phijax"
    timeout = 300                   # idle keep-alive connections are closed after this
    server: Server

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        start = time.perf_counter()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        status = 500
        try:
            body = self._read_body()  # always, so a keep-alive connection stays in step
            status, payload = 200, self._route(method, path, body)
        except APIError as e:
            status, payload = e.status, e.body()
        except Exception as e:  # noqa: BLE001 - the server keeps serving
            log.exception("%s %s failed", method, path)
            self.server.count("errors")
            status, payload = 500, APIError(f"The server had an error while processing your "
                                            f"request: {type(e).__name__}: {e}", 500,
                                            type="server_error").body()
        self._send(status, payload)
        log.info("%s %s %s %d %.0fms", self.client_address[0], method, self.path, status,
                 1000 * (time.perf_counter() - start))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError("chunked request bodies are not supported; send a Content-Length",
                           411)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise APIError("invalid Content-Length header", 400)
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise APIError(f"the request body is over {MAX_BODY} bytes", 413)
        return self.rfile.read(length)

    def _route(self, method: str, path: str, raw: bytes) -> dict:
        server = self.server
        routes = {"/v1/completions": ("POST", server.completions),
                  "/v1/chat/completions": ("POST", server.chat_completions)}
        if path == "/health" and method == "GET":
            return {"status": "ok"}
        if path == "/v1/models" and method == "GET":
            return {"object": "list", "data": [server.model_card()]}
        if path.startswith("/v1/models/") and method == "GET":
            name = path[len("/v1/models/"):]
            if name != server.model_name:
                raise APIError(f"The model `{name}` does not exist.", 404, param="model",
                               code="model_not_found")
            return server.model_card()
        if path not in routes:
            raise APIError(f"Invalid URL ({method} {path})", 404)
        if method != routes[path][0]:
            raise APIError(f"Method {method} is not allowed for {path}", 405)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"We could not parse the JSON body of your request. ({e})")
        if not isinstance(body, dict):
            raise APIError("The request body must be a JSON object.")
        server.count("requests")
        return routes[path][1](body)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", uuid.uuid4().hex)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# ---------------------------------------------------------------------------------------------
# Entry points


def make_server(run_dir, host: str = "127.0.0.1", port: int = 8000,
                model_name: str | None = None, max_batch: int = 64,
                batch_wait: float = 0.005) -> Server:
    """Load the run's sampler and bind a server (port 0 picks a free port); call
    `.serve_forever()` on it, in a background thread if need be."""
    from phijax.sampling import load_sampler

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    sampler, tokenizer = load_sampler(run_dir)
    name = model_name or run_dir.resolve().name
    server = Server(sampler, tokenizer, name, host, port, max_batch, batch_wait)
    log.info("serving %s on %s (context %d tokens, batches of up to %d samples)", name,
             server.url, sampler.max_len, max_batch)
    return server


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | None = None) -> int:
    """`phijax serve`: serve the run's latest checkpoint until interrupted."""
    server = make_server(run_dir, host, port, model_name)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("interrupted, shutting down")
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
