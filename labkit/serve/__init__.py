"""Serving: a labkit GPT behind an authenticated HTTP API (FastAPI + uvicorn) with dynamic batching.

    server = labkit.serve.start(labkit.serve.demo_generator())
    server.client().post("/generate", json={"prompt": "Hello", "seed": 1}).json()
    server.stop()
"""

from __future__ import annotations

from .config import ServeConfig
from .demo import demo_generator
from .engine import Batcher, ByteTokenizer, GenRequest, GenResult, Generator, ModelGenerator
from .server import Server, resolve_token, start

__all__ = [
    "Batcher", "ByteTokenizer", "GenRequest", "GenResult", "Generator", "ModelGenerator",
    "ServeConfig", "Server", "demo_generator", "resolve_token", "start",
]
