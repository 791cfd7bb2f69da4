"""Soak test: execute notebooks again and again at tiny scale and count failures, stalls and nudges.

    python scripts/soak.py --rounds 30 02 04          # 30 runs of each, in turn
    python scripts/soak.py --rounds 5 --no-nudge --dump /tmp/dumps 02

``--no-nudge`` turns off the watchdog's kernel_info nudge, so a lost execute_reply shows as a stall;
``--dump DIR`` then writes ``py-spy dump`` of the kernel and of this process into DIR first (needs
py-spy: pip install py-spy). Prints one line per run and a summary; exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbformat  # noqa: E402

from labkit.lab.notebooks import execute_notebook  # noqa: E402
from labkit.lab.runner import resolve_notebooks  # noqa: E402


def py_spy_dumps(directory: Path, tag: str):
    """An on_stall hook that writes py-spy dumps of the kernel and of this client into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    def dump(client, watch) -> None:
        import zmq  # is the reply already waiting in this client's own socket (a missed wake-up here)?

        for name in ("shell", "iopub"):
            sock = getattr(client.kc, f"{name}_channel").socket
            waiting = bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)
            print(f"    client {name} socket: a message is {'WAITING unread' if waiting else 'not there'}", flush=True)
        for who, pid in (("kernel", client.km.provisioner.pid), ("client", os.getpid())):
            out = directory / f"{tag}-{who}-{pid}.txt"
            try:
                r = subprocess.run([exe, "dump", "--locals", "--pid", str(pid)], capture_output=True, text=True,
                                   timeout=60)
                out.write_text(f"# {watch.label}\n{r.stdout}{r.stderr}")
            except (OSError, subprocess.SubprocessError) as exc:  # a missing py-spy must not hide the stall
                out.write_text(f"# {watch.label}\npy-spy failed: {exc}")
            print(f"    py-spy dump of the {who} -> {out}", flush=True)

    return dump


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="names or numbers (default: all)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--no-nudge", action="store_true", help="never nudge: a lost reply becomes a stall")
    parser.add_argument("--stall-after", type=float, default=55.0)
    parser.add_argument("--dump", type=Path, default=None, help="folder for py-spy dumps at a stall")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the executed copy of each failed run")
    args = parser.parse_args(argv)
    paths = resolve_notebooks(args.notebooks)
    times: dict[str, list[float]] = {p.stem: [] for p in paths}
    failures, stalls, nudged, missed = [], [], [], []
    start = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        for path in paths:
            hook = py_spy_dumps(args.dump, f"{path.stem}-r{rnd}") if args.dump else None
            run = execute_notebook(path, {"scale": args.scale}, timeout=600, stall_after=args.stall_after,
                                   nudge_after=None if args.no_nudge else 5.0, on_stall=hook)
            times[path.stem].append(run.seconds)
            status = "ok" if run.ok else ("STALLED" if run.stopped else "FAILED")
            if not run.ok:
                (stalls if run.stopped else failures).append((rnd, path.stem, run.error[-800:]))
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    nbformat.write(run.notebook, args.keep / f"{path.stem}-r{rnd}.ipynb")
            if run.nudges:
                nudged.append((rnd, path.stem, run.nudges))
            extra = f"  nudged: {', '.join(run.nudges)}" if run.nudges else ""
            if run.missed_wakeups:
                missed.append((rnd, path.stem, run.missed_wakeups))
                extra += f"  missed zmq wake-ups found by the poll slices: {run.missed_wakeups}"
            print(f"round {rnd:3d} {path.stem:<26} {run.seconds:7.1f} s  {status}{extra}", flush=True)
            if not run.ok:
                print("    " + run.error[-800:].replace("\n", "\n    "), flush=True)
    print(f"\n{args.rounds} rounds of {len(paths)} notebook(s) in {time.monotonic() - start:.0f} s")
    for stem, ts in times.items():
        print(f"  {stem:<26} runs {len(ts):3d}  median {statistics.median(ts):6.1f} s  max {max(ts):6.1f} s")
    print(f"failures {len(failures)}, stalls {len(stalls)}, runs with a nudged cell {len(nudged)}, "
          f"runs with a missed zmq wake-up (found by the poll slices) {len(missed)}")
    return 1 if failures or stalls else 0


if __name__ == "__main__":
    raise SystemExit(main())
