"""What hardware did we get? Ask every Dask worker for its host, CPU, RAM, GPUs and Slurm job.

``inspect_cluster(client)`` runs :func:`probe` on each worker (``client.run``) and returns a list of
:class:`WorkerHardware`, one per worker, in worker-address order. ``probe()`` also works locally.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass, field, asdict
from typing import Any

import psutil
from distributed import get_worker, wait

from labkit.core.workers import workers_now


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as torch.cuda sees it: ``memory_bytes`` total, compute capability ``"8.0"``."""

    index: int
    name: str
    memory_bytes: int
    capability: str


@dataclass(frozen=True)
class WorkerHardware:
    """One worker process: where it runs, what it may use, and which Slurm job it belongs to."""

    worker: str                 # Dask address ("" when probed locally)
    host: str
    pid: int
    cpu_model: str
    cores: int                  # CPUs this process may run on (its affinity: what Slurm gave the job)
    host_cpus: int              # logical CPUs of the whole host
    ram_bytes: int              # physical RAM of the host
    gpus: tuple[GPUInfo, ...] = ()
    cuda_visible_devices: str | None = None
    cuda_available: bool = False
    slurm_job_id: str | None = None
    slurm_partition: str | None = None
    slurm_node: str | None = None
    torch_version: str = ""
    nthreads: int | None = None          # Dask threads of this worker
    memory_limit: int | None = None      # Dask's memory limit for this worker (bytes)
    notes: tuple[str, ...] = field(default=())

    def as_row(self) -> dict[str, Any]:
        """Flat dict for tables: GPUs joined into one string."""
        row = asdict(self)
        row["gpus"] = "; ".join(f"{g.name} {g.memory_bytes / 2**30:.0f} GiB sm_{g.capability}" for g in self.gpus) or "-"
        row["notes"] = "; ".join(self.notes)
        return row


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> int:
    try:
        return int(psutil.virtual_memory().total)
    except Exception:  # psutil cannot read it here: fall back to sysconf
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _gpus() -> tuple[tuple[GPUInfo, ...], bool, str, list[str]]:
    notes: list[str] = []
    try:
        import torch  # lazy: torch (~2 s import); `labkit --help` and `labkit hardware` import this module
    except ImportError:
        return (), False, "", ["torch not installed: GPUs not inspected"]
    gpus = []
    available = bool(torch.cuda.is_available())
    if available:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(GPUInfo(i, p.name, int(p.total_memory), f"{p.major}.{p.minor}"))
    elif os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "", "-1", "NoDevFiles"):
        notes.append(
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} but torch.cuda is not available "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}): a CPU-only torch or a GRES "
            "without a real device"
        )
    return tuple(gpus), available, torch.__version__, notes


def probe(dask_worker: Any = None) -> WorkerHardware:
    """Describe the process this runs in (inside a Dask task or ``client.run``: that worker)."""
    gpus, available, torch_version, notes = _gpus()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    worker, nthreads, memory_limit = "", None, None
    dask_worker = dask_worker or current_worker()
    if dask_worker is not None:
        worker = dask_worker.address
        nthreads = getattr(dask_worker.state, "nthreads", None)
        memory_limit = getattr(getattr(dask_worker, "memory_manager", None), "memory_limit", None)
    env = os.environ
    return WorkerHardware(
        worker=worker,
        host=socket.gethostname(),
        pid=os.getpid(),
        cpu_model=_cpu_model(),
        cores=cores,
        host_cpus=os.cpu_count() or cores,
        ram_bytes=_ram_bytes(),
        gpus=gpus,
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        cuda_available=available,
        slurm_job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"),
        slurm_partition=env.get("SLURM_JOB_PARTITION"),
        slurm_node=env.get("SLURMD_NODENAME"),
        torch_version=torch_version,
        nthreads=nthreads,
        memory_limit=int(memory_limit) if memory_limit else None,
        notes=tuple(notes),
    )


def current_worker() -> Any:
    """The Dask worker this code runs on, or None outside one."""
    try:
        return get_worker()
    except ValueError:  # not in a worker
        return None


def on_each_worker(client: Any, fn: Any, *args: Any, timeout: float = 120.0, one_at_a_time: bool = False) -> list[Any]:
    """Run ``fn(*args)`` as a task pinned to each worker (sorted by address); results in that order.
    Tasks, unlike ``client.run``, leave the worker's event loop free (heartbeats go on during a benchmark).
    A worker that does not answer within ``timeout`` seconds raises TimeoutError naming it."""
    addrs = sorted(workers_now(client))
    if not addrs:
        raise RuntimeError("the Dask cluster has no workers yet; wait with client.wait_for_workers(n, timeout=300) and retry")
    groups = [[a] for a in addrs] if one_at_a_time else [addrs]
    results: list[Any] = []
    for group in groups:
        futures = [client.submit(fn, *args, workers=[a], allow_other_workers=False, pure=False) for a in group]
        done, not_done = wait(futures, timeout=timeout)
        if not_done:
            late = [a for a, f in zip(group, futures) if f in not_done]
            for f in not_done:
                f.cancel()
            raise TimeoutError(f"worker(s) {late} did not answer within {timeout:.0f} s; check their logs "
                               "(client.get_worker_logs()) or restart the cluster")
        for a, f in zip(group, futures):
            if f.status == "error":
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on worker {a}: {f.exception()!r}; check its "
                                   "log (client.get_worker_logs()) or restart the cluster")
            results.append(f.result())
    return results


def inspect_cluster(client: Any, timeout: float = 120.0) -> list[WorkerHardware]:
    """Probe every worker of ``client`` (a ``dask.distributed.Client``); one row per worker, sorted by address."""
    return on_each_worker(client, probe, timeout=timeout)
