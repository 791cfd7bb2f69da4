"""Measure this machine's workers and print measured / peak ratios.

    python -m bench.hardware [--scale tiny] [--workers 2]

Peaks: the catalog entry of the GPU when a worker has one, else this CPU's peak estimated from its
flags (cores x clock x FLOP/cycle); a CPU worker is also compared with the catalog's generic CPU-node
(a reference node, not this machine's datasheet), which gives its copy bandwidth a ratio too. Also prints all-reduce bus bandwidth against the device-copy
bandwidth measured in the same run (how much slower the network path is than local memory).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from dask.distributed import Client, LocalCluster

    from labkit.hardware.measure import MeasureConfig, compare_with_catalog, measure_cluster, peaks_for, ratios
    from labkit.widgets.hardware import measurement_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    cfg = MeasureConfig.for_scale(args.scale)
    start = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        m = measure_cluster(client, cfg)
    total = time.perf_counter() - start
    print(f"scale {args.scale}: measured in {m.seconds:.1f} s ({total:.1f} s with cluster start/stop)")
    for d in m.devices:
        peaks, bw, what = peaks_for(d)
        print(f"\n{d.worker} ({d.device_name}, vs {what}):")
        for k, v in ratios(d, peaks, bw).items():
            print(f"  {k:6s} measured/peak = {v:.3f}")
        ref = compare_with_catalog(d)
        if ref is not None and ref.generic:
            print(f"  vs {ref.label}:")
            for k, v in {**ref.flops, "memory": ref.memory}.items():
                print(f"  {k:6s} measured/catalog = {v:.4f}")
    print()
    print(measurement_table(m))
    if m.allreduce:
        copy = min(d.copy.bytes_per_s for d in m.devices)
        print(f"\nall-reduce ({m.allreduce[0].backend}, {m.allreduce[0].world_size} ranks): "
              f"latency {m.latency_s * 1e6:.0f} us, peak bus bandwidth {m.peak_bus_bandwidth / 1e9:.3f} GB/s "
              f"= {m.peak_bus_bandwidth / copy:.3f} x device-copy bandwidth")
        for p in m.allreduce:
            print(f"  {p.n_bytes:>10d} B  {p.seconds * 1e6:10.0f} us  bus {p.bus_bandwidth / 1e9:8.4f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
