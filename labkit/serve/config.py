"""Serving limits and batching knobs, with presets per scale."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from labkit.config import ScaleSettings

Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

_PRESETS: dict[str, dict[str, Any]] = {
    # tiny models and 1-2 CPU machines answer fastest with one torch thread
    "tiny": dict(max_new_tokens=64, max_batch_size=8, max_wait_ms=5.0, torch_threads=1),
    "binder": dict(max_new_tokens=128, max_batch_size=8, torch_threads=1),
    "workshop": dict(max_new_tokens=512, max_batch_size=32),
    "full": dict(max_new_tokens=1024, max_batch_size=64, max_prompt_chars=8000),
}


class ServeConfig(ScaleSettings):
    """What one server accepts (limits) and how it batches concurrent requests; every knob is positive."""

    section = noun = "serve"
    presets = _PRESETS

    max_prompt_chars: Positive = 2000        # longer prompts get 422 naming this limit
    max_new_tokens: Positive = 256           # per request
    max_body_bytes: Positive = 64 * 1024     # whole request body; larger gets 413
    max_embed_texts: Positive = 32           # texts per /embed call
    max_batch_size: Positive = 16            # requests run together in one forward pass
    max_wait_ms: PositiveFloat = 5.0         # how long the first request waits for companions (static)
    batching: Literal["continuous", "static"] = "continuous"  # join the running batch at the next step,
    #                                          or earlier labkit's whole batches of equal-length rows
    max_queue: Positive = 256                # pending requests beyond this get 503
    max_connections: Positive = 1024         # concurrent connections beyond this get 503 (uvicorn)
    request_timeout_s: PositiveFloat = 120.0  # a request waiting longer gets 504
    torch_threads: Positive | None = None    # CPU threads for torch (process-wide); None leaves torch's choice
