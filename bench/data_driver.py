"""Benchmark of labkit.data: the driver's (notebook kernel's) peak memory and what it receives, this tree vs a git revision.

    python -m bench.data_driver                        # binder corpus, 2 workers, baseline = HEAD
    python -m bench.data_driver --baseline b1362ed     # the revision before workers wrote their own shards
    python -m bench.data_driver --scale workshop --mb 20

Each side runs ``preprocess`` of the scale's corpus on a fresh 2-worker ``LocalCluster`` in a
process of its own (the driver), twice: once for its peak RSS (``ru_maxrss`` of that process
only, the workers are other processes) and once under ``tracemalloc`` for the peak of Python and
NumPy allocations during ``preprocess`` alone. It also counts the pickled bytes of every task
result the driver received (``Future.result``), by type: the tokenizer's training sample
(``list`` of texts) reaches the driver on both sides; token ids only on the baseline. The baseline is the ``labkit`` package of ``--baseline`` (``git
archive``), run the same way in the same run; the shard hashes of both sides must agree.

Figures (2 cores, load average ~10 from other work, so the seconds mean little), baseline
b1362ed (the driver gathered every token array and wrote every shard), byte-identical shards:

    --scale binder (3.0 MB, 948,007 tokens)     before      after
      driver peak RSS                        110.0 MiB   109.7 MiB   (idle driver with cluster: 80.5)
      traced peak during preprocess            4.3 MiB     4.6 MiB
      received from tasks                     4.59 MiB    2.78 MiB   (token ids 1.81 MiB -> none)
    --scale workshop --mb 15 (4,104,169 tokens)
      driver peak RSS                        151.3 MiB   146.7 MiB
      traced peak during preprocess           21.8 MiB    21.3 MiB
      received from tasks                    19.96 MiB   12.13 MiB   (token ids 7.83 MiB -> none)

What is left on the driver is the tokenizer's training sample (``list``: 2.65 / 11.53 MiB of
texts), which it trains the BPE on; the old driver wrote arrays as they arrived in order, so its
peak grew with the arrays out of order, not with the corpus; what the change removes is every
token id passing through the driver (its network and disk bandwidth) and every shard write.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter with PYTHONPATH at one side's labkit; prints one JSON line.
CHILD = r'''
import json, os, pickle, resource, sys, time, tracemalloc
import psutil
from distributed import Client, LocalCluster
from labkit.data import DataConfig, preprocess
from labkit.data.sources import StdlibSource

scale, workers, trace, out, mb = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], float(sys.argv[5])
import distributed
received: dict = {}
result = distributed.Future.result  # every task result the driver takes comes through here


def counting(self, *a, **k):
    r = result(self, *a, **k)
    kind = type(r).__name__
    received[kind] = received.get(kind, 0) + len(pickle.dumps(r, protocol=5))
    return r


distributed.Future.result = counting
cfg = DataConfig.for_scale(scale)
sources = "stdlib" if mb <= 0 else [StdlibSource(include_tests=True, max_bytes=int(mb * 1e6))]
with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
        Client(cl) as client:
    client.run(lambda: __import__("tokenizers"))
    idle = psutil.Process().memory_info().rss
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    rep = preprocess(sources, out, client=client, config=cfg, progress=False)
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] if trace else None
meta = json.loads(open(os.path.join(out, "meta.json")).read())
print(json.dumps({
    "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "idle_rss": idle, "traced_peak": traced,
    "received": sum(received.values()), "received_by_type": received, "seconds": seconds,
    "stage_seconds": rep.stage_seconds, "bytes_in": rep.bytes_in,
    "tokens": sum(c["tokens"] for c in rep.counts.values()),
    "shard_bytes": sum(e["bytes"] for es in meta["splits"].values() for e in es),
    "splits": {s: [e["sha256"] for e in es] for s, es in meta["splits"].items()},
}))
'''


def extract(rev: str, into: Path) -> Path:
    """The ``labkit`` package of git revision ``rev`` under ``into`` (for PYTHONPATH)."""
    into.mkdir(parents=True, exist_ok=True)
    tar = into / "labkit.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), rev, "labkit"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into


def measure(path: Path, scale: str, workers: int, trace: bool, out: Path, mb: float) -> dict:
    """One driver process on the labkit at ``path``: its figures as a dict."""
    env = {**os.environ, "PYTHONPATH": str(path), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", CHILD, scale, str(workers), "1" if trace else "0", str(out), str(mb)],
                         env=env, capture_output=True, text=True, cwd=str(path))
    if run.returncode:
        raise RuntimeError(f"the driver on {path} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.data_driver", description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="HEAD", help="git revision to compare with (default HEAD)")
    ap.add_argument("--scale", default="binder", help="the DataConfig preset (default binder)")
    ap.add_argument("--mb", type=float, default=0, help="stdlib + test suites of this many MB instead of the scale's corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "data_driver.json"))
    args = ap.parse_args(argv)
    MB = 2**20
    res: dict = {"scale": args.scale, "workers": args.workers, "baseline": args.baseline, "mb": args.mb}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_root = extract(args.baseline, tmp / "base")
        for side, path in (("baseline", base_root), ("this tree", ROOT)):
            rss = measure(path, args.scale, args.workers, False, tmp / f"{side}-rss", args.mb)
            tr = measure(path, args.scale, args.workers, True, tmp / f"{side}-trace", args.mb)
            res[side] = {**rss, "traced_peak": tr["traced_peak"]}
            print(f"{side:<10}: driver peak RSS {rss['maxrss'] / MB:7.1f} MiB (idle with cluster {rss['idle_rss'] / MB:6.1f}"
                  f" MiB), traced peak in preprocess {tr['traced_peak'] / MB:6.1f} MiB, received from tasks "
                  f"{rss['received'] / MB:6.2f} MiB; {rss['bytes_in'] / 1e6:.1f} MB in, {rss['tokens']:,} tokens, "
                  f"{rss['seconds']:.1f} s")
            print(" " * 12 + "received by type (MiB): " + ", ".join(
                f"{k} {v / MB:.2f}" for k, v in sorted(rss["received_by_type"].items(), key=lambda kv: -kv[1]))
                  + "; stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rss["stage_seconds"].items()))
    a, b = res["baseline"], res["this tree"]
    same = a["splits"] == b["splits"]
    print(f"this tree / baseline: peak RSS {b['maxrss'] / a['maxrss']:.2f}x, peak RSS above idle "
          f"{(b['maxrss'] - b['idle_rss']) / max(a['maxrss'] - a['idle_rss'], 1):.2f}x, traced peak "
          f"{b['traced_peak'] / a['traced_peak']:.2f}x, received {b['received'] / max(a['received'], 1):.3f}x; "
          f"shards byte-identical: {same}")
    res["identical"] = same
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if not same:
        raise SystemExit("the shards differ from the baseline's")
    return res


if __name__ == "__main__":
    main()
