"""Serving: a labkit GPT behind an authenticated HTTP API (FastAPI + uvicorn) with dynamic batching:
OpenAI-compatible routes under /v1 (docs/serving.md), labkit's own /generate and /embed, Prometheus /metrics.

    server = labkit.serve.start(labkit.serve.demo_generator())
    server.openai().completions.create(model=server.model_id, prompt="Hello", seed=1).choices[0].text
    server.client().post("/generate", json={"prompt": "Hello", "seed": 1}).json()
    server.stop()

Names are imported lazily, so ``labkit serve --help`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ServeConfig": "config", "Batcher": "engine", "ByteTokenizer": "engine", "GenRequest": "engine",
    "GenResult": "engine", "Generator": "engine", "ModelGenerator": "engine", "demo_generator": "demo",
    "demo_model": "demo", "load_generator": "checkpoints", "newest_checkpoint": "checkpoints",
    "pick_generator": "checkpoints", "LoadPreset": "load", "LoadResult": "load",
    "Server": "server", "start": "server", "resolve_token": "server", "self_signed": "tls",
    "MiniLMEmbedder": "embedder", "run_load": "load", "run_stream_load": "stream_load",
    "StreamLoadResult": "stream_load", "chat_prompt": "openai_api",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
