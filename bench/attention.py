"""Online-softmax attention against naive and SDPA, measured in the same run, printed as ratios.

    python -m bench.attention            # T=2048, B=4, H=8, d=64, causal, float32 (the targets)
    python -m bench.attention --seq-len 256 --batch 1 --heads 2   # a quick look

Targets: forward peak memory <= 0.10 x naive; forward time <= 1.5 x SDPA;
forward + backward peak memory <= 0.20 x naive. Exit status 1 when one is missed.

Threads: ``--threads 1`` by default. The online version is a Python loop issuing ~10 torch ops per
block; each multi-threaded op ends at a barrier, and on a shared, oversubscribed CPU a descheduled
thread stalls every one of them, while SDPA is a single fused op. Pass ``--threads N`` on a quiet
machine to compare with more threads (and a larger ``--block-size``, which means fewer ops).
"""

from __future__ import annotations

import argparse
import sys

import torch

from labkit.attention_cost import CostConfig, attention_fn, make_inputs, measure_one, time_interleaved

TARGETS = {"fwd_mem_vs_naive": 0.10, "fwd_time_vs_sdpa": 1.5, "train_mem_vs_naive": 0.20}


def run(seq_len=2048, batch=4, heads=8, head_dim=64, block_size=128, repeat=3, device="cpu") -> dict:
    """Measure and return the three ratios plus the raw points."""
    fwd = CostConfig(seq_lens=(seq_len,), batch=batch, heads=heads, head_dim=head_dim, causal=True,
                     block_size=block_size, repeat=1)  # times that matter come from time_interleaved
    train = fwd.replace(backward=True, repeat=1)
    pts = {(impl, False): measure_one(impl, seq_len, fwd, device) for impl in ("naive", "online", "sdpa")}
    pts.update({(impl, True): measure_one(impl, seq_len, train, device) for impl in ("naive", "online")})
    # forward time: online and SDPA called in turn, best of `repeat` rounds each (fair under shared load)
    q, k, v = make_inputs(batch, heads, seq_len, head_dim, device)
    fns = {impl: attention_fn(impl, True, block_size) for impl in ("online", "sdpa")}
    with torch.no_grad():
        best = time_interleaved({impl: (lambda f=f: f(q, k, v)) for impl, f in fns.items()}, max(repeat, 5), device)
    for impl in ("online", "sdpa"):
        pts[impl, False].seconds = best[impl]
    ratios = {
        "fwd_mem_vs_naive": pts["online", False].peak_bytes / pts["naive", False].peak_bytes,
        "fwd_time_vs_sdpa": best["online"] / best["sdpa"],
        "train_mem_vs_naive": pts["online", True].peak_bytes / pts["naive", True].peak_bytes,
    }
    return {"ratios": ratios, "points": pts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.seq_len, a.batch, a.heads, a.head_dim, a.block_size, a.repeat, a.device)
    print(f"attention, causal float32, B={a.batch} H={a.heads} T={a.seq_len} d={a.head_dim}, "
          f"block={a.block_size}, device={a.device}, threads={torch.get_num_threads()}")
    for (impl, bwd), p in res["points"].items():
        print(f"  {impl:>6} {'fwd+bwd' if bwd else 'fwd':>7}: {p.seconds * 1e3:9.1f} ms  peak {p.peak_mib:9.1f} MiB")
    print(f"  (peak memory via {next(iter(res['points'].values())).method})")
    ok = True
    for name, value in res["ratios"].items():
        hit = value <= TARGETS[name]
        ok &= hit
        print(f"  {name:>20} = {value:6.3f}  (target <= {TARGETS[name]})  {'ok' if hit else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
