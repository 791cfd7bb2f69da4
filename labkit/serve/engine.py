"""Text generation behind a small interface, and dynamic batching of concurrent requests.

Determinism: every request carries its own seed and gets its own ``torch.Generator``; a forward
pass only stacks contexts of the same length (no padding, so no mask is needed; shorter prompts
catch up first), and each row samples from its own logits with its own generator. A request
therefore gives the same text alone or batched with others.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class GenRequest:
    """One generation request, already validated."""

    prompt: str
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class GenResult:
    """The continuation of one prompt (the prompt itself is not repeated)."""

    text: str
    prompt_tokens: int
    new_tokens: int


class Generator(Protocol):
    """What the server needs from a model: batch generation and a description of itself."""

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]: ...

    def count_tokens(self, text: str) -> int: ...

    def info(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): needs no training, so a demo model starts at once."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def sample_rows(logits: torch.Tensor, temperatures: Sequence[float], top_ks: Sequence[int | None],
                generators: Sequence[torch.Generator]) -> list[int]:
    """One next token per row of ``logits`` (B, V): greedy where the temperature is 0, else top-k
    sampling by inverse CDF with one uniform draw from that row's own generator.

    Each row's token depends only on its own logits and generator, never on the other rows, so a
    request samples the same token alone or in a batch. Works in float64 after subtracting the
    row maximum, so tiny temperatures cannot overflow."""
    x = logits.detach().to("cpu", torch.float64)
    x = x - x.max(dim=-1, keepdim=True).values
    out = x.argmax(dim=-1).tolist()  # greedy rows keep this
    rows = [i for i, t in enumerate(temperatures) if t > 0]
    if not rows:
        return out
    x = x[rows] / torch.tensor([float(temperatures[i]) for i in rows], dtype=torch.float64).unsqueeze(1)
    for j, i in enumerate(rows):
        k = top_ks[i]
        if k is not None and k < x.shape[1]:
            kth = torch.topk(x[j], k).values[-1]
            x[j] = x[j].masked_fill(x[j] < kth, float("-inf"))
    cdf = torch.cumsum(torch.softmax(x, dim=-1), dim=-1)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=generators[i]) for i in rows])
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    for j, i in enumerate(rows):
        out[i] = int(picked[j].clamp(max=x.shape[1] - 1))
    return out


def _last_logits(out: Any) -> torch.Tensor:
    """Logits of the last position from a model output: a tensor or a ``(logits, loss)`` tuple."""
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits[:, -1, :] if logits.dim() == 3 else logits


class ModelGenerator:
    """Serves a causal language model (``model(idx) -> logits`` or ``(logits, loss)``) with a tokenizer.

    Prompts longer than the model's context keep their last ``block_size`` tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, block_size: int | None = None,
                 device: str | torch.device = "cpu", name: str = "model"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        cfg = getattr(model, "config", None)
        self.block_size = int(block_size or getattr(cfg, "block_size", 0) or 1024)
        self.device = torch.device(device)
        self.name = name
        self._lock = threading.Lock()  # one forward pass at a time on this model

    def count_tokens(self, text: str) -> int:
        """How many tokens the prompt becomes."""
        return len(self.tokenizer.encode(text))

    def info(self) -> dict[str, Any]:
        """Name, size and device of the model, for /health."""
        return {
            "model": self.name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "block_size": self.block_size,
            "vocab_size": getattr(self.tokenizer, "vocab_size", None),
            "device": str(self.device),
        }

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Generate for all requests together; rows whose contexts have the same length share a
        forward pass (see ``_steps``)."""
        encoded = [self.tokenizer.encode(r.prompt) for r in requests]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"request {i}: the prompt encodes to no tokens; send some text")
        gens = [torch.Generator().manual_seed(r.seed) for r in requests]
        seqs = [list(p) for p in encoded]
        new: list[list[int]] = [[] for _ in requests]
        active = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        with self._lock, torch.inference_mode():
            while active:
                for rows in self._steps(active, seqs, new, requests):
                    ctx = torch.tensor([seqs[i][-self.block_size:] for i in rows], dtype=torch.long,
                                       device=self.device)
                    logits = _last_logits(self.model(ctx))
                    toks = sample_rows(logits, [requests[i].temperature for i in rows],
                                       [requests[i].top_k for i in rows], [gens[i] for i in rows])
                    for i, tok in zip(rows, toks):
                        seqs[i].append(tok)
                        new[i].append(tok)
                active = [i for i in active if len(new[i]) < requests[i].max_new_tokens]
        return [GenResult(self.tokenizer.decode(n), len(p), len(n)) for p, n in zip(encoded, new)]

    def _steps(self, active: list[int], seqs: list[list[int]], new: list[list[int]],
               requests: Sequence[GenRequest]) -> list[list[int]]:
        """The row groups to advance by one token now. Without padding only rows of equal context
        length can share a pass; so a group waits while some shorter group can still catch up with
        it before finishing, and every other group (the shortest always) advances."""
        by_len: dict[int, list[int]] = {}
        for i in active:
            by_len.setdefault(min(len(seqs[i]), self.block_size), []).append(i)
        left = {n: max(requests[i].max_new_tokens - len(new[i]) for i in rows) for n, rows in by_len.items()}
        lengths = sorted(by_len)
        return [by_len[n] for n in lengths if not any(left[m] > n - m for m in lengths if m < n)]


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts; retry later."""


class ShuttingDown(RuntimeError):
    """The server stopped before the request ran."""


_STOP = object()


class Batcher:
    """Collects concurrent requests into batches (up to ``max_batch_size``, waiting at most
    ``max_wait_ms`` for companions while traffic overlaps) and runs them on one thread;
    ``max_batch_size=1`` = unbatched."""

    def __init__(self, generator: Generator, *, max_batch_size: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256, on_batch: Callable[[int, int, float], None] | None = None):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with (batch size, new tokens, seconds)
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="labkit-serve-batcher", daemon=True)
        self._closed = False
        self._last_size = 0
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests waiting to run."""
        return self._q.qsize()

    def submit(self, request: GenRequest) -> Future:
        """Queue one request; the future resolves to its ``GenResult``."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._q.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting (max_queue); retry later")
        fut: Future = Future()
        self._q.put((request, fut))
        return fut

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail the waiting ones with ``ShuttingDown``, end the thread."""
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(ShuttingDown("the server stopped before this request ran"))

    @property
    def alive(self) -> bool:
        """Whether the batching thread still runs."""
        return self._thread.is_alive()

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, stop = [first], False
        # a lone request after a lone batch (sparse traffic) does not wait for companions that are
        # unlikely to come; as soon as requests overlap, batches grow and the wait applies again
        wait = 0.0 if self._last_size <= 1 and self._q.empty() else self.max_wait
        deadline = time.monotonic() + wait
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            batch = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            self._last_size = len(batch)
            if batch:
                self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple]) -> None:
        t0 = time.perf_counter()
        try:
            results = self.generator.generate([r for r, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for item in batch:  # one bad request must not fail its companions: run them one by one
                self._run([item])
            return
        seconds = time.perf_counter() - t0
        # counted before any caller is answered: a /metrics read right after a response includes it
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(r.new_tokens for r in results), seconds)
        for (_, fut), res in zip(batch, results):
            fut.set_result(res)
