"""Speed ladder: tokens/s of labkit's GPT as fp32 -> bf16 autocast -> fused AdamW -> torch.compile -> larger micro-batch.

    python -m bench.ladder            # the GPT of bench.train (4 layers, 4 heads, 128 dims, T=128, B=16)
    python -m bench.ladder --quick    # toy sizes (a smoke test, not a measurement)

Each rung adds one change to the rung before it, and every rung trains on the same effective batch
(32 sequences an optimizer step: micro-batch 16 x 2 accumulation steps, the last rung 32 x 1). Where
bf16 is emulated (no AVX512-BF16 / AMX) its rung is measured but the rungs after it climb on from
fp32, the faster of the two (``labkit.model.bf16_is_fast``, the same choice ``precision="auto"`` makes). All
rungs are built first and timed interleaved, round by round, in ONE run, so load from other
processes hits them alike; the figures are ratios to the fp32 rung (and to the rung before).
torch.compile's compile time is reported apart from its tokens/s (the last rung's new micro-batch
shape compiles again). The CPU flags come first: without AVX512-BF16 / AMX, bf16 matmuls are
emulated and bf16 autocast is slower than fp32; a rung that cannot run (no C++ compiler for
torch.compile's CPU code) is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
QUICK = dict(n_layer=1, n_head=2, n_embd=32, block_size=32)
EFFECTIVE_BATCH = 32
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder: what it changes, and the settings it trains with."""

    name: str
    precision: str = "float32"
    fused: bool = False
    compile: bool = False
    micro_batch: int = 16
    why_slower: str = ""   # what to say when it is slower than the rung before on this CPU


RUNGS = (
    Rung("fp32"),
    Rung("bf16 autocast", precision="bfloat16",
         why_slower="bf16 autocast: this CPU has no AVX512-BF16 / AMX, so bf16 matmuls are emulated "
                    "(converted to fp32 and back) and the casts cost more than they save"),
    Rung("fused AdamW", precision="bfloat16", fused=True,
         why_slower="fused AdamW: one kernel over all parameters instead of foreach's few; the optimizer "
                    "is a small part of this step, so a ratio below 1 is mostly other processes' load "
                    "(few timed steps: re-run with --rounds 4)"),
    Rung("torch.compile", precision="bfloat16", fused=True, compile=True,
         why_slower="torch.compile: its generated CPU code fuses elementwise ops but not the matmuls, "
                    "which dominate here"),
    Rung("micro-batch 32 x 1", precision="bfloat16", fused=True, compile=True, micro_batch=32,
         why_slower="larger micro-batch: on 2 cores the matmuls are already large enough to keep them busy"),
)


def cpu_flags_line() -> str:
    """Which of the flags that decide bf16 and vector speed this CPU has."""
    from labkit.model import cpu_flags

    have = cpu_flags()
    return "cpu flags: " + ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in FLAGS)


def can_compile() -> str | None:
    """None when torch.compile can build CPU code here, else why not."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler on PATH (torch.compile's inductor writes C++ for the CPU): install g++"
    return None


def climbing(rungs: tuple[Rung, ...] = RUNGS, fast_bf16: bool | None = None) -> tuple[Rung, ...]:
    """The rungs as run here: after the bf16 rung, float32 where this CPU only emulates bf16."""
    from dataclasses import replace

    from labkit.model import bf16_is_fast

    fast = bf16_is_fast("cpu") if fast_bf16 is None else fast_bf16
    return tuple(r if fast or not (r.fused or r.compile or r.micro_batch != 16) else replace(r, precision="float32")
                 for r in rungs)


def build(rung: Rung, vocab: int, shape: dict) -> tuple[Callable[[list], float], Any]:
    """The rung's model and optimizer (same seed for all) and a function doing one optimizer step."""
    from labkit.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, precision=rung.precision, **shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if rung.fused else {"foreach": True}))
    call = torch.compile(model, dynamic=False) if rung.compile else model

    def step(micro_batches: list) -> float:
        total = 0.0
        for x, y in micro_batches:
            _, loss = call(x, y)
            (loss / len(micro_batches)).backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total) / len(micro_batches)

    return step, model


def data(data_dir: Path, steps: int, block: int) -> list[torch.Tensor]:
    """``steps`` batches of EFFECTIVE_BATCH rows (x and y stacked), split later per rung."""
    from labkit.train import batch_rows, open_data

    train, _ = open_data(data_dir)
    return [batch_rows(train, block, 0, s, EFFECTIVE_BATCH, 0, EFFECTIVE_BATCH) for s in range(steps)]


def split(batch: tuple[torch.Tensor, torch.Tensor], micro: int) -> list:
    """One step's rows as micro-batches of ``micro``."""
    x, y = batch
    return list(zip(x.split(micro), y.split(micro)))


def run(data_dir: Path, quick: bool = False, rounds: int = 2, steps_per_round: int = 1,
        rungs: tuple[Rung, ...] = RUNGS, compile_rungs: bool = True) -> list[dict]:
    """Each rung's tokens/s (median over interleaved rounds), warm-up/compile seconds, or why skipped."""
    shape = QUICK if quick else SHAPE
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    batches = data(data_dir, 1 + rounds * steps_per_round, shape["block_size"])
    no_compile = can_compile()
    live, rows = [], []
    for rung in rungs:
        row: dict[str, Any] = {"rung": rung.name, "precision": rung.precision, "micro_batch": rung.micro_batch,
                               "grad_accum": EFFECTIVE_BATCH // rung.micro_batch}
        rows.append(row)
        if rung.compile and (no_compile or not compile_rungs):
            row["skipped"] = no_compile or "--no-compile given"
            continue
        print(f"warming {rung.name} ({rung.precision}) ...", flush=True)
        step, _ = build(rung, vocab, shape)
        t0 = time.perf_counter()
        try:
            for b in batches[:1]:  # warm: the first step allocates (and compiles, for torch.compile)
                step(split(b, rung.micro_batch))
        except Exception as exc:  # a compiler that fails on this machine: say why, go on
            row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        row["warmup_s"] = time.perf_counter() - t0
        row["times"] = []
        live.append((rung, step, row))
    for r in range(rounds):  # interleaved
        for rung, step, row in live:
            t0 = time.perf_counter()
            for b in batches[1 + r * steps_per_round: 1 + (r + 1) * steps_per_round]:
                step(split(b, rung.micro_batch))
            row["times"].append(time.perf_counter() - t0)
    tokens = steps_per_round * EFFECTIVE_BATCH * shape["block_size"]
    for _, _, row in live:
        row["tokens_per_s"] = tokens / statistics.median(row["times"])
    base = rows[0].get("tokens_per_s")
    plain_warm = rows[0].get("warmup_s", 0.0)
    last: dict[str, float] = {}  # precision -> tokens/s of the last rung in it: what the next one climbs from
    for rung, row in zip(rungs, rows):
        if "tokens_per_s" not in row:
            continue
        row["vs_fp32"] = row["tokens_per_s"] / base
        row["vs_previous"] = row["tokens_per_s"] / last.get(rung.precision, base)
        if rung.compile:  # the warm-up step's time above a plain rung's: what compiling cost
            row["compile_s"] = max(0.0, row["warmup_s"] - plain_warm)
        last[rung.precision] = row["tokens_per_s"]
    return rows


def report(rows: list[dict], rungs: tuple[Rung, ...] = RUNGS) -> str:
    """The ladder as text: tokens/s, ratio to fp32 and to the rung before, compile seconds, and a
    line for each rung that is slower than the one before on this CPU (or skipped), saying why."""
    lines = [f"{'rung':<20} {'precision':<9} {'micro x accum':>13} {'tokens/s':>10} {'vs fp32':>8} {'vs prev':>8} {'compile s':>10}"]
    notes = []
    for rung, r in zip(rungs, rows):
        shape = f"{r['micro_batch']} x {r['grad_accum']}"
        if "skipped" in r:
            lines.append(f"{r['rung']:<20} {r['precision']:<9} {shape:>13} {'skipped':>10}")
            notes.append(f"skipped {r['rung']}: {r['skipped']}")
            continue
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        lines.append(f"{r['rung']:<20} {r['precision']:<9} {shape:>13} {r['tokens_per_s']:>10,.0f} {r['vs_fp32']:>8.2f} "
                     f"{r['vs_previous']:>8.2f} {comp:>10}")
        if r["vs_previous"] < 0.97 and rung.why_slower:
            notes.append(f"slower on this CPU ({r['vs_previous']:.2f}x the rung before): {rung.why_slower}")
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ladder", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (a smoke test, not a measurement)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (default 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rungs")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    from labkit.data.shards import make_tiny_shards

    print(cpu_flags_line(), f"; torch {torch.__version__}, {torch.get_num_threads()} threads", sep="")
    print(f"effective batch {EFFECTIVE_BATCH} sequences of T={(QUICK if args.quick else SHAPE)['block_size']} a step; "
          "each rung adds its change to the rung before")
    rungs = climbing()
    if rungs != RUNGS:
        print("bf16 is emulated on this CPU: its rung is measured, the rungs after it climb on from fp32")
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        make_tiny_shards(Path(tmp) / "shards")
        rows = run(Path(tmp) / "shards", quick=args.quick, rounds=1 if args.quick else args.rounds,
                   rungs=rungs, compile_rungs=not args.no_compile)
    print(report(rows, rungs))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
