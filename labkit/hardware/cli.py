"""``labkit hardware``: the catalog and a run plan from the shell (e.g. on a login node before sbatch).

    labkit hardware catalog
    labkit hardware plan --model gpt3-13b --tokens 260e9 --gpu A100-80GB --gpus 64 --zero 1
"""

from __future__ import annotations

import argparse

from labkit.hardware.catalog import HardwareLookupError, catalog, networks
from labkit.hardware.estimate import GPT_PRESETS, EstimateError, GPTConfig, plan_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands ``catalog`` and ``plan``."""
    sub = parser.add_subparsers(dest="hardware_command", metavar="{catalog,plan}")
    sub.add_parser("catalog", help="accelerators and networks with their datasheet peaks and sources")
    p = sub.add_parser("plan", help="memory, time, communication, energy and storage of a training run")
    p.add_argument("--model", default="gpt2-xl", help=f"one of: {', '.join(GPT_PRESETS)}")
    p.add_argument("--tokens", type=float, default=30e9)
    p.add_argument("--gpu", default="A100-80GB", help="a catalog name (case and punctuation ignored)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--network", default="IB-HDR-200")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage 0-3 (3 = FSDP)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--checkpointing", action="store_true", help="full activation checkpointing")


def cli(args: argparse.Namespace) -> int:
    """Print the catalog or a plan; a bad name or size prints the valid choices and returns 2."""
    if args.hardware_command == "catalog":
        for a in catalog():
            peaks = ", ".join(f"{k} {v:g}" for k, v in a.peak_tflops.items())
            print(f"{a.name:16s} {peaks} TFLOP/s | {a.memory_GB:g} GB {a.memory_type} at {a.memory_bw_GBs:g} GB/s"
                  f" | PCIe Gen{a.pcie_gen}, {a.link} | {a.tdp_W:g} W\n{'':16s} source: {a.source}")
        for n in networks():
            print(f"{n.name:18s} {n.kind}, {n.bandwidth_Gbps:g} Gb/s, ~{n.latency_us:g} µs | source: {n.source}")
        return 0
    if args.hardware_command == "plan":
        try:
            plan = plan_run(GPTConfig.preset(args.model), args.tokens, args.gpu, args.gpus, mfu=args.mfu,
                            zero_stage=args.zero, network=args.network, micro_batch=args.micro_batch,
                            checkpointing=args.checkpointing)
        except (EstimateError, HardwareLookupError) as exc:
            print(f"error: {exc}")
            return 2
        width = max(len(k) for k, _ in plan.summary_rows())
        for what, value in plan.summary_rows():
            print(f"{what:{width}s}  {value}")
        return 0 if plan.memory.fits else 1
    print("usage: labkit hardware {catalog,plan} (see labkit hardware plan --help)")
    return 2
