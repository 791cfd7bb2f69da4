"""Binder budget: every notebook at ``binder`` scale with the ``binder`` profile on 1 CPU.

mybinder.org gives 1 CPU and 2 GB at most, so each notebook must finish in <= 5 min and the
peak memory of its kernel plus the processes it starts (Dask workers) must stay <= 1.5 GB.
This runs the notebooks with the machinery of ``labkit run``, pinned to one CPU (the affinity
is inherited by the kernel and its workers), and prints a table with ratios to the budget and
to a baseline measured in the same run: an empty notebook's kernel.

    python -m bench.binder                   # all notebooks
    python -m bench.binder 03 06 --cpu 1     # some of them, on CPU 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import nbformat

from labkit.lab.runner import RunOptions, RunResult, resolve_notebooks, run_notebooks
from labkit.settings import Memory

BUDGET_SECONDS = 300.0
BUDGET_MEMORY = Memory("1.5GB").bytes
MiB = 1024 * 1024


def pin_to_one_cpu(cpu: int | None) -> int | None:
    """Pin this process (and so the kernels and workers it starts) to one CPU, and one thread per library."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    if cpu not in available:
        raise SystemExit(f"CPU {cpu} is not available to this process; choose one of {available}")
    os.sched_setaffinity(0, {cpu})
    return cpu


def baseline(opts: RunOptions) -> RunResult:
    """An empty notebook (parameters cell only) run the same way: the cost of a kernel by itself."""
    with tempfile.TemporaryDirectory() as tmp:
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("scale = None\nprofile = None")
        cell.metadata["tags"] = ["parameters"]
        nb.cells = [cell, nbformat.v4.new_code_cell("import labkit")]
        path = Path(tmp) / "empty_kernel.ipynb"
        nbformat.write(nb, path)
        base_opts = RunOptions(**{**opts.__dict__, "output": Path(tmp) / "out"})
        [result] = run_notebooks([path], base_opts)
    return result


def table(results: Sequence[RunResult], base: RunResult) -> str:
    """The benchmark table: time and peak memory, against the budget and the empty-kernel baseline."""
    head = (
        f"{'notebook':<26} {'status':<7} {'time s':>7} {'/5 min':>7} {'x base':>7} {'cpu s':>7} {'/5 min':>7} "
        f"{'peak MiB':>9} {'/1.5 GB':>8} {'x base':>7} {'procs':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in [base, *results]:
        status = "base" if r is base else ("ok" if r.ok else ("error" if r.error else "over"))
        lines.append(
            f"{r.name:<26} {status:<7} {r.seconds:>7.1f} {r.seconds / BUDGET_SECONDS:>7.2f} "
            f"{r.seconds / max(base.seconds, 1e-9):>7.1f} {r.cpu_seconds:>7.1f} {r.cpu_seconds / BUDGET_SECONDS:>7.2f} "
            f"{r.peak_mib:>9.0f} {r.peak_bytes / BUDGET_MEMORY:>8.2f} "
            f"{r.peak_bytes / max(base.peak_bytes, 1):>7.1f} {r.processes:>5}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.binder", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebook names or numbers (default: all)")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU to pin to (default 0; -1: do not pin)")
    parser.add_argument("--scale", default="binder", help="scale (default binder; tiny for a smoke run)")
    parser.add_argument("--profile", default="binder", help="profile (default binder)")
    parser.add_argument("--output", type=Path, default=None, help="executed copies and report (default bench/results/binder-<time>)")
    parser.add_argument("--html", action="store_true", help="also write each executed notebook as NAME.html (previews)")
    args = parser.parse_args(argv)

    cpu = pin_to_one_cpu(None if args.cpu < 0 else args.cpu)
    paths = resolve_notebooks(args.notebooks)
    output = args.output or Path("bench/results") / _dt.datetime.now().strftime("binder-%Y%m%d-%H%M%S")
    opts = RunOptions(
        scale=args.scale, profile=args.profile, output=output,
        max_seconds=BUDGET_SECONDS, max_memory=BUDGET_MEMORY, timeout=int(BUDGET_SECONDS * 2), html=args.html,
    )
    print(f"Binder budget: scale={args.scale} profile={args.profile} cpu={'not pinned' if cpu is None else cpu}; "
          f"budget {BUDGET_SECONDS:.0f} s and {BUDGET_MEMORY / 1e9:.1f} GB per notebook (kernel + children)", flush=True)
    base = baseline(opts)
    results = run_notebooks(paths, opts, progress=lambda r: print(f"  ran {r.name}: {r.seconds:.0f} s", flush=True))
    print(table(results, base))
    print(f"memory: {base.memory_measure.upper()} summed over the kernel and its child processes; "
          "cpu s: user + system CPU time of the same processes (what a CPU of its own would need)")
    print(f"report: {Path(output) / 'report.html'}")
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"over budget or failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or len(results) < len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
