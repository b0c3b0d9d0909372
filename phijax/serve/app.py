"""The HTTP side of `phijax serve`: a Starlette app on uvicorn, its routes, and the `Server`.

Endpoints (OpenAI wire format, JSON in and out, or Server-Sent Events with `stream: true`):
  GET  /v1/models               the one model, named after the run directory (or --model-name),
                                with its context length as `max_model_len`
  GET  /v1/models/{id}
  POST /v1/completions          prompt: a string, a list of strings, token ids, or lists of ids
  POST /v1/chat/completions     messages rendered with the tokenizer's chat template
  GET  /health
  GET  /tokenizer_info, POST /tokenize, POST /detokenize (also under /v1/), as vLLM serves them:
                                what lm-evaluation-harness's remote tokenizer reads

Handlers validate a request completely (`endpoints`), then hand its work to the `Engine`, which
batches concurrent requests continuously. Beyond OpenAI's parameters, `top_k` (0 = off) is
accepted; unknown parameters are ignored. A bad request gets a 4xx OpenAI error body, never a
500; a failure while generating is a 500 for that request alone. A client that disconnects
has its rows dropped from the batch.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from phijax.errors import ConfigError
from phijax.serve import endpoints, schemas
from phijax.serve.engine import Engine
from phijax.serve.schemas import APIError
from phijax.serve.text import Vocab

log = logging.getLogger(__name__)

MAX_BODY = 32 << 20           # request body bytes



class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Server:
    """The app, its engine and its listening socket (bound at once: port 0 picks a free port).
    Run `serve_forever()` (in any thread); stop with `shutdown()`, then `server_close()`."""

    def __init__(self, sampler, tokenizer, model_name: str, host: str = "127.0.0.1",
                 port: int = 8000, max_batch: int = 64, segment: int = 8,
                 batch_wait: float = 0.005):
        self.sampler, self.tokenizer, self.model_name = sampler, tokenizer, model_name
        self.vocab = Vocab(tokenizer)
        self.created = int(time.time())
        self._counts = {"requests": 0, "errors": 0}
        self._counts_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(2048)
        except OSError as e:
            self.socket.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {e}") from None
        self.host, self.port = host, self.socket.getsockname()[1]
        try:
            self.engine = Engine(sampler, max_batch, segment, batch_wait)
        except BaseException:
            self.socket.close()
            raise
        config = uvicorn.Config(build_app(self), log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._serving, self._stopped = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def stats(self) -> dict:
        """A snapshot: requests, errors (500s), and the engine's counts."""
        with self._counts_lock:
            return {**self._counts, **self.engine.stats()}

    def count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1

    def serve_forever(self) -> None:
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving: returns once `serve_forever` has (open streams get a few seconds)."""
        self._uvicorn.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        """Stop the engine (queued and running requests get a 503) and close the socket."""
        self.engine.close()
        self.socket.close()

    def model_card(self) -> dict:
        """The model as /v1/models lists it, with its context length in tokens under vLLM's
        name, `max_model_len` (clients check max_tokens against it before sending)."""
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "phijax", "max_model_len": self.sampler.max_len}

    def tokenizer_info(self) -> dict:
        """The tokenizer as vLLM's /tokenizer_info describes it: its class, its own special
        tokens and chat template, the context length and the vocabulary size."""
        tok = self.tokenizer
        specials = tok.hf_specials()
        return {"tokenizer_class": type(tok).__name__,
                **{k: specials.get(k) for k in ("bos_token", "eos_token", "pad_token")},
                "chat_template": tok.chat_template,
                "model_max_length": self.sampler.max_len, "vocab_size": self.vocab.size}


# ---------------------------------------------------------------------------------------------
# Requests


async def _json_body(request: Request) -> dict:
    """The body as a JSON object, at most MAX_BODY bytes."""
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise APIError("invalid Content-Length header", 400)
    if length is not None and int(length) > MAX_BODY:
        raise APIError(f"the request body is over {MAX_BODY} bytes", 413)
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY:
            raise APIError(f"the request body is over {MAX_BODY} bytes", 413)
    try:
        body = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(f"We could not parse the JSON body of your request. ({e})")
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    return body


async def _unless_disconnected(request: Request, work):
    """Await `work`; if the client disconnects first, cancel it and raise ClientGone."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone
    return task.result()


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), e.status)


def _endpoint(server: Server):
    """A handler's errors as OpenAI bodies: APIError as itself, anything else a 500."""
    def wrap(fn):
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await fn(request)
            except APIError as e:
                response = _error(e)
            except ClientGone:
                response = Response(status_code=499)
            except Exception as e:  # noqa: BLE001 - the server keeps serving
                log.exception("%s %s failed", request.method, request.url.path)
                server.count("errors")
                response = _error(endpoints.server_error(e))
            response.headers["x-request-id"] = uuid.uuid4().hex
            log.info("%s %s %d %.0fms", request.method, request.url.path, response.status_code,
                     1000 * (time.perf_counter() - start))
            return response
        return handler
    return wrap


def _check_model(server: Server, body: dict) -> None:
    """Where a body may name the model (tokenizer endpoints): it must be this one."""
    if body.get("model") is not None:
        schemas.check_model(body, server.model_name)


def build_app(server: Server) -> Starlette:
    endpoint = _endpoint(server)

    @endpoint
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        server.count("requests")
        chat = request.url.path.endswith("/chat/completions")
        plan = (endpoints.chat_plan if chat else endpoints.completions_plan)(server, body)
        if plan.stream:
            return StreamingResponse(endpoints.stream(server, plan),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _unless_disconnected(request, endpoints.respond(server, plan)))

    @endpoint
    async def models(request: Request) -> Response:
        name = request.path_params.get("name")
        if name is None:
            return JSONResponse({"object": "list", "data": [server.model_card()]})
        if name != server.model_name:
            raise APIError(f"The model `{name}` does not exist.", 404, param="model",
                           code="model_not_found")
        return JSONResponse(server.model_card())

    @endpoint
    async def tokenize(request: Request) -> Response:
        body = await _json_body(request)
        _check_model(server, body)
        return JSONResponse(tokenize_body(server, body))

    @endpoint
    async def detokenize(request: Request) -> Response:
        body = await _json_body(request)
        _check_model(server, body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise schemas.missing("tokens") if tokens is None else schemas.bad_type(
                "tokens", "an array of token ids", tokens)
        return JSONResponse({"prompt": server.tokenizer.decode(server.vocab.ids(tokens,
                                                                                "tokens"))})

    async def info(request: Request) -> Response:
        return JSONResponse(server.tokenizer_info())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/models/{name:path}", models),
              Route("/v1/completions", generate, methods=["POST"]),
              Route("/v1/chat/completions", generate, methods=["POST"])]
    for prefix in ("", "/v1"):
        routes += [Route(f"{prefix}/tokenizer_info", info),
                   Route(f"{prefix}/tokenize", tokenize, methods=["POST"]),
                   Route(f"{prefix}/detokenize", detokenize, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """The router's 404 and 405 as OpenAI error bodies."""
    method, path = request.method, request.url.path
    message = (f"Method {method} is not allowed for {path}" if exc.status_code == 405
               else f"Invalid URL ({method} {path})")
    return _error(APIError(message, exc.status_code))


def tokenize_body(server: Server, body: dict) -> dict:
    """vLLM's /tokenize: a `prompt` string, or chat `messages` (with the generation prompt)."""
    if body.get("messages") is not None:
        if not schemas.boolean(body, "add_generation_prompt", True):
            raise schemas.unsupported("add_generation_prompt", " (only true)")
        ids = list(server.tokenizer.encode_prompt(schemas.chat_messages(body["messages"])))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise schemas.missing("prompt") if prompt is None else schemas.bad_type(
                "prompt", "a string", prompt)
        ids = server.vocab.encode(prompt)
    strs = schemas.boolean(body, "return_token_strs", False)
    return {"count": len(ids), "max_model_len": server.sampler.max_len, "tokens": ids,
            "token_strs": [server.vocab.text(t) for t in ids] if strs else None}


# ---------------------------------------------------------------------------------------------
# Entry points


def make_server(run_dir, host: str = "127.0.0.1", port: int = 8000,
                model_name: str | None = None, max_batch: int = 64, segment: int = 8,
                batch_wait: float = 0.005) -> Server:
    """Load the run's sampler and bind a server (port 0 picks a free port); call
    `.serve_forever()` on it, in a background thread if need be."""
    from phijax.sampling import load_sampler

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} " + ("is a file" if run_dir.exists()
                                                         else "does not exist"))
    sampler, tokenizer = load_sampler(run_dir)
    name = model_name or run_dir.resolve().name
    server = Server(sampler, tokenizer, name, host, port, max_batch, segment, batch_wait)
    log.info("serving %s on %s (context %d tokens, batches of up to %d samples, segments of "
             "%d steps)", name, server.url, sampler.max_len, max_batch, segment)
    return server


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          max_batch: int = 64, segment: int = 8) -> int:
    """`phijax serve`: serve the run's latest checkpoint until interrupted (Ctrl-C or
    SIGTERM)."""
    server = make_server(run_dir, host, port, model_name, max_batch, segment)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()  # uvicorn stops on the signal, then raises it again here
    except KeyboardInterrupt:
        log.info("interrupted, shutting down")
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
