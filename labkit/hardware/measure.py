"""Measure the live cluster: matmul throughput per dtype, memory bandwidth, host<->device bandwidth
on every worker, and all-reduce bandwidth and latency between workers over torch.distributed.

Each benchmark warms up, repeats, and reports the median. Sizes come from ``MeasureConfig.for_scale``
(``tiny`` finishes in seconds on CPU), overridable in the ``hardware`` section of a scale in the config.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Sequence

from pydantic import Field, field_validator

from labkit.config import ScaleSettings
from labkit.core.ranks import run_ranks
from labkit.hardware.catalog import gpu, match_device
from labkit.hardware.estimate import allreduce_time
from labkit.hardware.inspect import _cpu_model, current_worker, on_each_worker

KB, MB = 1024, 1024**2
Positive = Annotated[int, Field(gt=0)]


_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(matmul_n=256, copy_bytes=16 * MB, host_device_bytes=16 * MB,
                 allreduce_sizes=tuple(KB * 4**i for i in range(7)), warmup=1, repeats=3),      # 1 KB .. 4 MB
    "binder": dict(matmul_n=512, copy_bytes=64 * MB, host_device_bytes=64 * MB,
                   allreduce_sizes=tuple(KB * 4**i for i in range(8)), warmup=2, repeats=5),    # .. 16 MB
    "workshop": dict(matmul_n=4096, copy_bytes=1024 * MB, host_device_bytes=256 * MB,
                     allreduce_sizes=tuple(KB * 2**i for i in range(19)), warmup=3, repeats=10),  # .. 256 MB
    "full": dict(matmul_n=8192, copy_bytes=2048 * MB, host_device_bytes=1024 * MB,
                 allreduce_sizes=tuple(KB * 2**i for i in range(19)), warmup=5, repeats=20),
}


class MeasureConfig(ScaleSettings):
    """Sizes and repeats of the microbenchmarks at one scale."""

    section = noun = "hardware"
    presets = _PRESETS

    matmul_n: Positive = 512                    # square matrices n x n
    copy_bytes: Positive = 64 * MB              # device-memory copy (read + write)
    host_device_bytes: Positive = 64 * MB       # pinned host <-> device copy
    allreduce_sizes: tuple[int, ...] = tuple(KB * 4**i for i in range(8))   # 1 KB ... 16 MB
    warmup: Annotated[int, Field(ge=0)] = 2
    repeats: Positive = 5
    dtypes: tuple[str, ...] | None = None       # None: every dtype the device supports

    @field_validator("allreduce_sizes")
    @classmethod
    def _at_least_one_float(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if not sizes or min(sizes) < 4:
            raise ValueError("needs sizes of at least 4 bytes (one float32); give one or more byte counts, e.g. [4096, 1048576]")
        return sizes


# ---------------------------------------------------------------------------------------------- timing

def median_time(fn: Callable[[], Any], *, warmup: int, repeats: int, sync: Callable[[], Any] | None = None,
                min_sample_s: float = 2e-3) -> float:
    """Median wall time of one ``fn()`` over ``repeats`` samples after ``warmup`` calls; ``sync`` waits for
    the device. A sample loops ``fn`` enough times to last ``min_sample_s``, so tiny calls are not lost in
    timer noise."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    inner = max(1, min(1000, int(min_sample_s / max(once, 1e-9)) + 1)) if once < min_sample_s else 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _sync_for(device: str) -> Callable[[], None]:
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


_TORCH_DTYPES = {"fp64": "float64", "fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def supported_dtypes(device: str) -> tuple[str, ...]:
    """Matmul dtypes worth measuring on ``device``: on CPU fp64, fp32, bf16; on CUDA also tf32 and
    fp16 (bf16 only from compute capability 8.0)."""
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware

    if device.startswith("cuda"):
        out = ["fp64", "fp32", "tf32", "fp16"]
        if torch.cuda.is_bf16_supported():
            out.append("bf16")
        return tuple(out)
    return ("fp64", "fp32", "bf16")


# ---------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class MatmulResult:
    """Throughput of an n x n matmul: ``flops_per_s`` = 2·n³ / median time."""

    dtype: str
    n: int
    seconds: float

    @property
    def flops_per_s(self) -> float:
        return 2.0 * self.n**3 / self.seconds

    @property
    def intensity(self) -> float:
        """Arithmetic intensity (FLOP/byte) of the matmul: 2n³ / (3 n² · element size)."""
        size = 8 if self.dtype == "fp64" else 4 if self.dtype in ("fp32", "tf32") else 2
        return 2.0 * self.n / (3 * size)


@dataclass(frozen=True)
class BandwidthResult:
    """A copy of ``n_bytes``; ``bytes_per_s`` counts the bytes moved (a device copy reads and writes)."""

    kind: str            # "device copy", "host->device", "device->host"
    n_bytes: int
    seconds: float
    moved_factor: int = 1

    @property
    def bytes_per_s(self) -> float:
        return self.moved_factor * self.n_bytes / self.seconds


@dataclass(frozen=True)
class DeviceBench:
    """Microbenchmarks of one worker's device."""

    worker: str
    host: str
    device: str
    device_name: str
    threads: int
    matmul: tuple[MatmulResult, ...]
    copy: BandwidthResult
    host_to_device: BandwidthResult | None = None
    device_to_host: BandwidthResult | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    device_memory_bytes: int | None = None

    def best_flops(self) -> float:
        return max(m.flops_per_s for m in self.matmul)

    def flops(self, dtype: str) -> float | None:
        return next((m.flops_per_s for m in self.matmul if m.dtype == dtype), None)


@dataclass(frozen=True)
class AllReducePoint:
    """One message size: median time of the slowest rank, algorithm and bus bandwidth (bytes/s)."""

    n_bytes: int
    seconds: float
    world_size: int
    backend: str

    @property
    def algo_bandwidth(self) -> float:
        return self.n_bytes / self.seconds

    @property
    def bus_bandwidth(self) -> float:
        """nccl-tests' bus bandwidth: algo bandwidth x 2(G-1)/G, comparable with the link speed."""
        g = self.world_size
        return self.algo_bandwidth * 2 * (g - 1) / g


@dataclass(frozen=True)
class AllreduceFit:
    """Alpha-beta model of a ring all-reduce fitted to measurements: latency per step and bus bandwidth."""

    latency_s: float
    bus_bandwidth: float      # bytes/s
    n_ranks: int

    def bus_bandwidth_at(self, n_bytes: float) -> float:
        """Bus bandwidth the model predicts for one message size, to draw against the measured points."""
        return allreduce_time(n_bytes, self.n_ranks, self.bus_bandwidth, self.latency_s).bus_bandwidth


def fit_allreduce(points: Sequence[AllReducePoint]) -> AllreduceFit:
    """Fit t = 2(G-1)/G * bytes/bw + 2(G-1) * latency to measured points (G = their world size): latency
    from the fastest message spread over its 2(G-1) steps, bandwidth from the best bus bandwidth."""
    if not points:
        raise ValueError("no all-reduce points to fit: measure some first (measure_allreduce or measure_cluster)")
    g = points[0].world_size
    if g < 2:
        raise ValueError(f"an all-reduce fit needs at least 2 ranks, the points have {g}: measure on 2+ workers")
    latency = min(p.seconds for p in points) / (2 * (g - 1))
    return AllreduceFit(latency, max(p.bus_bandwidth for p in points), g)


@dataclass(frozen=True)
class ClusterMeasurement:
    """Everything measured on a cluster, and how long it took."""

    devices: list[DeviceBench]
    allreduce: list[AllReducePoint]
    config: MeasureConfig
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def latency_s(self) -> float | None:
        """All-reduce latency: the time of the smallest message."""
        return min((p.seconds for p in self.allreduce), default=None)

    @property
    def peak_bus_bandwidth(self) -> float | None:
        return max((p.bus_bandwidth for p in self.allreduce), default=None)


# ---------------------------------------------------------------------------------------------- on one device

def matmul_throughput(device: str, dtype: str, n: int, *, warmup: int = 2, repeats: int = 5) -> MatmulResult:
    """Median time of an n x n @ n x n matmul in ``dtype`` on ``device`` (tf32: fp32 with TF32 allowed)."""
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"unknown matmul dtype {dtype!r}; valid: {', '.join(_TORCH_DTYPES)}")
    tdtype = getattr(torch, _TORCH_DTYPES[dtype])
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)
    out = torch.empty(n, n, device=device, dtype=tdtype)
    cuda = device.startswith("cuda")
    prev = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        t = median_time(lambda: torch.matmul(a, b, out=out), warmup=warmup, repeats=repeats, sync=_sync_for(device))
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return MatmulResult(dtype, n, t)


def copy_bandwidth(device: str, n_bytes: int, *, warmup: int = 2, repeats: int = 5) -> BandwidthResult:
    """Device-memory bandwidth from a large tensor copy (each byte read once and written once)."""
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware

    numel = max(1, n_bytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), warmup=warmup, repeats=repeats, sync=_sync_for(device))
    return BandwidthResult("device copy", numel * 4, t, moved_factor=2)


def host_device_bandwidth(device: str, n_bytes: int, *, warmup: int = 2, repeats: int = 5,
                          pinned: bool = True) -> tuple[BandwidthResult, BandwidthResult]:
    """Pinned host -> device and device -> host copy bandwidth (PCIe or C2C); needs a CUDA device."""
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware

    if not device.startswith("cuda"):
        raise ValueError(f"host<->device bandwidth needs a CUDA device, got {device!r}")
    numel = max(1, n_bytes // 4)
    host = torch.ones(numel, dtype=torch.float32, pin_memory=pinned)
    dev = torch.empty(numel, dtype=torch.float32, device=device)
    sync = _sync_for(device)
    h2d = median_time(lambda: dev.copy_(host, non_blocking=True), warmup=warmup, repeats=repeats, sync=sync)
    d2h = median_time(lambda: host.copy_(dev, non_blocking=True), warmup=warmup, repeats=repeats, sync=sync)
    return BandwidthResult("host->device", numel * 4, h2d), BandwidthResult("device->host", numel * 4, d2h)


def pick_device() -> str:
    """``cuda`` when torch sees a GPU (the first visible one), else ``cpu``."""
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def bench_device(config: MeasureConfig, device: str | None = None) -> DeviceBench:
    """Run the per-device microbenchmarks here (on a worker when submitted there)."""
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware

    start = time.perf_counter()
    device = device or pick_device()
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    memory = int(torch.cuda.get_device_properties(device).total_memory) if cuda else None
    dtypes = config.dtypes or supported_dtypes(device)
    notes = []
    results = []
    for dt in dtypes:
        try:
            results.append(matmul_throughput(device, dt, config.matmul_n, warmup=config.warmup, repeats=config.repeats))
        except (RuntimeError, TypeError) as exc:   # a dtype this build/device cannot multiply
            notes.append(f"{dt} matmul unsupported here: {exc}")
    copy = copy_bandwidth(device, config.copy_bytes, warmup=config.warmup, repeats=config.repeats)
    h2d = d2h = None
    if cuda:
        h2d, d2h = host_device_bandwidth(device, config.host_device_bytes, warmup=config.warmup, repeats=config.repeats)
    else:
        notes.append("no CUDA device: host<->device bandwidth not measured")
    worker = getattr(current_worker(), "address", "")
    return DeviceBench(worker, socket.gethostname(), device, name, torch.get_num_threads(), tuple(results),
                       copy, h2d, d2h, time.perf_counter() - start, tuple(notes), memory)


def _cpu_name() -> str:
    return _cpu_model()


# ---------------------------------------------------------------------------------------------- across workers

def allreduce_rank(ctx: Any, sizes: Sequence[int], warmup: int = 2, repeats: int = 5) -> list[AllReducePoint]:
    """One torch.distributed rank (run via ``labkit.core.ranks.run_ranks``): time all_reduce of each size.
    Every rank times each repeat between barriers; the slowest rank's median is reported."""
    import torch  # lazy: torch (~2 s import); the CLI imports labkit.hardware
    import torch.distributed as dist  # lazy: as torch above

    device = ctx.device if ctx.backend == "nccl" else "cpu"
    sync = _sync_for(device)
    points = []
    for n_bytes in sizes:
        x = torch.ones(max(1, n_bytes // 4), dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(x)
        sync()
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            sync()
            times.append(time.perf_counter() - t0)
        med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        points.append(AllReducePoint(x.numel() * 4, float(med.item()), ctx.world_size, ctx.backend))
    return points


def measure_devices(client: Any, config: MeasureConfig, *, concurrent: bool = False,
                    timeout: float = 600.0) -> list[DeviceBench]:
    """``bench_device`` on every worker (one at a time by default, so workers sharing a host do not
    steal each other's cores and memory bandwidth)."""
    return on_each_worker(client, bench_device, config, timeout=timeout, one_at_a_time=not concurrent)


def measure_allreduce(client: Any, config: MeasureConfig, *, workers: int | Sequence[str] | None = None,
                      backend: str = "auto", timeout: float = 120.0) -> list[AllReducePoint]:
    """All-reduce bandwidth and latency between the workers (gloo on CPU, nccl when each has a GPU)."""
    per_rank = run_ranks(client, allreduce_rank, tuple(config.allreduce_sizes), config.warmup, config.repeats,
                         workers=workers, backend=backend, timeout=timeout)
    return per_rank[0]


def measure_cluster(client: Any, config: MeasureConfig | None = None, *, scale: str | None = None,
                    allreduce: bool = True) -> ClusterMeasurement:
    """Measure every worker's device, then all-reduce across them (skipped with one worker)."""
    config = config or MeasureConfig.for_scale(scale)
    start = time.perf_counter()
    devices = measure_devices(client, config)
    notes = []
    points: list[AllReducePoint] = []
    if allreduce and len(devices) > 1:
        points = measure_allreduce(client, config)
    elif allreduce:
        notes.append("one worker: no all-reduce to measure (start two or more)")
    return ClusterMeasurement(devices, points, config, time.perf_counter() - start, notes)


# ---------------------------------------------------------------------------------------------- vs the catalog

def cpu_peak_flops(cores: int | None = None, ghz: float | None = None, flags: set[str] | None = None) -> dict[str, float]:
    """Rough peak FLOP/s of this CPU from its flags: cores x clock x FLOP/cycle/core (two FMA units of the
    widest vector: AVX-512 64, AVX2+FMA 32, else 8 fp32 FLOP/cycle; fp64 half; bf16 twice fp32 with
    AVX512_BF16 or AMX). An upper bound: real chips clock down under vector load."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if ghz is None or flags is None:
        f_ghz, f_flags = _cpuinfo()
        ghz = ghz or f_ghz
        flags = flags if flags is not None else f_flags
    fp32 = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    peak32 = cores * ghz * 1e9 * fp32
    bf16 = 2 * peak32 if flags & {"avx512_bf16", "amx_bf16"} else peak32
    return {"fp64": peak32 / 2, "fp32": peak32, "bf16": bf16}


def _cpuinfo() -> tuple[float, set[str]]:
    ghz, flags = 2.0, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "cpu mhz" and ghz == 2.0:
                    ghz = float(value) / 1000
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return ghz, flags


def peaks_for(bench: DeviceBench) -> tuple[dict[str, float], float | None, str]:
    """What to compare a worker's measurements with: (peak FLOP/s per dtype, memory bytes/s or None, label).
    A GPU found in the catalog gives its datasheet peaks; a CPU its flag-based estimate for its threads."""
    if bench.device.startswith("cuda"):
        acc = match_device(bench.device_name, bench.device_memory_bytes)
        if acc is None:
            return {}, None, f"{bench.device_name}: not in the catalog"
        return {dt: acc.peak_flops(dt) for dt in acc.dtypes}, acc.memory_bw, f"{acc.name} datasheet"
    return cpu_peak_flops(cores=bench.threads), None, f"estimated peak of {bench.threads} CPU thread(s)"


def ratios(bench: DeviceBench, peaks: dict[str, float], memory_bw: float | None = None) -> dict[str, float]:
    """Measured / peak per dtype (and ``memory`` for the copy against ``memory_bw``), in [0, ~1]."""
    out = {m.dtype: m.flops_per_s / peaks[m.dtype] for m in bench.matmul if peaks.get(m.dtype)}
    if memory_bw:
        out["memory"] = bench.copy.bytes_per_s / memory_bw
    return out


@dataclass(frozen=True)
class CatalogComparison:
    """A worker's measurements as fractions of one catalog entry: the GPU's datasheet, or on a CPU the
    catalog's ``CPU-node``, a generic reference node (``generic``), not this machine's datasheet."""

    reference: str                   # catalog name
    generic: bool                    # True for the generic CPU node
    peak_flops: dict[str, float]     # the entry's peak FLOP/s for the dtypes measured here
    memory_bw: float                 # the entry's memory bandwidth (bytes/s)
    flops: dict[str, float]          # measured matmul / peak, per dtype
    memory: float                    # measured device copy / memory_bw

    @property
    def label(self) -> str:
        if self.generic:
            return f"{self.reference} (the catalog's generic reference node, not this machine's datasheet)"
        return f"{self.reference} datasheet"


def compare_with_catalog(bench: DeviceBench) -> CatalogComparison | None:
    """Measured / catalog peak for matmul per dtype and for the copy bandwidth. A GPU is compared with its
    own catalog entry (None when it has none); a CPU with the generic ``CPU-node`` entry, a yardstick."""
    cuda = bench.device.startswith("cuda")
    acc = match_device(bench.device_name, bench.device_memory_bytes) if cuda else gpu("CPU-node")
    if acc is None:
        return None
    peaks = {m.dtype: acc.peak_flops(m.dtype) for m in bench.matmul if m.dtype in acc.peak_tflops}
    measured = ratios(bench, peaks, acc.memory_bw)
    return CatalogComparison(acc.name, not cuda, peaks, acc.memory_bw,
                             {dt: measured[dt] for dt in peaks}, measured["memory"])
