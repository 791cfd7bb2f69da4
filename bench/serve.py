"""Serving throughput and latency, batched versus unbatched, measured in the same run.

    python -m bench.serve                       # demo GPT, 1/4/16 clients, 64 requests per level
    python -m bench.serve --model small         # a 4-layer, 128-dim GPT (more compute per token)
    python -m bench.serve --checkpoint runs/... # a trained checkpoint

Each server runs in its own process (``python -m labkit serve``), so the client threads do not
share its interpreter. For each number of concurrent clients it prints requests/s, p50 and p95 latency for an unbatched
server (max_batch_size=1) and a batched one, and the ratios batched / unbatched. All requests use
a prompt of the same token length, so the batched server can stack them (it only batches prompts of
equal length, which keeps every answer identical to the unbatched one); the texts of both servers
are compared and must match.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from labkit.checkpoint import save
from labkit.model import GPT, GPTConfig
from labkit.serve import GenRequest, run_load

REPO = Path(__file__).resolve().parent.parent


def model_args(model: str, checkpoint: str | None, workdir: Path) -> list[str]:
    """``labkit serve`` arguments for the model: the demo GPT, a small random GPT, or a checkpoint."""
    if checkpoint:
        return [checkpoint]
    if model == "demo":
        return ["--demo"]
    if model == "small":
        torch.manual_seed(0)
        cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256, precision="float32")
        return [str(save(GPT(cfg), workdir / "small.pt"))]
    raise ValueError(f"unknown model {model!r}; valid: demo, small (or pass --checkpoint)")


@contextlib.contextmanager
def serve_process(args: list[str], workdir: Path, timeout: float = 120.0):
    """Run ``labkit serve ARGS`` in its own process; yields (url, token, health)."""
    token = secrets.token_urlsafe(16)
    url_file = workdir / f"url-{secrets.token_hex(4)}"
    env = {**os.environ, "LABKIT_SERVE_TOKEN": token,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", *args, "--port", "0", "--no-embed",
                             "--url-file", str(url_file)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not url_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"labkit serve did not start: {proc.communicate(timeout=10)[0][-2000:]}")
            time.sleep(0.1)
        url = url_file.read_text().strip()
        yield url, token, httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(30)


def engine_only(target: list[str], n: int = 16, max_new_tokens: int = 16, varied: bool = False) -> dict:
    """Without HTTP: ``n`` requests generated as one batch versus one at a time; ``varied`` gives
    the prompts lengths of 5 to 20 bytes (rows then catch up before sharing passes)."""
    from labkit.serve import demo_generator, load_generator

    torch.set_num_threads(1)
    gen = demo_generator() if target == ["--demo"] else load_generator(target[0])
    prompts = [("Once upon a time, " * 2)[: 5 + (7 * s) % 16] if varied else "Once upon a time" for s in range(n)]
    reqs = [GenRequest(p, max_new_tokens, 1.0, None, s) for s, p in enumerate(prompts)]
    gen.generate(reqs[:2])  # warm up
    t0 = time.perf_counter()
    batched = gen.generate(reqs)
    t1 = time.perf_counter()
    single = [gen.generate([r])[0] for r in reqs]
    t2 = time.perf_counter()
    return {"requests": n, "batched_s": t1 - t0, "one_by_one_s": t2 - t1, "same_texts": batched == single}


def run(levels=(1, 4, 16), requests: int = 64, max_new_tokens: int = 16, max_batch_size: int = 16,
        max_wait_ms: float = 5.0, model: str = "demo", checkpoint: str | None = None) -> dict:
    """Measure both servers at every level; returns ``{"rows", "same_texts", "model", "engine"}``.

    Both servers run at once and the modes alternate level by level, so a change in the machine's
    load during the run hits both alike."""
    modes = {"unbatched": ["--max-batch-size", "1"],
             "batched": ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]}
    rows, texts = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, contextlib.ExitStack() as stack:
        target = model_args(model, checkpoint, Path(tmp))
        engine = engine_only(target, n=max(levels), max_new_tokens=max_new_tokens)
        varied = engine_only(target, n=max(levels), max_new_tokens=max_new_tokens, varied=True)
        # binder limits: one torch thread, up to 128 new tokens
        servers = {mode: stack.enter_context(serve_process([*target, "--scale", "binder", *flags], Path(tmp)))
                   for mode, flags in modes.items()}
        for url, token, _ in servers.values():
            run_load(url, token, requests=4, concurrency=2, max_new_tokens=2)  # warm up
        for n, c in enumerate(levels):
            order = list(modes) if n % 2 == 0 else list(reversed(modes))
            for mode in order:
                url, token, _ = servers[mode]
                res = run_load(url, token, requests=max(requests, c), concurrency=c,
                               max_new_tokens=max_new_tokens, first_seed=0)
                rows.append({"mode": mode, **res.summary()})
                texts[mode, c] = res.texts
        info = servers["batched"][2]
    same = all(texts["batched", c] == texts["unbatched", c] for c in levels) and engine["same_texts"] \
        and varied["same_texts"]
    return {"rows": rows, "same_texts": same, "model": info, "engine": engine, "engine_varied": varied}


def report(result: dict, levels) -> str:
    """The table and the ratios, as text."""
    lines = [f"model: {result['model']['model']} ({result['model']['parameters']:,} parameters, "
             f"{result['model']['device']})", "",
             f"{'clients':>7} {'mode':>10} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}"]
    by = {(r["mode"], r["concurrency"]): r for r in result["rows"]}
    for c in levels:
        for mode in ("unbatched", "batched"):
            r = by[mode, c]
            lines.append(f"{c:>7} {mode:>10} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
                         f"{r['errors']:>6}")
    lines += ["", "batched / unbatched:"]
    for c in levels:
        u, b = by["unbatched", c], by["batched", c]
        lines.append(f"  {c:>2} clients: throughput x{b['requests_per_s'] / u['requests_per_s']:.2f}, "
                     f"p50 x{b['p50_ms'] / u['p50_ms']:.2f}, p95 x{b['p95_ms'] / u['p95_ms']:.2f}")
    for key, what in (("engine", "same prompt"), ("engine_varied", "prompts of 5-20 bytes")):
        e = result[key]
        lines.append(f"  engine alone (no HTTP), {e['requests']} requests, {what}: one batch "
                     f"{1000 * e['batched_s']:.0f} ms, one at a time {1000 * e['one_by_one_s']:.0f} ms: "
                     f"x{e['one_by_one_s'] / e['batched_s']:.2f}")
    lines.append(f"same texts batched and unbatched: {result['same_texts']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=64, help="requests per level and mode")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--model", default="demo", choices=("demo", "small"))
    ap.add_argument("--checkpoint")
    a = ap.parse_args(argv)
    levels = tuple(int(x) for x in a.levels.split(","))
    result = run(levels, a.requests, a.max_new_tokens, a.max_batch_size, a.max_wait_ms, a.model, a.checkpoint)
    print(report(result, levels))
    bad = sum(r["errors"] for r in result["rows"])
    return 0 if result["same_texts"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
