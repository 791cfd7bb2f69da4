"""List labkit's benchmarks with their commands; run them only when asked.

    python -m bench                     # the list (imports nothing heavy, runs nothing)
    python -m bench attention prune     # run these, one after the other
    python -m bench --all               # run every one (many minutes; bench.cluster and bench.multinode need Slurm)

Each benchmark is a module ``bench/<name>.py`` run as ``python -m bench.<name>``; it prints ratios
against a baseline measured in the same run. The exit status of a run is 1 when any of them failed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent


def benchmarks(folder: Path = HERE) -> dict[str, str]:
    """Benchmark name -> the first line of its docstring, read without importing it."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem.startswith("_"):
            continue  # __init__, __main__ and helpers such as _torchrun_entry
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def listing(found: dict[str, str]) -> str:
    """The benchmarks as a table of commands and what each measures."""
    width = max(len(f"python -m bench.{n}") for n in found)
    lines = [f"{'command':<{width}}  what it measures"]
    lines += [f"{'python -m bench.' + n:<{width}}  {what}" for n, what in found.items()]
    lines += ["", "Each takes --help. Run some with `python -m bench NAME ...`, all with `python -m bench --all`."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    found = benchmarks()
    ap = argparse.ArgumentParser(prog="python -m bench", description="List labkit's benchmarks, or run them.")
    ap.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(found)}")
    ap.add_argument("--all", action="store_true", help="run every benchmark (many minutes; bench.cluster and bench.multinode need Slurm)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in found]
    if unknown:
        ap.error(f"no benchmark named {unknown[0]!r}; valid: {', '.join(found)}")
    chosen = list(found) if args.all else args.names
    if not chosen:
        print(listing(found))
        return 0
    results = []
    for name in chosen:
        print(f"\n=== python -m bench.{name}", flush=True)
        start = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=HERE.parent).returncode
        results.append((name, rc, time.monotonic() - start))
    print("\nbenchmark      exit   seconds")
    for name, rc, seconds in results:
        print(f"{name:<14} {rc:>4} {seconds:>9.0f}")
    return 1 if any(rc for _, rc, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
