"""`phijax serve RUN_DIR`: an OpenAI-compatible HTTP API over the batched JAX sampler.

  schemas  request parameters validated as OpenAI does, and OpenAI-style error bodies
  batcher  the worker thread that owns the sampler and batches concurrent requests
  app      the HTTP server: routing, /v1/completions, /v1/chat/completions, /v1/models
"""
from phijax.serve.app import Server, make_server, serve
from phijax.serve.batcher import Batcher
from phijax.serve.schemas import APIError

__all__ = ["APIError", "Batcher", "Server", "make_server", "serve"]
