"""Memory per rank under DDP and FSDP on 2 and 4 ranks, measured, next to training_memory's ZeRO-0/3 estimate.

    python -m bench.memory            # a 7M-parameter GPT (4 layers, 384 dims), 2 and 4 ranks
    python -m bench.memory --quick    # toy sizes (a smoke test, not a measurement)

Each rank is a Dask worker of a LocalCluster (gloo on CPU). ``labkit.train_memory.memory_table`` runs
a warm-up step and one measured step per rank and reports, for the rank that peaked highest:

- **model states**: the bytes of the weights, gradients and AdamW state the rank holds, counted
  from its tensors, against ``training_memory(zero_stage=0)`` for DDP and ``zero_stage=3`` for FSDP
  with float32 sizes (4 + 4 + 8 bytes a parameter);
- **step peak**: what the rank holds at rest plus the most a step allocates above it, from
  ``torch.profiler(profile_memory=True)``, against the estimate's total (model states + activations).

Goals (issue 16): at 4 ranks FSDP's model states <= 0.4 of DDP's; measured / predicted model states
within 0.85-1.15. The step peak carries what the estimate leaves out (printed after the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

MiB = 2**20
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)


def run(quick: bool = False, world_sizes: tuple[int, ...] = (2, 4)) -> list[dict]:
    """The table's rows (``labkit.train_memory.memory_table``) for a GPT big enough that the model
    states outweigh the activations (or a toy one with ``quick``)."""
    from dask.distributed import Client, LocalCluster

    from labkit.data.shards import make_tiny_shards
    from labkit.train import TrainConfig
    from labkit.train_memory import memory_config, memory_table

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the workers' profiler: errors only, no start/stop lines

    base = TrainConfig().replace(max_steps=3, warmup_steps=1, device="cpu", num_threads=1)
    config = memory_config(base, **(QUICK if quick else {}))
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        data = Path(tmp) / "shards"
        make_tiny_shards(data)
        with LocalCluster(n_workers=max(world_sizes), threads_per_worker=1, dashboard_address="127.0.0.1:0",
                          memory_limit=0) as cluster, Client(cluster) as client:
            return memory_table(client, config, data, world_sizes=world_sizes)


def report(rows: list[dict], n_embd: int | None = None) -> str:
    """The table as text: MiB measured and predicted with their ratio (model states, activations,
    step peak), FSDP as a fraction of DDP, the goals, and what the estimate leaves out of the peak."""
    if n_embd is None:  # the measured GPT's (labkit.train_memory.MEMORY_SHAPE)
        from labkit.train_memory import MEMORY_SHAPE

        n_embd = MEMORY_SHAPE["n_embd"]
    lines = [f"GPT of {rows[0]['n_params']:,} parameters, float32, AdamW; the rank that peaked highest; MiB measured "
             "/ predicted (ratio)",
             f"{'ranks':>5} {'strategy':<8} {'model states':>22} {'activations':>20} {'step peak':>22} "
             f"{'FSDP/DDP: states':>16} {'peak':>5}"]
    cell = lambda r, k: (f"{r[k + '_measured'] / MiB:6.1f} /{r[k + '_predicted'] / MiB:6.1f} "  # noqa: E731
                         f"({r[k + '_ratio']:4.2f})")
    for r in rows:
        vs = f"{r['states_vs_ddp']:>16.2f} {r['peak_vs_ddp']:>5.2f}" if "states_vs_ddp" in r else ""
        lines.append(f"{r['ranks']:>5} {r['strategy']:<8} {cell(r, 'states'):>22} {cell(r, 'activations'):>20} "
                     f"{cell(r, 'peak'):>22} {vs}")
    four = [r for r in rows if r["ranks"] == 4 and r["strategy"] == "fsdp"]
    if four:
        lines.append(f"goal: FSDP/DDP model states at 4 ranks <= 0.40: {four[0]['states_vs_ddp']:.2f} "
                     f"({'met' if four[0]['states_vs_ddp'] <= 0.4 else 'NOT met'})")
    worst = max(abs(r["states_ratio"] - 1) for r in rows)
    lines.append(f"goal: measured / predicted model states within 0.85-1.15: the worst is {worst:.2f} off 1 "
                 f"({'met' if worst <= 0.15 else 'NOT met'})")
    lines.append("step peak above model states + activations (transient, not in the estimate), MiB: " + ", ".join(
        f"{r['strategy']}x{r['ranks']} {(r['peak_measured'] - r['states_measured'] - r['activations_measured']) / MiB:.1f}"
        for r in rows))
    block = (12 * n_embd * n_embd + 13 * n_embd) * 4 / MiB
    lines.append(f"  under FSDP, mostly the whole weights of a block gathered for its backward, its unsharded gradients "
                 f"and the next block's weights prefetched: 3 x {block:.1f} MiB (one block in float32) = {3 * block:.1f} "
                 "MiB; under DDP, the temporaries of the backward and of the optimizer step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (a smoke test, not a measurement)")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    rows = run(quick=args.quick)
    print(report(rows, QUICK["n_embd"] if args.quick else None))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
