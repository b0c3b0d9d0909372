"""The HTTP side of `phijax serve`: routing, the two generation endpoints, token text.

Endpoints (OpenAI wire format, JSON in and out, no streaming):
  GET  /v1/models               the one model, named after the run directory (or --model-name),
                                with its context length as `max_model_len`
  GET  /v1/models/{id}
  POST /v1/completions          prompt: a string, a list of strings, token ids, or lists of ids
  POST /v1/chat/completions     messages rendered with phi-4's chat template
  GET  /health

Handler threads (the standard library's ThreadingHTTPServer) validate a request completely,
then hand its sampler requests to the `Batcher`, which shares one sampling call among
concurrent requests. Beyond OpenAI's parameters, `top_k` (0 = off) is accepted as an extension;
unknown parameters are ignored. `usage.completion_tokens` counts every token the sampler
generated, stop tokens included.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import logging
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from phijax.data.tokenizer import IM_SEP, IM_START, render_chat
from phijax.errors import ConfigError
from phijax.serve import schemas
from phijax.serve.batcher import Batcher
from phijax.serve.schemas import MAX_PROMPTS, APIError, bad_type, bad_value, finite, usage

log = logging.getLogger(__name__)

MAX_BODY = 32 << 20           # request body bytes
PROMPT_TYPES = ("a string, an array of strings, an array of token ids or an array of token id "
                "arrays")


# ---------------------------------------------------------------------------------------------
# Tokens as text and bytes


class Vocab:
    """The tokenizer seen from the API: text -> ids, and each id's bytes and display text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_id
        self.size = tokenizer.vocab_size
        self.token_bytes = [tokenizer.token_bytes(i) for i in range(self.size)]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode([text])[0]) if text else []

    def bytes(self, t: int) -> bytes:
        return self.token_bytes[t] if 0 <= t < self.size else b""

    def text(self, t: int) -> str:
        """A token's text as OpenAI shows it: `bytes:\\xNN...` where it is not valid UTF-8."""
        raw = self.bytes(t)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def stop_token_ids(self, stops: list[str]) -> tuple[int, ...]:
        """Tokens whose text is exactly a stop string: the sampler can stop on them early."""
        out = []
        for s in stops:
            ids = self.encode(s)
            if len(ids) == 1 and self.token_bytes[ids[0]] == s.encode():
                out.append(ids[0])
        return tuple(out)

    def ids(self, seq: list, key: str) -> list[int]:
        bad = [t for t in seq if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.size]
        if bad:
            raise bad_value(key, f"token ids must be integers in [0, {self.size}), got "
                                 f"{bad[0]!r}.")
        return list(seq)

    def prompts(self, prompt) -> list[list[int]]:
        """`prompt` -> token id lists: a string, strings, token ids or lists of token ids."""
        if prompt is None:
            raise schemas.missing("prompt")
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [self.ids(prompt, "prompt")]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p
                                                         for p in prompt):
            prompts = [self.ids(p, "prompt") for p in prompt]
        else:
            raise bad_type("prompt", PROMPT_TYPES, prompt)
        if len(prompts) > MAX_PROMPTS:
            raise bad_value("prompt", f"at most {MAX_PROMPTS} prompts per request, got "
                                      f"{len(prompts)}.")
        # An empty prompt starts a new document, as after <|endoftext|> in training.
        return [p if p else [self.eos_id] for p in prompts]

    def finish(self, sample, special_ids: tuple[int, ...], stops: list[str]):
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
            pieces.append(decoder.decode(self.bytes(t)))
            size += len(pieces[-1])
        pieces.append(decoder.decode(b"", final=True))
        text = "".join(pieces)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            cut = min(cuts)
            text, reason = text[:cut], "stop"
            keep = sum(1 for o in offsets if o < cut)
            tokens, logprobs, offsets = tokens[:keep], logprobs[:keep], offsets[:keep]
        return tokens, logprobs, offsets, text, reason


# ---------------------------------------------------------------------------------------------
# The server


class Server(ThreadingHTTPServer):
    """The HTTP server plus the `Batcher` that generates. Run `serve_forever()` (in any thread),
    stop with `shutdown()`, then `server_close()` (also stops the batcher's worker)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sampler, tokenizer, model_name: str, host: str = "127.0.0.1",
                 port: int = 8000, max_batch: int = 64, batch_wait: float = 0.005):
        self.sampler, self.tokenizer, self.model_name = sampler, tokenizer, model_name
        self.vocab = Vocab(tokenizer)
        self.created = int(time.time())
        self._counts = {"requests": 0, "errors": 0}
        self._counts_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}  # open, with handlers
        self.batcher = Batcher(sampler, max_batch, batch_wait)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), _Handler)
        except BaseException:
            self.batcher.close()
            raise

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    @property
    def stats(self) -> dict:
        """A snapshot: requests, errors (500s), and the batcher's generate_calls, batched_jobs,
        samples and largest_batch."""
        with self._counts_lock:
            return {**self._counts, **self.batcher.stats()}

    def count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1

    def process_request_thread(self, request, client_address) -> None:
        with self._counts_lock:
            self._connections[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._counts_lock:
                self._connections.pop(request, None)

    def server_close(self) -> None:
        """Stop listening, stop the batcher (jobs already queued are generated, later ones get
        a 503), then end the open keep-alive connections and wait for their handler threads:
        none outlives the server (one freeing the sampler at interpreter exit aborts it)."""
        super().server_close()
        self.batcher.close()
        with self._counts_lock:
            connections = dict(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # an idle handler reads EOF and ends
        deadline = time.monotonic() + 30
        for thread in connections.values():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def model_card(self) -> dict:
        """The model as /v1/models lists it, with its context length in tokens under vLLM's
        name, `max_model_len` (clients check max_tokens against it before sending)."""
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "phijax", "max_model_len": self.sampler.max_len}

    # The generation endpoints (called from handler threads).

    def _requests(self, body: dict, prompts: list[list[int]], default_max_tokens: int | None,
                  max_tokens_keys: tuple[str, ...], param: str, stop_ids: tuple[int, ...]):
        """(sampler requests, stop strings) for `prompts`; a context overflow is a 400 naming
        `param`. With no max tokens given, chat generates until the context is full."""
        from phijax.sampling import Request

        s = schemas.sampling(body, max_tokens_keys, len(prompts))
        stop_ids = tuple(dict.fromkeys(stop_ids + self.vocab.stop_token_ids(s.stops)))
        limit = self.sampler.max_len
        requests = []
        for prompt in prompts:
            new = s.max_tokens if s.max_tokens is not None else default_max_tokens
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
                                    stop_ids=stop_ids, seed=s.seed))
        return requests, s.stops

    def _response(self, kind: str, choices: list, prompt_tokens: int, generated: int) -> dict:
        prefix, obj = {"chat": ("chatcmpl", "chat.completion"),
                       "text": ("cmpl", "text_completion")}[kind]
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj,
                "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": None, "choices": choices,
                "usage": usage(prompt_tokens, generated)}

    def completions(self, body: dict) -> dict:
        schemas.check_model(body, self.model_name)
        schemas.refuse_unsupported(body, chat=False)
        prompts = self.vocab.prompts(body.get("prompt"))
        logprobs = schemas.integer(body, "logprobs", None, 0, schemas.MAX_LOGPROBS)
        eos = (self.vocab.eos_id,)
        requests, stops = self._requests(body, prompts, schemas.COMPLETIONS_MAX_TOKENS,
                                         ("max_tokens",), "prompt", eos)
        results = self.batcher.submit(requests)
        choices, generated = [], 0
        for prompt, samples in zip(prompts, results):
            prompt_chars = len(self.tokenizer.decode(prompt)) if logprobs is not None else 0
            for sample in samples:
                generated += len(sample.tokens)
                tokens, lps, offsets, text, reason = self.vocab.finish(sample, eos, stops)
                choice = {"text": text, "index": len(choices), "logprobs": None,
                          "finish_reason": reason}
                if logprobs is not None:
                    choice["logprobs"] = {
                        "tokens": [self.vocab.text(t) for t in tokens],
                        "token_logprobs": [finite(lp) for lp in lps],
                        "top_logprobs": None,
                        "text_offset": [prompt_chars + o for o in offsets]}
                choices.append(choice)
        return self._response("text", choices, sum(map(len, prompts)), generated)

    def chat_completions(self, body: dict) -> dict:
        schemas.check_model(body, self.model_name)
        schemas.refuse_unsupported(body, chat=True)
        messages = schemas.chat_messages(body.get("messages"))
        prompt = self.vocab.encode(render_chat(messages)[0] + f"{IM_START}assistant{IM_SEP}")
        logprobs = schemas.chat_top_logprobs(body)
        special = self.tokenizer.stop_ids
        requests, stops = self._requests(body, [prompt], None,
                                         ("max_completion_tokens", "max_tokens"), "messages",
                                         special)
        (samples,) = self.batcher.submit(requests)
        choices, generated = [], 0
        for sample in samples:
            generated += len(sample.tokens)
            tokens, lps, _, text, reason = self.vocab.finish(sample, special, stops)
            choice = {"index": len(choices),
                      "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": reason}
            if logprobs:
                choice["logprobs"] = {"content": [
                    {"token": self.vocab.text(t), "logprob": finite(lp),
                     "bytes": list(self.vocab.bytes(t)), "top_logprobs": []}
                    for t, lp in zip(tokens, lps)], "refusal": None}
            choices.append(choice)
        return self._response("chat", choices, len(prompt), generated)


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
        routes = {"/v1/completions": server.completions,
                  "/v1/chat/completions": server.chat_completions}
        if method == "GET" and path == "/health":
            return {"status": "ok"}
        if method == "GET" and path == "/v1/models":
            return {"object": "list", "data": [server.model_card()]}
        if method == "GET" and path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name != server.model_name:
                raise APIError(f"The model `{name}` does not exist.", 404, param="model",
                               code="model_not_found")
            return server.model_card()
        if path not in routes:
            raise APIError(f"Invalid URL ({method} {path})", 404)
        if method != "POST":
            raise APIError(f"Method {method} is not allowed for {path}", 405)
        body = _json_object(raw)
        server.count("requests")
        return routes[path](body)

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


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"We could not parse the JSON body of your request. ({e})")
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    return body


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
        raise ConfigError(f"run directory {run_dir} does not exist")
    sampler, tokenizer = load_sampler(run_dir)
    name = model_name or run_dir.resolve().name
    server = Server(sampler, tokenizer, name, host, port, max_batch, batch_wait)
    log.info("serving %s on %s (context %d tokens, batches of up to %d samples)", name,
             server.url, sampler.max_len, max_batch)
    return server


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | None = None) -> int:
    """`phijax serve`: serve the run's latest checkpoint until interrupted (Ctrl-C or
    SIGTERM)."""
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
