"""A small concurrent load of streamed completions: time to first token and inter-token latency per request,
measured where the client sees them (any OpenAI-compatible client, e.g. ``Server.openai()``)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

from .metrics import percentile


@dataclass
class StreamTiming:
    """One streamed request: seconds to its first piece of text, the gaps between pieces, the whole."""

    ttft: float
    gaps: list[float]
    seconds: float
    text: str


@dataclass
class StreamLoadResult:
    """What one level of concurrency measured, one ``StreamTiming`` per request (in request order)."""

    concurrency: int
    timings: list[StreamTiming]
    seconds: float

    @property
    def ttfts(self) -> list[float]:
        return [t.ttft for t in self.timings]

    @property
    def gaps(self) -> list[float]:
        return [g for t in self.timings for g in t.gaps]

    def summary(self) -> dict[str, float]:
        """Time to first token and inter-token latency (p50, p95, in ms) and requests/s."""
        ms = lambda xs, q: round(1000 * (percentile(xs, q) or 0.0), 2)  # noqa: E731
        return {"concurrency": self.concurrency, "requests": len(self.timings),
                "requests_per_s": round(len(self.timings) / self.seconds, 2) if self.seconds else 0.0,
                "ttft_p50_ms": ms(self.ttfts, 50), "ttft_p95_ms": ms(self.ttfts, 95),
                "itl_p50_ms": ms(self.gaps, 50), "itl_p95_ms": ms(self.gaps, 95)}


def stream_once(client: Any, *, model: str, prompt: str, max_tokens: int, seed: int,
                temperature: float = 1.0) -> StreamTiming:
    """Stream one completion with an OpenAI client; time every piece of text as it arrives."""
    t0 = time.perf_counter()
    times, pieces = [], []
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, seed=seed,
                                           temperature=temperature, stream=True):
        text = "".join(c.text or "" for c in chunk.choices)
        if text:
            times.append(time.perf_counter())
            pieces.append(text)
    end = time.perf_counter()
    ttft = (times[0] if times else end) - t0
    return StreamTiming(ttft, [b - a for a, b in zip(times, times[1:])], end - t0, "".join(pieces))


def run_stream_load(client: Any, *, model: str, requests: int = 16, concurrency: int = 4, prompt: str = "def ",
                    max_tokens: int = 16, first_seed: int = 0) -> StreamLoadResult:
    """``requests`` streamed completions from ``concurrency`` threads sharing ``client`` (request i uses
    seed ``first_seed + i``)."""
    if requests < 1 or concurrency < 1:
        raise ValueError(f"requests ({requests}) and concurrency ({concurrency}) must be at least 1")
    timings: list[Any] = [None] * requests
    errors: list[BaseException] = []
    counter, lock = itertools.count(), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= requests or errors:
                return
            try:
                timings[i] = stream_once(client, model=model, prompt=prompt, max_tokens=max_tokens,
                                         seed=first_seed + i)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return StreamLoadResult(concurrency, timings, time.perf_counter() - t0)
