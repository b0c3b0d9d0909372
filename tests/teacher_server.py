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
  "400"        400 invalid_request_error (never drawn at random; use `script`)

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

FAULTS = ("429", "500", "timeout", "reset", "malformed", "empty", "truncated")


class ServerStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.ok = 0
        self.faults: collections.Counter = collections.Counter()
        self.auth_headers: list[str] = []
        self.times: list[float] = []

    def snapshot(self) -> dict:
        with self._lock:
            return dict(requests=self.requests, ok=self.ok, faults=dict(self.faults),
                        fault_total=sum(self.faults.values()),
                        auth_headers=sorted(set(self.auth_headers)), times=list(self.times))

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

    def do_POST(self):
        cfg = self.server.cfg  # type: ignore[attr-defined]
        stats: ServerStats = self.server.stats  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
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
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, b'{"error": {"message": "not found", "type": "not_found"}}')
        try:
            req = json.loads(raw)
        except ValueError:
            return self._send(400, b'{"error": {"message": "bad json", "type": "invalid_request_error"}}')
        if cfg["delay_s"]:
            time.sleep(cfg["delay_s"])
        n = int(req.get("n") or 1)
        if fault == "429":
            return self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                              {"Retry-After": f"{cfg['retry_after_s']:g}"})
        if fault == "500":
            return self._send(500, b'{"error": {"message": "internal error", "type": "server_error"}}')
        if fault == "400":
            return self._send(400, b'{"error": {"message": "invalid request", '
                                   b'"type": "invalid_request_error"}}')
        if fault == "timeout":
            time.sleep(cfg["hang_s"])
            return self._drop(rst=False)
        if fault == "reset":
            return self._drop(rst=True)
        if fault == "malformed":
            return self._send(200, b'{"id": "x", "object": "chat.completion", "choices": [{"ind')
        last = next((m.get("content") for m in reversed(req.get("messages") or [])
                     if m.get("role") == "user"), "")
        content = "echo: " + (last if isinstance(last, str) else json.dumps(last))
        contents = [content] * n
        if cfg["responder"] is not None:
            try:
                contents = [cfg["responder"](list(req.get("messages") or []), n, i)
                            for i in range(n)]
            except Exception as e:  # a broken test script: a 500 the client can report
                body = {"error": {"message": f"responder: {type(e).__name__}: {e}",
                                  "type": "server_error"}}
                return self._send(500, json.dumps(body).encode())
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
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in req.get("messages") or []) // 4 + 1
        completion_tokens = sum(len(c) // 4 + 1 for c in contents)
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
                 host: str = "127.0.0.1", responder=None) -> ServerHandle:
    server = _Server((host, 0), _Handler)
    server.stats = ServerStats()  # type: ignore[attr-defined]
    server.cfg = dict(delay_s=delay_s, fault_rate=fault_rate, rng=random.Random(seed),  # type: ignore[attr-defined]
                      faults=tuple(faults), retry_after_s=retry_after_s, hang_s=hang_s,
                      script=list(script or []), responder=responder)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                              name="teacher-server", daemon=True)
    thread.start()
    return ServerHandle(server, thread)


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
