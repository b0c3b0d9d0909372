"""`phijax serve RUN_DIR`: an OpenAI-compatible HTTP API over the batched JAX sampler.

  schemas    request parameters validated as OpenAI does, and OpenAI-style error bodies
  text       token text and bytes, and a choice's text as its tokens arrive (stop strings)
  engine     the worker thread that owns the sampler and batches requests continuously
  endpoints  /v1/completions and /v1/chat/completions: plans, JSON answers, streamed chunks
  app        the Starlette app on uvicorn: routing, models, tokenizer endpoints, the Server
"""
from phijax.serve.app import Server, make_server, serve
from phijax.serve.engine import Engine, Job
from phijax.serve.schemas import APIError

__all__ = ["APIError", "Engine", "Job", "Server", "make_server", "serve"]
