"""Serving engine: KV cache vs recompute, and continuous vs static batching vs unbatched, in one run.

    python -m bench.serve                    # small GPT (4 layers x 128), 1/16/64 clients
    python -m bench.serve --levels 1,4 --new-tokens 64 --requests 8   # quicker

(a) One request, ``--long-tokens`` (512) new tokens: the engine without a KV cache (today's
    ``ModelGenerator.generate``: every token recomputes the whole context) against the KV-cache
    path (``ModelGenerator.step``: one prefill, then one token per pass). Goal: >= 5x tokens/s.
(b) N concurrent clients (closed loop: each sends its next request when its previous one is
    answered) against three engines, all on the same model and thread count:
    ``unbatched`` (KV cache, ``max_batch_size=1``), ``static`` (labkit's engine before issue 18:
    whole batches, recompute, only rows of equal length share a pass) and ``continuous`` (KV
    cache; a request joins the running batch at the next step, a finished one leaves at once).
    Prompts have different lengths, as real traffic does. Per engine: generated tokens/s, time to
    first token (submit -> first streamed piece) and inter-token latency (gaps between pieces)
    at p50/p95. Goals: continuous >= 3x static's tokens/s at 64 clients, and p95 TTFT no worse
    than static's at 16. Every request's text must be the same in all engines (seeded sampling).

The engine runs in this process (``Batcher`` + ``on_token``), without HTTP: HTTP adds the same
cost per request to every engine, and tests/test_serve*.py cover that path. The tokenizer maps a
byte to one Latin-1 character, so every token is one streamed piece (no UTF-8 held back) and the
latencies are per token. The model has random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import torch

from bench.train import cpu_summary
from labkit.model import GPT, GPTConfig
from labkit.serve.engine import Batcher, GenRequest, ModelGenerator
from labkit.serve.metrics import percentile

MODELS = {  # name -> GPTConfig fields; vocabulary 256 (byte tokens)
    "small": dict(n_layer=4, n_head=4, n_embd=128),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32),
}
ENGINES = ("unbatched", "static", "continuous")
PROMPT = "The quick brown fox jumps over the lazy dog; a cluster runs many jobs at once. "


class Latin1Tokenizer:
    """One byte = one token = one character (Latin-1), so every generated token is one piece."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("latin-1", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("latin-1")


def make_generator(model: str, block_size: int) -> ModelGenerator:
    """A random GPT of size ``model`` (fixed seed) with the Latin-1 byte tokenizer, in float32."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    cfg = GPTConfig(**MODELS[model], block_size=block_size, vocab_size=256, precision="float32")
    gpt = GPT(cfg).eval()
    torch.random.set_rng_state(state)
    return ModelGenerator(gpt, Latin1Tokenizer(), name=f"GPT {cfg.n_layer} layers x {cfg.n_embd}")


def kv_vs_recompute(gen: ModelGenerator, new_tokens: int, prompt_chars: int = 64, repeats: int = 2) -> dict:
    """(a): one request of ``new_tokens`` tokens, recomputed vs over the KV cache; the two alternate
    ``repeats`` times and each keeps its best time (the machine's other load only slows runs down)."""
    req = GenRequest(PROMPT[:prompt_chars], new_tokens, 1.0, None, 1)
    gen.generate([GenRequest(req.prompt, 4)])  # warm up
    best = {"recompute": float("inf"), "cache": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain = gen.generate([req])[0]
        t1 = time.perf_counter()
        st = gen.open_stream(req)
        with torch.inference_mode():
            gen.step([st])
            while not st.done:
                gen.step()
        t2 = time.perf_counter()
        best = {"recompute": min(best["recompute"], t1 - t0), "cache": min(best["cache"], t2 - t1)}
    cached = st.result()
    return {"new_tokens": new_tokens, "prompt_tokens": plain.prompt_tokens, "repeats": repeats,
            "recompute_tok_s": plain.new_tokens / best["recompute"], "cache_tok_s": cached.new_tokens / best["cache"],
            "same_text": plain == cached}


@dataclass
class _Trace:
    """Timestamps of one request: submitted, and each streamed piece."""

    sent: float
    pieces: list[float] = field(default_factory=list)


def run_clients(gen: ModelGenerator, engine: str, clients: int, requests: int, new_tokens: int,
                max_batch_size: int, max_wait_ms: float) -> tuple[dict, list[str]]:
    """(b) for one engine and one number of closed-loop clients; returns (summary row, texts)."""
    batcher = Batcher(gen, max_batch_size=1 if engine == "unbatched" else max_batch_size,
                      max_wait_ms=max_wait_ms, mode="static" if engine == "static" else "continuous")
    total = max(requests, clients)
    traces: list[_Trace | None] = [None] * total
    texts: list[str] = [""] * total
    nxt = iter(range(total))
    lock, finished = threading.Lock(), threading.Event()
    left = [total]

    def send() -> None:
        with lock:
            i = next(nxt, None)
        if i is None:
            return
        # 7 prompt lengths (8..62 bytes): rows of different lengths, as real traffic sends
        req = GenRequest(PROMPT[: 8 + 9 * (i % 7)], new_tokens, 1.0, None, i)
        traces[i] = tr = _Trace(time.perf_counter())
        fut = batcher.submit(req, on_token=lambda piece, tr=tr: tr.pieces.append(time.perf_counter()))
        fut.add_done_callback(lambda f, i=i: done(i, f))

    def done(i: int, fut: Future) -> None:
        texts[i] = fut.result().text if fut.exception() is None else f"error: {fut.exception()!r}"
        with lock:
            left[0] -= 1
            if not left[0]:
                finished.set()
        send()  # this client's next request

    t0 = time.perf_counter()
    for _ in range(clients):
        send()
    finished.wait()
    seconds = time.perf_counter() - t0
    batcher.stop()
    ttft = [1000 * (t.pieces[0] - t.sent) for t in traces]
    itl = [1000 * (b - a) for t in traces for a, b in zip(t.pieces, t.pieces[1:])]
    tokens = sum(len(t.pieces) for t in traces)
    row = {"engine": engine, "clients": clients, "requests": total, "tokens_per_s": tokens / seconds,
           "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
           "itl_p50_ms": percentile(itl, 50), "itl_p95_ms": percentile(itl, 95)}
    return row, texts


def run(levels=(1, 16, 64), requests: int = 64, new_tokens: int = 32, long_tokens: int = 512,
        model: str = "small", max_batch_size: int | None = None, max_wait_ms: float = 5.0,
        threads: int = 1) -> dict:
    """(a) and (b); returns ``{"cpu", "threads", "model", "kv", "rows", "ratios", "same_texts"}``.
    The engines alternate level by level, so a change in the machine's load hits all alike."""
    torch.set_num_threads(threads)
    gen = make_generator(model, block_size=max(128, long_tokens + 80))
    kv = kv_vs_recompute(gen, long_tokens)
    batch = max_batch_size or max(levels)
    rows, texts = [], {}
    run_clients(gen, "continuous", 2, 2, 2, batch, max_wait_ms)  # warm up
    for n, c in enumerate(levels):
        for engine in (ENGINES if n % 2 == 0 else ENGINES[::-1]):
            row, texts[engine, c] = run_clients(gen, engine, c, requests, new_tokens, batch, max_wait_ms)
            rows.append(row)
    by = {(r["engine"], r["clients"]): r for r in rows}
    ratios = {}
    for c in levels:
        cont = by["continuous", c]
        for base in ("static", "unbatched"):
            b = by[base, c]
            ratios[c, base] = {k: cont[k] / b[k] for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms",
                                                              "itl_p50_ms", "itl_p95_ms") if b[k]}
    same = all(texts["continuous", c] == texts[e, c] for c in levels for e in ENGINES)
    info = gen.info()
    return {"cpu": cpu_summary(), "threads": threads, "model": info, "kv": kv, "rows": rows, "ratios": ratios,
            "same_texts": same and kv["same_text"], "levels": tuple(levels), "new_tokens": new_tokens,
            "max_batch_size": batch}


def report(result: dict) -> str:
    """The tables and the ratios, as text."""
    m, kv = result["model"], result["kv"]
    lines = [f"CPU: {result['cpu']}; torch threads: {result['threads']}",
             f"model: {m['model']} ({m['parameters']:,} parameters, block_size {m['block_size']}, byte tokens, "
             f"{m['device']})", "",
             f"(a) one request, {kv['prompt_tokens']} prompt + {kv['new_tokens']} new tokens, best of "
             f"{kv['repeats']}: recompute "
             f"{kv['recompute_tok_s']:.0f} tok/s, KV cache {kv['cache_tok_s']:.0f} tok/s: "
             f"KV cache / recompute x{kv['cache_tok_s'] / kv['recompute_tok_s']:.2f} (goal >= 5); "
             f"same text: {kv['same_text']}", "",
             f"(b) closed-loop clients, {result['new_tokens']} new tokens per request, prompts of 8-62 bytes, "
             f"max_batch_size {result['max_batch_size']}",
             f"{'clients':>7} {'engine':>10} {'requests':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
             f"{'ITL p50':>8} {'ITL p95':>8}  (ms)"]
    by = {(r["engine"], r["clients"]): r for r in result["rows"]}
    for c in result["levels"]:
        for e in ENGINES:
            r = by[e, c]
            lines.append(f"{c:>7} {e:>10} {r['requests']:>8} {r['tokens_per_s']:>8.0f} {r['ttft_p50_ms']:>9.1f} "
                         f"{r['ttft_p95_ms']:>9.1f} {r['itl_p50_ms'] or 0:>8.2f} {r['itl_p95_ms'] or 0:>8.2f}")
    lines += ["", "continuous / static and continuous / unbatched (tokens/s: higher is better; latencies: lower):"]
    for c in result["levels"]:
        for base in ("static", "unbatched"):
            q = result["ratios"][c, base]
            lines.append(f"  {c:>2} clients vs {base:>9}: tokens/s x{q['tokens_per_s']:.2f}, TTFT p50 "
                         f"x{q.get('ttft_p50_ms', 0):.2f}, p95 x{q.get('ttft_p95_ms', 0):.2f}, ITL p50 "
                         f"x{q.get('itl_p50_ms', 0):.2f}, p95 x{q.get('itl_p95_ms', 0):.2f}")
    lines.append(f"same texts in every engine (and with and without the KV cache): {result['same_texts']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,16,64", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=64, help="requests per level and engine (at least one per client)")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per request in (b)")
    ap.add_argument("--long-tokens", type=int, default=512, help="new tokens of the one request in (a)")
    ap.add_argument("--max-batch-size", type=int, help="for static and continuous; default: the most clients")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="static batching's wait for companions")
    ap.add_argument("--model", default="small", choices=sorted(MODELS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (labkit serve's tiny/binder scales use 1)")
    a = ap.parse_args(argv)
    levels = tuple(int(x) for x in a.levels.split(","))
    result = run(levels, a.requests, a.new_tokens, a.long_tokens, a.model, a.max_batch_size, a.max_wait_ms,
                 a.threads)
    print(report(result))
    return 0 if result["same_texts"] else 1


if __name__ == "__main__":
    sys.exit(main())
