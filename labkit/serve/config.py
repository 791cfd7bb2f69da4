"""Serving limits and batching knobs, with presets per scale."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from labkit.config import SCALES, ConfigError, unknown_fields


@dataclass(frozen=True)
class ServeConfig:
    """What one server accepts (limits) and how it batches concurrent requests."""

    max_prompt_chars: int = 2000        # longer prompts get 422 naming this limit
    max_new_tokens: int = 256           # per request
    max_body_bytes: int = 64 * 1024     # whole request body; larger gets 413
    max_embed_texts: int = 32           # texts per /embed call
    max_batch_size: int = 16            # requests run together in one forward pass
    max_wait_ms: float = 5.0            # how long the first request waits for companions
    max_queue: int = 256                # pending requests beyond this get 503
    max_connections: int = 1024         # concurrent connections beyond this get 503 (uvicorn)
    request_timeout_s: float = 120.0    # a request waiting longer gets 504
    torch_threads: int | None = None    # CPU threads for torch (process-wide); None leaves torch's choice

    @classmethod
    def for_scale(cls, name: str, overrides: Mapping[str, Any] | None = None) -> "ServeConfig":
        """The preset for a scale (``tiny``, ``binder``, ``workshop``, ``full``) plus overrides
        (e.g. ``load_config().scale(name).section("serve")``)."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown scale {name!r} for serve; valid scales: {', '.join(SCALES)}")
        return _PRESETS[name].replace(**dict(overrides or {}))

    def replace(self, **changes: Any) -> "ServeConfig":
        """A copy with some knobs changed; unknown knobs are an error listing the valid ones."""
        unknown, valid = unknown_fields(type(self), changes)
        if unknown:
            raise ConfigError(f"unknown serve setting(s) {unknown}; valid: {', '.join(valid)}")
        new = dataclasses.replace(self, **changes)
        for f in dataclasses.fields(new):
            if getattr(new, f.name) is not None and getattr(new, f.name) <= 0:
                raise ConfigError(f"serve setting {f.name}={getattr(new, f.name)!r} must be positive")
        return new


_PRESETS = {
    # tiny models and 1-2 CPU machines answer fastest with one torch thread
    "tiny": ServeConfig(max_new_tokens=64, max_batch_size=8, max_wait_ms=5.0, torch_threads=1),
    "binder": ServeConfig(max_new_tokens=128, max_batch_size=8, torch_threads=1),
    "workshop": ServeConfig(max_new_tokens=512, max_batch_size=32),
    "full": ServeConfig(max_new_tokens=1024, max_batch_size=64, max_prompt_chars=8000),
}
