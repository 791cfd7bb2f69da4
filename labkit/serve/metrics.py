"""Request counts, latency percentiles and generation throughput for ``GET /metrics``."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Metrics:
    """Thread-safe counters; latencies keep the last ``window`` requests per route."""

    ROUTES = ("/generate", "/embed", "/health", "/metrics", "/openapi.json")

    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.started = time.time()
        self.window = window
        self.status: Counter = Counter()
        self.routes: Counter = Counter()
        self.latency: dict[str, deque] = {}
        self.tokens = 0
        self.gen_seconds = 0.0
        self.batches = 0
        self.batched_requests = 0
        self.max_batch = 0

    def record_request(self, path: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request (unknown paths are pooled as ``other``)."""
        route = path if path in self.ROUTES else "other"
        with self._lock:
            self.status[str(status)] += 1
            self.routes[route] += 1
            self.latency.setdefault(route, deque(maxlen=self.window)).append(seconds)

    def record_batch(self, size: int, tokens: int, seconds: float) -> None:
        """Count one batch of generation."""
        with self._lock:
            self.batches += 1
            self.batched_requests += size
            self.max_batch = max(self.max_batch, size)
            self.tokens += tokens
            self.gen_seconds += seconds

    def snapshot(self, pending: int = 0) -> dict[str, Any]:
        """Everything as plain JSON: counts, latency percentiles in ms, tokens/s."""
        with self._lock:
            uptime = time.time() - self.started
            lat = {
                route: {
                    "count": len(d),
                    **{f"p{q}_ms": round(1000 * percentile(list(d), q), 3) for q in (50, 90, 95, 99)},
                }
                for route, d in self.latency.items()
            }
            return {
                "uptime_s": round(uptime, 3),
                "requests": sum(self.routes.values()),
                "requests_by_route": dict(self.routes),
                "responses_by_status": dict(self.status),
                "latency": lat,
                "generated_tokens": self.tokens,
                "tokens_per_second": round(self.tokens / self.gen_seconds, 2) if self.gen_seconds else 0.0,
                "tokens_per_second_uptime": round(self.tokens / uptime, 2) if uptime else 0.0,
                "batches": self.batches,            # engine passes: whole batches, or steps when continuous
                "batched_requests": self.batched_requests,  # rows summed over those passes
                "mean_batch_size": round(self.batched_requests / self.batches, 3) if self.batches else 0.0,
                "max_batch_size_seen": self.max_batch,
                "pending": pending,
            }
