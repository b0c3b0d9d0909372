"""A real OpenAI-compatible chat server on loopback, with injectable faults, for tests/benchmarks.

`start_server(delay_s=0, fault_rate=0, seed=0)` runs a stdlib `ThreadingHTTPServer` (daemon
threads, HTTP/1.1 keep-alive, a deep accept queue) on 127.0.0.1 with port 0, in a background
thread, and returns a `ServerHandle` with `.url` (ending in /v1), `.stats` and `.stop()`.

POST /v1/chat/completions answers deterministically: every one of the n choices has content
"echo: " + the last user message, with usage counts (len/4 tokens). Each request first sleeps
`delay_s`; then, with probability `fault_rate` (seeded RNG) a fault drawn uniformly from `faults`
is injected instead of the answer:

  "429"        429 with `Retry-After: <retry_after_s>`
  "500"        500 with a JSON error body
  "timeout"    sleep `hang_s` (past the client timeout), then drop the connection
  "reset"      close the socket abruptly (RST, no response)
  "malformed"  200 with a body that is not valid JSON
  "empty"      200 with `choices: []`
  "truncated"  200 with fewer than n choices, or (n == 1) a choice whose content is null
  "length"     200 with every answer short of its last character ("ANSWE"), finish_reason
               "length"
  "content_filter"  the same with finish_reason "content_filter"
  "400"        400 invalid_request_error (never drawn at random; use `script`)
  "403"        403 permission_denied (never drawn at random; use `script`)

`model`, when given, is the only model served: a request naming another gets OpenAI's 404
model_not_found. `api_key`, when given, is the only key accepted: any other Authorization gets
401 invalid_api_key (chat and model list alike). GET /v1/models lists the served model (`model`,
default "echo"), with `max_model_len` (vLLM's name for the context length) when that is given.

`responder(messages, n, i) -> str`, when given, replaces the echo: it is called (in the
server's handler thread) for each choice i of n with the request's messages and its string is
that choice's content, so tests can script answers per prompt (an exception answers 500).

`script` is a list of fault names (or None for a normal answer) served, in order, to the first
requests, before the random faults apply. `stats` (thread-safe) counts requests, answers ("ok")
and faults by kind, and keeps the Authorization headers seen and each request's arrival time
(`time.monotonic()`, in arrival order), so tests check pacing by what the server saw.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import secrets
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "timeout", "reset", "malformed", "empty", "truncated", "length",
          "content_filter")
# For tests that inject "timeout" faults: a client timeout well above a normal answer on a loaded
# 2-core machine (at 0.25-0.3 s, many clients of the in-process server starved each other into
# timing out again and again, and requests failed), and the server's hang well above that.
CLIENT_TIMEOUT_S = 2.0
HANG_S = 4.0


def _error(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code}}).encode()


class ServerStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.ok = 0
        self.faults: collections.Counter = collections.Counter()
        self.auth_headers: list[str] = []
        self.times: list[float] = []
        self.model_lists = 0     # GET /v1/models answered

    def snapshot(self) -> dict:
        with self._lock:
            return dict(requests=self.requests, ok=self.ok, faults=dict(self.faults),
                        fault_total=sum(self.faults.values()),
                        auth_headers=sorted(set(self.auth_headers)), times=list(self.times),
                        model_lists=self.model_lists)

    def __repr__(self) -> str:
        s = self.snapshot()
        s.pop("auth_headers")
        s.pop("times")
        return f"ServerStats({s})"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # faults make noisy tracebacks: stay quiet
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms Nagle/delayed-ACK stalls
    server: "_Server"

    def log_message(self, *args):  # no per-request logging
        pass

    def _send(self, code: int, body: bytes, headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._headers_buffer.append(b"\r\n" + body)  # headers and body in one write
        self.flush_headers()

    def _drop(self, rst: bool):
        self.close_connection = True
        try:
            if rst:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _refusal(self, cfg: dict, model) -> tuple[int, bytes] | None:
        """The 401 for a wrong key or the 404 for a model not served, when configured."""
        if cfg["api_key"] is not None and \
                self.headers.get("Authorization") != f"Bearer {cfg['api_key']}":
            return 401, _error("Incorrect API key provided.", "invalid_request_error",
                               "invalid_api_key")
        if cfg["model"] is not None and model is not None and model != cfg["model"]:
            return 404, _error(f"The model `{model}` does not exist.", "invalid_request_error",
                               "model_not_found")
        return None

    def do_GET(self):
        cfg = self.server.cfg  # type: ignore[attr-defined]
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, _error("not found", "not_found"))
        refused = self._refusal(cfg, None)
        if refused is not None:
            return self._send(*refused)
        card = {"id": cfg["model"] or "echo", "object": "model", "created": 0,
                "owned_by": "test"}
        if cfg["max_model_len"] is not None:
            card["max_model_len"] = cfg["max_model_len"]
        with self.server.stats._lock:  # type: ignore[attr-defined]
            self.server.stats.model_lists += 1  # type: ignore[attr-defined]
        self._send(200, json.dumps({"object": "list", "data": [card]}).encode())

    def _draw_fault(self, cfg: dict, stats: ServerStats):
        """Count the request; the fault it gets (the script's next, or a random one) or None."""
        with stats._lock:
            stats.requests += 1
            stats.times.append(time.monotonic())
            auth = self.headers.get("Authorization")
            if auth is not None:
                stats.auth_headers.append(auth)
            if cfg["script"]:
                fault = cfg["script"].pop(0)
            elif cfg["fault_rate"] > 0 and cfg["rng"].random() < cfg["fault_rate"]:
                fault = cfg["rng"].choice(cfg["faults"])
            else:
                fault = None
            if fault is not None:
                stats.faults[fault] += 1
        return fault

    def _serve_fault(self, cfg: dict, fault) -> bool:
        """Answer with `fault` when it is an error or a broken connection; False otherwise."""
        errors = {"429": (429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                          {"Retry-After": f"{cfg['retry_after_s']:g}"}),
                  "500": (500, _error("internal error", "server_error"), None),
                  "400": (400, _error("invalid request", "invalid_request_error"), None),
                  "403": (403, _error("You are not allowed to use this model.",
                                      "permission_denied", "permission_denied"), None),
                  "malformed": (200, b'{"id": "x", "object": "chat.completion", '
                                     b'"choices": [{"ind', None)}
        if fault in errors:
            self._send(*errors[fault])
        elif fault == "timeout":
            time.sleep(cfg["hang_s"])
            self._drop(rst=False)
        elif fault == "reset":
            self._drop(rst=True)
        else:
            return False
        return True

    def _choices(self, cfg: dict, req: dict, n: int, fault) -> list | None:
        """The n choices (the echo or the responder's), as `fault` leaves them; None after
        answering a 500 for a responder that raised."""
        last = next((m.get("content") for m in reversed(req.get("messages") or [])
                     if m.get("role") == "user"), "")
        contents = ["echo: " + (last if isinstance(last, str) else json.dumps(last))] * n
        if cfg["responder"] is not None:
            try:
                contents = [cfg["responder"](list(req.get("messages") or []), n, i)
                            for i in range(n)]
            except Exception as e:  # a broken test script: a 500 the client can report
                self._send(500, _error(f"responder: {type(e).__name__}: {e}", "server_error"))
                return None
        choices = [{"index": i, "message": {"role": "assistant", "content": contents[i]},
                    "finish_reason": "stop", "logprobs": None} for i in range(n)]
        if fault == "empty":
            choices = []
        elif fault == "truncated":
            if n > 1:
                choices = choices[: n - 1]
            else:
                choices[0]["message"]["content"] = None
                choices[0]["finish_reason"] = "length"
        elif fault in ("length", "content_filter"):
            for c in choices:
                text = c["message"]["content"]
                c["message"]["content"] = text[: max(1, len(text) - 1)]
                c["finish_reason"] = fault
        return choices

    def do_POST(self):
        cfg = self.server.cfg  # type: ignore[attr-defined]
        stats: ServerStats = self.server.stats  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fault = self._draw_fault(cfg, stats)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, b'{"error": {"message": "not found", "type": "not_found"}}')
        try:
            req = json.loads(raw)
        except ValueError:
            return self._send(400, b'{"error": {"message": "bad json", "type": "invalid_request_error"}}')
        refused = self._refusal(cfg, req.get("model"))
        if refused is not None:
            return self._send(*refused)
        if cfg["delay_s"]:
            time.sleep(cfg["delay_s"])
        if self._serve_fault(cfg, fault):
            return
        n = int(req.get("n") or 1)
        choices = self._choices(cfg, req, n, fault)
        if choices is None:
            return
        messages = req.get("messages") or []
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages) // 4 + 1
        completion_tokens = sum(len(c["message"]["content"] or "") // 4 + 1 for c in choices)
        body = {"id": f"chatcmpl-{stats.requests}", "object": "chat.completion",
                "created": int(time.time()), "model": req.get("model", "echo"), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
        self._send(200, json.dumps(body).encode())
        if fault is None:
            with stats._lock:
                stats.ok += 1


class ServerHandle:
    def __init__(self, server: _Server, thread: threading.Thread):
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}/v1"
        self.stats: ServerStats = server.stats  # type: ignore[attr-defined]
        self.cfg: dict = server.cfg  # type: ignore[attr-defined]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(delay_s: float = 0.0, fault_rate: float = 0.0, seed: int = 0, *,
                 faults: tuple[str, ...] = FAULTS, retry_after_s: float = 0.05,
                 hang_s: float = 1.0, script: list | None = None,
                 host: str = "127.0.0.1", responder=None, model: str | None = None,
                 api_key: str | None = None, max_model_len: int | None = None) -> ServerHandle:
    server = _Server((host, 0), _Handler)
    server.stats = ServerStats()  # type: ignore[attr-defined]
    server.cfg = dict(delay_s=delay_s, fault_rate=fault_rate, rng=random.Random(seed),  # type: ignore[attr-defined]
                      faults=tuple(faults), retry_after_s=retry_after_s, hang_s=hang_s,
                      script=list(script or []), responder=responder, model=model,
                      api_key=api_key, max_model_len=max_model_len)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                              name="teacher-server", daemon=True)
    thread.start()
    return ServerHandle(server, thread)


@contextlib.contextmanager
def servers():
    """A `start_server` that stops every server it started when the block ends (a fixture's
    factory)."""
    handles: list[ServerHandle] = []

    def make(**kwargs) -> ServerHandle:
        handles.append(start_server(**kwargs))
        return handles[-1]
    try:
        yield make
    finally:
        for h in handles:
            h.stop()


def serve_forever_in_process(conn, **kwargs) -> None:
    """Target for a `multiprocessing.Process`: start the server, send its url over `conn`, and on
    any message back send the stats snapshot and stop (keeps the server off the client's GIL)."""
    handle = start_server(**kwargs)
    conn.send(handle.url)
    conn.recv()
    conn.send(handle.stats.snapshot())
    handle.stop()


@contextlib.contextmanager
def secret_env(name: str):
    """A random API key in environment variable `name` for the duration; the old value after."""
    key = "sk-test-" + secrets.token_hex(16)
    old = os.environ.get(name)
    os.environ[name] = key
    try:
        yield key
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
