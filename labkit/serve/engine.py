"""Text generation behind a small interface, and batching of concurrent requests.

- ``TextStream``: one request's text as tokens arrive: stop strings, streamed pieces.
- ``ModelGenerator``: a model + tokenizer; ``step`` = continuous batching over a KV cache,
  ``generate`` = the static batches of earlier labkit (recompute, rows of equal length only).
- ``Batcher``: the engine thread; ``submit(request, on_token=...)`` returns a future.

Determinism: every request carries its own seed and gets its own ``torch.Generator``, and each
row samples from its own logits with its own generator; so a request gives the same text alone or
batched with others (up to float rounding in batched passes: see ``ModelGenerator``).
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
    seed: int = 0                     # (fifth, as before top_p and stop came: positional callers keep working)
    top_p: float | None = None        # nucleus sampling; None or 1.0 = off
    stop: tuple[str, ...] = ()        # end before the first stop string; it is not in the text


@dataclass(frozen=True)
class GenResult:
    """The continuation of one prompt (the prompt itself is not repeated)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str = "length"     # "length" (max_new_tokens reached) | "stop" (a stop string)


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
                generators: Sequence[torch.Generator],
                top_ps: Sequence[float | None] | None = None) -> list[int]:
    """One next token per row of ``logits`` (B, V): greedy where the temperature is 0, else sampling
    by inverse CDF with one uniform draw from that row's own generator, after top-k (keep the k most
    likely tokens) and top-p (keep the most likely tokens until their probability reaches p; the most
    likely one always stays; None or 1.0 = off).

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
        p = top_ps[i] if top_ps is not None else None
        if p is not None and p < 1.0:
            probs, order = torch.sort(torch.softmax(x[j], dim=-1), descending=True, stable=True)
            before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
            x[j, order[before >= p]] = float("-inf")      # the first token has 0 before it: it stays
    cdf = torch.cumsum(torch.softmax(x, dim=-1), dim=-1)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=generators[i]) for i in rows])
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    for j, i in enumerate(rows):
        out[i] = int(picked[j].clamp(max=x.shape[1] - 1))
    return out


class TextStream:
    """The text of one request as its tokens arrive: stop strings, and the pieces for ``on_token``.

    ``push(token)`` decodes all new tokens so far, cuts the text at the first stop string (the
    request then ends with ``finish_reason="stop"``), and passes on what is safe to show: text that
    could still become the start of a stop string is held back, and so is a trailing U+FFFD (a
    multi-byte UTF-8 character whose remaining bytes may come with the next token). When the request
    ends, the rest is passed on, so the pieces always join to the final text."""

    def __init__(self, request: GenRequest, prompt_ids: Sequence[int], tokenizer: Any,
                 on_token: Callable[[str], None] | None = None):
        self.request = request
        self.prompt = list(prompt_ids)
        self.seq = list(prompt_ids)     # prompt + new tokens (the context to continue)
        self.new: list[int] = []
        self.generator = torch.Generator().manual_seed(request.seed)
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.stops = tuple(s for s in request.stop if s)
        self.sent = ""                  # text passed to on_token so far
        self.text = ""
        self.finish_reason = "length"
        self.done = request.max_new_tokens <= 0
        self.error: BaseException | None = None  # what on_token or this request's prefill raised

    def push(self, token: int) -> bool:
        """Add one generated token; returns whether the request has ended."""
        self.seq.append(token)
        self.new.append(token)
        text = self.tokenizer.decode(self.new)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish_reason, self.done = text[:cut], "stop", True
        elif len(self.new) >= self.request.max_new_tokens:
            self.done = True
        if self.done:
            # a tokenizer whose decoding of a prefix is not a prefix of the whole keeps the pieces sent
            self.text = text if text.startswith(self.sent) else self.sent + text[len(self.sent):]
            self._send(self.text)
        else:
            self._send(self._safe(text))
        return self.done

    def _safe(self, text: str) -> str:
        """``text`` without what may still change: a trailing U+FFFD, a possible stop-string start."""
        text = text.rstrip("\ufffd")
        for n in range(min(len(text), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return text[:-n]
        return text

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
            if self.on_token is not None:
                try:
                    self.on_token(piece)
                except Exception as exc:  # e.g. the streaming client went away: end this request
                    self.error, self.done, self.on_token = exc, True, None

    def result(self) -> GenResult:
        """The finished request's result."""
        return GenResult(self.text, len(self.prompt), len(self.new), self.finish_reason)


def _sample(logits: torch.Tensor, streams: Sequence[TextStream]) -> list[int]:
    """``sample_rows`` with each stream's own settings and generator."""
    reqs = [st.request for st in streams]
    return sample_rows(logits, [r.temperature for r in reqs], [r.top_k for r in reqs],
                       [st.generator for st in streams], [r.top_p for r in reqs])


def _last_logits(out: Any) -> torch.Tensor:
    """Logits of the last position from a model output: a tensor or a ``(logits, loss)`` tuple."""
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits[:, -1, :] if logits.dim() == 3 else logits


class ModelGenerator:
    """Serves a causal language model (``model(idx) -> logits`` or ``(logits, loss)``) with a tokenizer.

    Prompts longer than the model's context keep their last ``block_size`` tokens.

    Two ways to run requests:

    - ``generate(requests)``: the static batch of earlier labkit, no KV cache: every step
      recomputes the whole context, and only rows of equal length share a pass (``_steps``).
    - ``step(joining)``: continuous batching over a KV cache (``labkit.model.KVCache``), which the
      ``Batcher`` calls once per engine step. Each joining request is prefilled alone in one pass
      (its prompt, at positions 0..n-1, into a cache of its own) and samples its first token; from
      the next step on it is a row of the running batch, whose rows of different lengths share one
      pass per step: each feeds its last token at its own position, over its own cached keys (the
      cache is padded on the right to the longest row and the attention mask hides the padding).
      A finished row leaves the cache at once. A row longer than ``block_size`` leaves the cache
      too and from then on runs its last ``block_size`` tokens in a pass of its own per token, as
      the no-cache path does (see ``GPT.next_logits``). A model without ``new_cache`` runs every
      row that way.

    Determinism: every request has its own ``torch.Generator`` (its seed) and samples from its own
    row's logits, and a prompt's prefill is the same pass alone or batched. What can differ in
    theory is float rounding in the batched decode passes: a (B, C) matmul may sum in another order
    than a (1, C) one, and the masked attention over padded keys in another order than over exactly
    the row's keys; float32 logits then differ by ~1e-7, which changes a sampled token only when the
    row's uniform draw falls within ~1e-7 of a boundary of its CDF (or greedy logits tie that
    closely). Under bfloat16 autocast (``precision="auto"`` on a CPU or GPU with fast bf16) the
    cache holds bf16 keys and values, and the differences grow to ~1e-3, still rarely a token.
    ``tests/test_serve_engine.py`` checks alone == batched texts, greedy and sampled."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, block_size: int | None = None,
                 device: str | torch.device = "cpu", name: str = "model"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        cfg = getattr(model, "config", None)
        self.block_size = int(block_size or getattr(cfg, "block_size", 0) or 1024)
        self.device = torch.device(device)
        self.name = name
        self._lock = threading.Lock()  # one forward pass at a time on this model
        self._kv = callable(getattr(self.model, "new_cache", None))
        self._reset()

    def _reset(self) -> None:
        """Forget the running batch (continuous batching state)."""
        self._rows: list[TextStream] = []      # rows in the KV cache, in its row order
        self._cache: Any = None
        self._window: list[TextStream] = []    # rows run without the cache (past block_size)

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

    streams = True  # generate() takes on_token callbacks (the Batcher then streams pieces)

    def cache_bytes(self) -> int:
        """Bytes held by the KV cache of the running batch now (0 when none runs)."""
        cache = self._cache
        return cache.nbytes() if cache is not None else 0

    @property
    def running(self) -> int:
        """Rows of the running batch (continuous batching)."""
        return len(self._rows) + len(self._window)

    def step(self, joining: Sequence[TextStream] = ()) -> None:
        """One engine step of continuous batching: one token for every running row (one pass over
        the KV cache for all of them), then a prefill and first token for each ``joining`` stream,
        which then runs with the others from the next step on. Rows that are done (``st.done``)
        leave. A joining stream whose prefill fails gets ``st.error`` and leaves; any other error
        leaves the state empty and propagates (the caller fails the rows it gave)."""
        try:
            with self._lock, torch.inference_mode():
                self._step(list(joining))
        except Exception:
            self._reset()
            raise

    def _step(self, joining: list[TextStream]) -> None:
        bs = self.block_size
        if self._rows:
            idx = torch.tensor([[st.seq[-1]] for st in self._rows], dtype=torch.long, device=self.device)
            logits = self.model(idx, cache=self._cache)[0][:, -1, :]
            for st, tok in zip(self._rows, _sample(logits, self._rows)):
                st.push(tok)
        for st in self._window:
            self._push_recomputed(st)
        caches = []
        for st in joining:
            try:
                if self._kv:
                    ctx = st.seq[-bs:]
                    cache = self.model.new_cache(1, min(bs, len(ctx) + st.request.max_new_tokens))
                    idx = torch.tensor([ctx], dtype=torch.long, device=self.device)
                    st.push(_sample(self.model(idx, cache=cache)[0][:, -1, :], [st])[0])
                    caches.append(cache)
                else:
                    self._push_recomputed(st)
                    caches.append(None)
            except Exception as exc:
                st.error, st.done = exc, True
                caches.append(None)
        # bookkeeping: who stays in the cache, who leaves, who runs without it from now on
        def fits(st: TextStream) -> bool:  # its next token still gets a position below block_size
            return len(st.seq) <= bs

        keep = [i for i, st in enumerate(self._rows) if not st.done and fits(st)]
        joined = [(st, c) for st, c in zip(joining, caches) if c is not None and not st.done and fits(st)]
        self._window = [st for st in self._window if not st.done] \
            + [st for st in self._rows if not st.done and not fits(st)] \
            + [st for st, c in zip(joining, caches) if not st.done and (c is None or not fits(st))]
        if len(keep) < len(self._rows) or joined:
            parts = ([self._cache.select(keep)] if keep else []) + [c for _, c in joined]
            self._cache = type(parts[0]).cat(parts) if parts else None
            self._rows = [self._rows[i] for i in keep] + [st for st, _ in joined]

    def _push_recomputed(self, st: TextStream) -> None:
        """One token for ``st`` from a pass over its last ``block_size`` tokens, without a cache."""
        idx = torch.tensor([st.seq[-self.block_size:]], dtype=torch.long, device=self.device)
        st.push(_sample(_last_logits(self.model(idx)), [st])[0])

    def open_stream(self, request: GenRequest, on_token: Callable[[str], None] | None = None) -> TextStream:
        """A ``TextStream`` for ``request``; a prompt that encodes to no tokens is a ``ValueError``."""
        ids = self.tokenizer.encode(request.prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; send some text")
        return TextStream(request, ids, self.tokenizer, on_token)

    def generate(self, requests: Sequence[GenRequest],
                 on_token: Sequence[Callable[[str], None] | None] | None = None) -> list[GenResult]:
        """Generate for all requests together; rows whose contexts have the same length share a
        forward pass (see ``_steps``). ``on_token[i]``, when given, gets request i's text pieces."""
        streams = []
        for i, r in enumerate(requests):
            try:
                streams.append(self.open_stream(r, on_token[i] if on_token is not None else None))
            except ValueError as exc:
                raise ValueError(f"request {i}: {exc}") from None
        active = [i for i, st in enumerate(streams) if not st.done]
        with self._lock, torch.inference_mode():
            while active:
                for rows in self._steps(active, streams):
                    ctx = torch.tensor([streams[i].seq[-self.block_size:] for i in rows], dtype=torch.long,
                                       device=self.device)
                    logits = _last_logits(self.model(ctx))
                    toks = _sample(logits, [streams[i] for i in rows])
                    for i, tok in zip(rows, toks):
                        streams[i].push(tok)
                active = [i for i in active if not streams[i].done]
        return [st.result() for st in streams]

    def _steps(self, active: list[int], streams: Sequence[TextStream]) -> list[list[int]]:
        """The row groups to advance by one token now. Without padding only rows of equal context
        length can share a pass; so a group waits while some shorter group can still catch up with
        it before finishing, and every other group (the shortest always) advances."""
        by_len: dict[int, list[int]] = {}
        for i in active:
            by_len.setdefault(min(len(streams[i].seq), self.block_size), []).append(i)
        left = {n: max(streams[i].request.max_new_tokens - len(streams[i].new) for i in rows)
                for n, rows in by_len.items()}
        lengths = sorted(by_len)
        return [by_len[n] for n in lengths if not any(left[m] > n - m for m in lengths if m < n)]


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts; retry later."""


class ShuttingDown(RuntimeError):
    """The server stopped before the request ran."""


_STOP = object()


BATCHING = ("continuous", "static")


class Batcher:
    """Runs concurrent requests together on one thread, up to ``max_batch_size`` at a time;
    ``max_batch_size=1`` = unbatched (one request after the other).

    ``mode="continuous"`` (the default; for a generator with ``step``, e.g. ``ModelGenerator``): a
    request joins the running batch at the next engine step and leaves it as soon as it is done;
    every step makes one token for every running request (``ModelGenerator.step``), and ``on_batch``
    is called per step. ``mode="static"`` (earlier labkit's engine, and the only one for a generator
    with just ``generate``): requests are collected into a batch, waiting at most ``max_wait_ms``
    for companions while traffic overlaps, and the batch runs to its end before the next one starts;
    ``on_batch`` is called per batch."""

    def __init__(self, generator: Generator, *, max_batch_size: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256, on_batch: Callable[[int, int, float], None] | None = None,
                 mode: str | None = None):
        if mode not in (None, *BATCHING):
            raise ValueError(f"Batcher(mode={mode!r}); valid: {', '.join(BATCHING)}")
        # continuous where the generator can step; one with only generate() runs static batches
        self.mode = "continuous" if mode != "static" and callable(getattr(generator, "step", None)) else "static"
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with (batch size, new tokens, seconds)
        self._q: queue.Queue = queue.Queue()
        loop = self._loop_continuous if self.mode == "continuous" else self._loop
        self._thread = threading.Thread(target=loop, name="labkit-serve-batcher", daemon=True)
        self._closed = False
        self._last_size = 0
        self._running = 0
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests waiting to run."""
        return self._q.qsize()

    @property
    def running(self) -> int:
        """Requests in the running batch now."""
        return self._running

    def submit(self, request: GenRequest, on_token: Callable[[str], None] | None = None) -> Future:
        """Queue one request; the future resolves to its ``GenResult``.

        ``on_token(piece)`` is called on the engine thread, in order, as text is generated; the
        pieces join to ``result.text`` exactly (see ``TextStream``). An ``on_token`` that raises ends
        its request: the future gets that exception (e.g. a streaming client went away)."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._q.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting (max_queue); retry later")
        fut: Future = Future()
        self._q.put((request, fut, on_token))
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
            batch = [item for item in batch if item[1].set_running_or_notify_cancel()]
            self._last_size = len(batch)
            if batch:
                self._run(batch)
            if stop:
                return

    def _admit(self, running: list, stopping: bool) -> tuple[list, bool]:
        """The requests that join the running batch at this step (waiting for one when none runs)."""
        joining: list[tuple] = []
        stopping = stopping or self._closed  # stop() fails the waiting ones; only the running finish
        while not stopping and len(running) + len(joining) < self.max_batch_size:
            try:
                item = self._q.get() if not running and not joining else self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stopping = True
                break
            req, fut, cb = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                joining.append((self.generator.open_stream(req, cb), fut))
            except Exception as exc:  # e.g. an empty prompt: only this request fails
                fut.set_exception(exc)
        return joining, stopping

    def _loop_continuous(self) -> None:
        running: list[tuple] = []  # (TextStream, Future) of the requests in the running batch
        stopping = False
        while running or not stopping:
            joining, stopping = self._admit(running, stopping)
            if not running and not joining:
                continue
            rows = running + joining
            self._running = len(rows)
            before = sum(len(st.new) for st, _ in rows)
            t0 = time.perf_counter()
            try:
                self.generator.step([st for st, _ in joining])
            except Exception as exc:  # the model failed: every row of this step fails with it
                for _, fut in rows:
                    fut.set_exception(exc)
                running, self._running = [], 0
                continue
            seconds = time.perf_counter() - t0
            running = [(st, fut) for st, fut in rows if not st.done]
            self._running = len(running)
            if self.on_batch is not None:  # counted before any caller is answered
                self.on_batch(len(rows), sum(len(st.new) for st, _ in rows) - before, seconds)
            for st, fut in rows:
                if st.done:
                    if st.error is not None:
                        fut.set_exception(st.error)
                    else:
                        fut.set_result(st.result())

    def _run(self, batch: list[tuple]) -> None:
        t0 = time.perf_counter()
        self._running = len(batch)
        errors: list[list[BaseException]] = [[] for _ in batch]
        try:
            if getattr(self.generator, "streams", False):
                callbacks = [_guarded(cb, err) for (_, _, cb), err in zip(batch, errors)]
                results = self.generator.generate([r for r, _, _ in batch], on_token=callbacks)
            else:
                results = self.generator.generate([r for r, _, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                self._running = 0
                batch[0][1].set_exception(exc)
                return
            for item in batch:  # one bad request must not fail its companions: run them one by one
                self._run([item])
            return
        finally:
            self._running = 0
        seconds = time.perf_counter() - t0
        # counted before any caller is answered: a /metrics read right after a response includes it
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(r.new_tokens for r in results), seconds)
        streamed = getattr(self.generator, "streams", False)
        for (_, fut, cb), res, err in zip(batch, results, errors):
            if cb is not None and not streamed and res.text:
                _guarded(cb, err)(res.text)  # a generator that cannot stream: one piece at the end
            if err:
                fut.set_exception(err[0])
            else:
                fut.set_result(res)


def _guarded(on_token: Callable[[str], None] | None, errors: list) -> Callable[[str], None] | None:
    """``on_token`` that records its first exception in ``errors`` and is not called after it."""
    if on_token is None:
        return None

    def call(piece: str) -> None:
        if errors:
            return
        try:
            on_token(piece)
        except Exception as exc:
            errors.append(exc)
    return call
