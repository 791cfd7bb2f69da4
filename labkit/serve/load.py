"""A small concurrent load against a running server: latencies, requests/s, one event per request."""

from __future__ import annotations

import itertools
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from labkit.config import ScaleSettings
from labkit.core.events import emit

from .metrics import percentile


class LoadPreset(ScaleSettings):
    """How much load the notebook sends per scale: requests per level, client counts, tokens each."""

    section = noun = "serve_load"
    presets = {"tiny": dict(requests=12, clients=(1, 4), max_new_tokens=8),
               "binder": dict(requests=32, clients=(1, 4, 8), max_new_tokens=16),
               "workshop": dict(requests=64, clients=(1, 4, 16), max_new_tokens=32),
               "full": dict(requests=256, clients=(1, 4, 16, 64), max_new_tokens=64)}

    requests: int = 16
    clients: tuple[int, ...] = (1, 4)
    max_new_tokens: int = 8


@dataclass
class LoadResult:
    """What a load run measured; latencies in seconds, in request order."""

    concurrency: int
    latencies: list[float]
    statuses: list[int]
    texts: list[str | None]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        """The ``q``-th latency percentile in milliseconds."""
        return 1000 * (percentile(self.latencies, q) or 0.0)

    def summary(self) -> dict[str, float]:
        """Requests/s, p50 and p95 in ms, and how many answers were not 200."""
        return {"concurrency": self.concurrency, "requests": len(self.latencies),
                "requests_per_s": round(self.requests_per_second, 2), "p50_ms": round(self.p(50), 1),
                "p95_ms": round(self.p(95), 1), "errors": sum(s != 200 for s in self.statuses)}


def run_load(url: str, token: str, *, requests: int = 32, concurrency: int = 4, prompt: str = "Once upon a time",
             max_new_tokens: int = 16, temperature: float = 1.0, top_k: int | None = None, first_seed: int = 0,
             certfile: str | None = None, sink: Callable[[dict], None] | None = None,
             timeout: float = 120.0) -> LoadResult:
    """Send ``requests`` /generate calls from ``concurrency`` client threads (request i uses seed
    ``first_seed + i``); each answer is emitted to ``sink`` as a ``serve_request`` event."""
    if requests < 1 or concurrency < 1:
        raise ValueError(f"requests ({requests}) and concurrency ({concurrency}) must be at least 1")
    latencies = [0.0] * requests
    statuses = [0] * requests
    texts: list[str | None] = [None] * requests
    counter = itertools.count()
    lock = threading.Lock()
    t0 = time.perf_counter()
    verify: Any = ssl.create_default_context(cafile=certfile) if certfile else True

    def client_thread(worker: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                          verify=verify) as client:
            while True:
                with lock:
                    i = next(counter)
                if i >= requests:
                    return
                body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
                        "seed": first_seed + i}
                if top_k is not None:
                    body["top_k"] = top_k
                start = time.perf_counter()
                try:
                    r = client.post("/generate", json=body)
                    statuses[i] = r.status_code
                    texts[i] = r.json().get("text") if r.status_code == 200 else None
                except httpx.HTTPError:
                    statuses[i] = 0
                latencies[i] = time.perf_counter() - start
                emit("serve_request", sink=sink, request=i, client=worker, concurrency=concurrency,
                     latency_ms=1000 * latencies[i], status=statuses[i], elapsed_s=time.perf_counter() - t0)

    threads = [threading.Thread(target=client_thread, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(concurrency, latencies, statuses, texts, time.perf_counter() - t0)


def post_together(client: httpx.Client, bodies: list[dict], path: str = "/generate") -> list[Any]:
    """POST all ``bodies`` at the same moment (one thread each, released by a barrier) and return the JSON
    answers in the order of the bodies: truly concurrent requests, which the server can batch."""
    answers: list[Any] = [None] * len(bodies)
    errors: list[BaseException] = []
    gate = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        try:
            gate.wait(timeout=60)
            answers[i] = client.post(path, json=bodies[i]).json()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return answers
