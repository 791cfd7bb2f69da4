"""What the server measures: Prometheus metrics at ``GET /metrics`` and a JSON view at ``GET /metrics.json``.

Every server has its own ``CollectorRegistry`` (no global state), so several servers in one process
(a notebook, the tests) keep separate accounts. The metric names are listed in ``docs/serving.md``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "labkit_serve"
# seconds: from a millisecond (a tiny model on a GPU) to minutes (a long generation on a CPU)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class TokenClock:
    """Times one generation request: pass it as ``on_token`` (it is called on the engine thread with
    each piece of text), then call ``done()`` once the request finished."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics
        self.t0 = time.perf_counter()
        self.last: float | None = None

    def __call__(self, piece: str) -> None:
        if piece:
            now = time.perf_counter()
            self.metrics.observe_piece(now - (self.t0 if self.last is None else self.last), first=self.last is None)
            self.last = now

    def done(self, prompt_tokens: int = 0) -> None:
        """Count the request's end-to-end latency (and its prompt tokens)."""
        self.metrics.observe_request(time.perf_counter() - self.t0, prompt_tokens)


def _quantiles(values: deque) -> dict[str, Any]:
    xs = list(values)
    return {"count": len(xs),
            **{f"p{q}_ms": round(1000 * percentile(xs, q), 3) if xs else None for q in (50, 90, 95, 99)}}


class Metrics:
    """Thread-safe counters and histograms; the JSON view keeps the last ``window`` values of each latency."""

    ROUTES = ("/generate", "/embed", "/health", "/metrics", "/metrics.json", "/openapi.json", "/v1/completions",
              "/v1/chat/completions", "/v1/models", "/v1/embeddings")

    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.started = time.time()
        self.window = window
        self.status: Counter = Counter()
        self.routes: Counter = Counter()
        self.latency: dict[str, deque] = {}
        self.ttft: deque = deque(maxlen=window)
        self.itl: deque = deque(maxlen=window)
        self.tokens = 0
        self.gen_seconds = 0.0
        self.batches = 0
        self.batched_requests = 0
        self.max_batch = 0
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        self.p_requests = PromCounter(f"{p}_http_requests", "HTTP requests answered, by route and status code",
                                      ["route", "status"], registry=r)
        self.p_http = Histogram(f"{p}_http_request_duration_seconds", "HTTP request duration (seconds), by route",
                                ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.p_ttft = Histogram(f"{p}_time_to_first_token_seconds", "time from a generation request's submission "
                                "to its first piece of text (seconds)", buckets=LATENCY_BUCKETS, registry=r)
        self.p_itl = Histogram(f"{p}_inter_token_latency_seconds", "time between two pieces of text of one "
                               "generation request (seconds)", buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.p_e2e = Histogram(f"{p}_e2e_request_latency_seconds", "time from a generation request's submission "
                               "to its last token (seconds)", buckets=LATENCY_BUCKETS, registry=r)
        self.p_tokens = PromCounter(f"{p}_generation_tokens", "tokens generated", registry=r)
        self.p_prompt_tokens = PromCounter(f"{p}_prompt_tokens", "prompt tokens of finished generation requests",
                                           registry=r)
        self.p_batch = Histogram(f"{p}_batch_size", "rows in one engine step (requests sharing a forward pass)",
                                 buckets=BATCH_BUCKETS, registry=r)
        self.p_running = Gauge(f"{p}_requests_running", "generation requests in the running batch", registry=r)
        self.p_waiting = Gauge(f"{p}_requests_waiting", "generation requests waiting to join a batch", registry=r)
        self.p_cache = Gauge(f"{p}_kv_cache_bytes", "bytes held by the KV cache now", registry=r)

    def bind(self, batcher: Any) -> None:
        """Read the running/waiting requests and the KV-cache size from ``batcher`` at every scrape."""
        self.p_running.set_function(lambda: getattr(batcher, "running", 0))
        self.p_waiting.set_function(lambda: batcher.pending)
        cache_bytes = getattr(batcher.generator, "cache_bytes", None)
        self.p_cache.set_function(cache_bytes if callable(cache_bytes) else (lambda: 0))

    def route(self, path: str) -> str:
        """The route label of ``path``: a known route, ``/v1/models`` for a model's page, else ``other``."""
        if path in self.ROUTES:
            return path
        return "/v1/models" if path.startswith("/v1/models/") else "other"

    def record_request(self, path: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request (unknown paths are pooled as ``other``)."""
        route = self.route(path)
        with self._lock:
            self.status[str(status)] += 1
            self.routes[route] += 1
            self.latency.setdefault(route, deque(maxlen=self.window)).append(seconds)
        self.p_requests.labels(route, str(status)).inc()
        self.p_http.labels(route).observe(seconds)

    def record_batch(self, size: int, tokens: int, seconds: float) -> None:
        """Count one batch (or engine step) of generation."""
        with self._lock:
            self.batches += 1
            self.batched_requests += size
            self.max_batch = max(self.max_batch, size)
            self.tokens += tokens
            self.gen_seconds += seconds
        self.p_batch.observe(size)
        self.p_tokens.inc(tokens)

    def clock(self) -> TokenClock:
        """A ``TokenClock`` for one request."""
        return TokenClock(self)

    def observe_piece(self, seconds: float, first: bool) -> None:
        """Time to the first piece of a request, or the gap since its previous piece."""
        with self._lock:
            (self.ttft if first else self.itl).append(seconds)
        (self.p_ttft if first else self.p_itl).observe(seconds)

    def observe_request(self, seconds: float, prompt_tokens: int = 0) -> None:
        """A generation request finished after ``seconds``."""
        self.p_e2e.observe(seconds)
        self.p_prompt_tokens.inc(prompt_tokens)

    def prometheus(self) -> bytes:
        """The Prometheus text exposition of this server's registry."""
        return generate_latest(self.registry)

    def snapshot(self, pending: int = 0, running: int = 0) -> dict[str, Any]:
        """Everything as plain JSON: counts, latency percentiles in ms, tokens/s."""
        with self._lock:
            uptime = time.time() - self.started
            return {
                "uptime_s": round(uptime, 3),
                "requests": sum(self.routes.values()),
                "requests_by_route": dict(self.routes),
                "responses_by_status": dict(self.status),
                "latency": {route: _quantiles(d) for route, d in self.latency.items()},
                "time_to_first_token": _quantiles(self.ttft),
                "inter_token_latency": _quantiles(self.itl),
                "generated_tokens": self.tokens,
                "tokens_per_second": round(self.tokens / self.gen_seconds, 2) if self.gen_seconds else 0.0,
                "tokens_per_second_uptime": round(self.tokens / uptime, 2) if uptime else 0.0,
                "batches": self.batches,            # engine passes: whole batches, or steps when continuous
                "batched_requests": self.batched_requests,  # rows summed over those passes
                "mean_batch_size": round(self.batched_requests / self.batches, 3) if self.batches else 0.0,
                "max_batch_size_seen": self.max_batch,
                "pending": pending,
                "running": running,
            }
