"""Time until N Slurm GPU workers are ready: labkit.start_cluster against raw dask-jobqueue.

    python -m bench.cluster [--rounds 3] [--workers 2] [--gpus 1]

Both sides ask for the same jobs (partition, cores, memory, walltime, ``--gres=gpu:G``) on the
same Slurm, interleaved round by round; labkit adds its pre-flight check, TLS with fresh
per-session keys, pending-job reporting and its job-name tag. Goal: labkit / raw <= 1.2.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _wait_gone(name: str, timeout: float = 60.0) -> None:
    """Wait until no job of that name holds resources, so the next round starts on a free node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=15)
        if not out.stdout.strip():
            return
        time.sleep(0.5)


def time_raw(workers: int, gpus: int, profile) -> float:
    """Seconds from nothing to ``workers`` joined, with a plain SLURMCluster."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    extra = [f"--gres=gpu:{gpus}"] if gpus else []
    t0 = time.perf_counter()
    cluster = SLURMCluster(queue=profile.partition, cores=profile.cores, processes=1, memory=profile.memory,
                           walltime=profile.walltime, job_name="labkit-bench-raw", job_extra_directives=extra,
                           scheduler_options={"dashboard_address": "127.0.0.1:0"}, python=sys.executable)
    cluster.scale(workers)
    client = Client(cluster)
    client.wait_for_workers(workers, timeout=300)
    took = time.perf_counter() - t0
    client.close()
    cluster.close()
    _wait_gone("labkit-bench-raw")
    return took


def time_labkit(workers: int, gpus: int) -> float:
    """Seconds from nothing to ``workers`` joined, with labkit.start_cluster (TLS, pre-flight...)."""
    from labkit.cluster import start_cluster

    t0 = time.perf_counter()
    handle = start_cluster("slurm", workers=workers, gpus_per_worker=gpus, timeout=300, say=lambda s: None)
    took = time.perf_counter() - t0
    name = handle.session.job_name
    handle.close()
    _wait_gone(name)
    return took


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the rounds, print medians and the ratio; returns them."""
    from labkit.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=1, help="GPUs per worker")
    args = ap.parse_args(argv)
    profile = load_config().profile("slurm")
    raw, lab = [], []
    for r in range(args.rounds):
        order = (("raw", raw), ("labkit", lab)) if r % 2 == 0 else (("labkit", lab), ("raw", raw))
        for name, out in order:
            out.append(time_raw(args.workers, args.gpus, profile) if name == "raw" else time_labkit(args.workers, args.gpus))
        print(f"round {r + 1}: raw dask-jobqueue {raw[-1]:.2f} s, labkit {lab[-1]:.2f} s", flush=True)
    result = {"raw_s": statistics.median(raw), "labkit_s": statistics.median(lab)}
    result["ratio"] = result["labkit_s"] / result["raw_s"]
    print(f"time to {args.workers} Slurm workers with {args.gpus} GPU(s) each (median of {args.rounds}): "
          f"raw {result['raw_s']:.2f} s, labkit {result['labkit_s']:.2f} s, ratio {result['ratio']:.2f}x (goal <= 1.2x)")
    return result


if __name__ == "__main__":
    main()
