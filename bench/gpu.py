"""The GPU paths in one short run, for a machine with a GPU (a few minutes on one H100):

    python -m bench.gpu                 # needs CUDA; prints a summary, then JSON
    python -m bench.gpu --device cpu    # the same code on the CPU at toy size (the smoke test runs this)

What a CPU-only development machine cannot measure, each as a ratio to a baseline taken in the same run:

1. the device: name, compute capability, memory, CUDA version, and whether ``precision="auto"``
   takes bf16 there (``labkit.model.bf16_is_fast``);
2. matmul throughput in float32, TF32 and bf16 (ratios to float32), device-memory copy bandwidth,
   and pinned host <-> device bandwidth;
3. attention on the device: labkit's formula and its online softmax against torch's SDPA, in float32
   and bf16: the largest difference from SDPA and the time ratio;
4. training in one process (``labkit.train.train``): float32 against ``precision="auto"`` (bf16
   autocast where it is fast), tokens/s ratio and the final losses;
5. distributed: one Dask worker holding the device, ``labkit.core.ranks.run_ranks`` (the backend it
   picks: nccl with a GPU, gloo without; an all-reduce on the device) and FSDP training through
   ``train_distributed`` with ``torch.profiler`` on two steps (the trace file and the per-step
   breakdown).

Without a GPU and without ``--device cpu`` it says so and exits 2 (nothing is measured on the wrong device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GPU_SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
GPU_BATCH = 32
TOY_SHAPE = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
TOY_BATCH = 4


def _time(fn: Any, device: str, repeats: int) -> float:
    """Median seconds of ``fn()``, the device synchronised (labkit.hardware.measure.median_time)."""
    from labkit.hardware.measure import median_time

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else None
    return median_time(fn, warmup=2, repeats=repeats, sync=sync)


def device_facts(device: str) -> dict[str, Any]:
    """What the device is and what ``precision="auto"`` makes of it."""
    from labkit.model import bf16_is_fast, cpu_bf16_speedup

    facts: dict[str, Any] = {"device": device, "torch": torch.__version__, "bf16_is_fast": bf16_is_fast(device)}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        facts |= {"name": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": props.total_memory / 2**30, "cuda": torch.version.cuda,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None}
    else:
        facts |= {"name": "CPU", "bf16_matmul_speedup": cpu_bf16_speedup()}
    return facts


def matmuls(device: str, n: int, repeats: int) -> dict[str, Any]:
    """Matmul TFLOP/s per dtype (ratios to float32) and memory bandwidths, via labkit.hardware.measure."""
    from labkit.hardware.measure import copy_bandwidth, host_device_bandwidth, matmul_throughput

    out: dict[str, Any] = {"n": n}
    dtypes = ("fp32", "tf32", "bf16") if device.startswith("cuda") else ("fp32", "bf16")
    for dtype in dtypes:
        r = matmul_throughput(device, dtype, n, repeats=repeats)
        out[f"{dtype}_tflops"] = r.flops_per_s / 1e12
    for dtype in dtypes[1:]:
        out[f"{dtype}_vs_fp32"] = out[f"{dtype}_tflops"] / out["fp32_tflops"]
    size = (1 << 30) if device.startswith("cuda") else (64 << 20)
    copy = copy_bandwidth(device, size, repeats=repeats)
    out["copy_gb_s"] = copy.bytes_per_s / 1e9
    if device.startswith("cuda"):
        h2d, d2h = host_device_bandwidth(device, 256 << 20, repeats=repeats)
        out["host_to_device_gb_s"], out["device_to_host_gb_s"] = h2d.bytes_per_s / 1e9, d2h.bytes_per_s / 1e9
    return out


def attention(device: str, shape: tuple[int, int, int, int], repeats: int) -> dict[str, Any]:
    """labkit's attention (formula, online softmax) against SDPA on ``device``: error and time ratio."""
    from labkit import attention as A

    B, H, T, D = shape
    out: dict[str, Any] = {"shape": list(shape)}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t_ref = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, repeats)
        name = str(dtype).replace("torch.", "")
        for label, fn in (("formula", A.scaled_dot_product_attention), ("online", A.online_softmax_attention)):
            y = fn(q, k, v, causal=True)
            out[f"{label}_{name}_max_abs_diff"] = (y.float() - ref.float()).abs().max().item()
            out[f"{label}_{name}_time_vs_sdpa"] = _time(lambda: fn(q, k, v, causal=True), device, repeats) / t_ref
    return out


def _config(shape: dict[str, int], batch: int, steps: int, precision: str, device: str, **extra: Any):
    from labkit.train import TrainConfig

    return TrainConfig().replace(**shape, batch_size=batch, max_steps=steps, warmup_steps=2, lr=1e-3, min_lr=1e-4,
                                 eval_interval=0, sample_tokens=0, checkpoint_dir=None, log_interval=10,
                                 precision=precision, device=device, **extra)


def training(data_dir: Path, device: str, shape: dict[str, int], batch: int, steps: int) -> dict[str, Any]:
    """labkit.train.train on ``device``: float32 against precision="auto", same seed and batches."""
    from labkit.model import autocast_dtype
    from labkit.train import train

    runs = {p: train(_config(shape, batch, steps, p, device), data_dir) for p in ("float32", "auto")}
    auto = autocast_dtype("auto", device)
    return {"auto_means": str(auto or torch.float32).replace("torch.", ""),
            "fp32_tokens_per_s": runs["float32"].tokens_per_s, "auto_tokens_per_s": runs["auto"].tokens_per_s,
            "auto_vs_fp32": runs["auto"].tokens_per_s / runs["float32"].tokens_per_s,
            "fp32_final_loss": runs["float32"].losses[-1], "auto_final_loss": runs["auto"].losses[-1]}


def _rank_probe(ctx: Any) -> dict[str, Any]:
    """One rank: the backend and device labkit gave it, and an all-reduce on that device."""
    import torch.distributed as dist

    x = torch.full((1024,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(x)
    return {"backend": ctx.backend, "process_group_backend": str(dist.get_backend()), "device": ctx.device,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "all_reduce_sum": x[0].item()}


def distributed(data_dir: Path, device: str, shape: dict[str, int], batch: int, steps: int,
                profile_dir: Path) -> dict[str, Any]:
    """One Dask worker with the device: run_ranks' backend choice, then FSDP training, profiled."""
    from dask.distributed import Client, LocalCluster

    from labkit.core.ranks import run_ranks
    from labkit.train import train_distributed

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        (probe,) = run_ranks(client, _rank_probe, workers=1, timeout=120)
        config = _config(shape, batch, steps, "auto", "auto", strategy="fsdp", profile_steps=(2, 3),
                         profile_ranks=(0,), profile_dir=str(profile_dir))
        result = train_distributed(client, config, data_dir, timeout=120)
    profile = result.profiles[0] if result.profiles else {}
    trace = profile.get("trace")
    return {"rank": probe, "fsdp_tokens_per_s": result.tokens_per_s, "fsdp_final_loss": result.losses[-1],
            "trace": trace, "trace_bytes": Path(trace).stat().st_size if trace and Path(trace).exists() else 0,
            "breakdown": profile.get("breakdown")}


def run(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """All five parts on ``device``; toy sizes with ``quick`` (or on CPU)."""
    from labkit.data.shards import make_tiny_shards

    toy = quick or not device.startswith("cuda")
    shape, batch = (TOY_SHAPE, TOY_BATCH) if toy else (GPU_SHAPE, GPU_BATCH)
    steps, repeats = (6, 3) if toy else (40, 10)
    data_dir = out_dir / "shards"
    make_tiny_shards(data_dir)
    report: dict[str, Any] = {"device": device_facts(device)}
    report["matmul"] = matmuls(device, 256 if toy else 8192, repeats)
    report["attention"] = attention(device, (1, 2, 128, 32) if toy else (4, 16, 2048, 64), repeats)
    report["training"] = training(data_dir, device, shape, batch, steps)
    report["distributed"] = distributed(data_dir, device, shape, batch, steps, out_dir / "profiles")
    return report


def summary(r: dict[str, Any]) -> list[str]:
    """The report as a few lines of ratios."""
    d, m, a, t, x = r["device"], r["matmul"], r["attention"], r["training"], r["distributed"]
    lines = [f"device: {d['name']} ({d['device']}; torch {d['torch']}"
             + (f", CUDA {d['cuda']}, capability {d['capability']}, {d['memory_gib']:.0f} GiB, NCCL {d['nccl']}"
                if "cuda" in d else "") + f"); precision='auto' takes bf16 here: {d['bf16_is_fast']}",
             f"matmul n={m['n']}: fp32 {m['fp32_tflops']:.2f} TFLOP/s; "
             + ", ".join(f"{k[:-8]} {v:.2f}x" for k, v in m.items() if k.endswith("_vs_fp32"))
             + f"; device copy {m['copy_gb_s']:.0f} GB/s"
             + (f"; host->device {m['host_to_device_gb_s']:.1f} GB/s, device->host {m['device_to_host_gb_s']:.1f} GB/s"
                if "host_to_device_gb_s" in m else "")]
    for dt in ("float32", "bfloat16"):
        lines.append(f"attention {a['shape']} {dt}: formula {a[f'formula_{dt}_time_vs_sdpa']:.2f}x SDPA's time "
                     f"(max diff {a[f'formula_{dt}_max_abs_diff']:.1e}), online softmax "
                     f"{a[f'online_{dt}_time_vs_sdpa']:.2f}x (max diff {a[f'online_{dt}_max_abs_diff']:.1e})")
    lines.append(f"training, one process: precision='auto' ({t['auto_means']}) {t['auto_vs_fp32']:.2f}x float32's "
                 f"tokens/s ({t['auto_tokens_per_s']:,.0f} vs {t['fp32_tokens_per_s']:,.0f}); final loss "
                 f"{t['auto_final_loss']:.3f} vs {t['fp32_final_loss']:.3f}")
    rank = x["rank"]
    lines.append(f"distributed: run_ranks chose {rank['backend']} (process group {rank['process_group_backend']}) "
                 f"on {rank['device']}, CUDA_VISIBLE_DEVICES={rank['cuda_visible_devices']}; FSDP "
                 f"{x['fsdp_tokens_per_s']:,.0f} tokens/s; trace {x['trace']} ({x['trace_bytes']:,} bytes)")
    for row in x["breakdown"] or []:
        lines.append("  profiled step " + ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in row.items() if k.endswith("_ms")))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the toy-size dry run")
    p.add_argument("--quick", action="store_true", help="toy sizes on the GPU too (a smoke test, not a measurement)")
    p.add_argument("--output", type=Path, default=None, help="folder for the shards and the profiler trace")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: torch sees no GPU here, so there is nothing to measure. Run it on a GPU node "
              "(e.g. `srun --gres=gpu:1 python -m bench.gpu`), or `--device cpu` for the toy-size dry run.")
        return 2
    with tempfile.TemporaryDirectory(prefix="labkit-gpu-") as tmp:
        out_dir = args.output or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = run(args.device, args.quick, out_dir)
        for line in summary(report):
            print(line)
        print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
