"""Offline data-preparation tools (teacher client, pipelines, sandboxed execution, ...)."""
