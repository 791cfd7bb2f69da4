"""Watch the memory (and CPU time) of a process tree (a kernel and the Dask workers it starts) from a thread.

Binder and JupyterHub limit the memory of the whole session, so what counts is the sum over
the kernel and every child it spawned, sampled while it runs; the peak of that sum is kept.
On Linux the sum uses PSS (shared pages split between the processes that share them), which is
what a cgroup limit sees; elsewhere it falls back to RSS, which over-counts shared libraries.
CPU time (user + system, summed over the tree) is kept too: on a busy machine it says what a run
would take on a CPU of its own better than the wall time does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil


@dataclass
class MemorySample:
    """One look at a process tree: summed memory in bytes and how many processes were alive."""

    rss: int
    pss: int | None
    processes: int
    cpu: dict[int, float] = field(default_factory=dict)

    @property
    def best(self) -> int:
        """PSS when the platform gives it (closest to a cgroup's view), else RSS."""
        return self.pss if self.pss is not None else self.rss


def tree_memory(pid: int) -> MemorySample:
    """Sum the memory of process ``pid`` and all its descendants right now (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return MemorySample(0, None, 0)
    rss, pss, have_pss, alive = 0, 0, True, 0
    cpu: dict[int, float] = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
            cpu[proc.pid] = times.user + times.system
            if have_pss:
                info = proc.memory_full_info()
                if getattr(info, "pss", None) is None:
                    have_pss = False
                else:
                    pss += info.pss
                rss += info.rss
            else:
                rss += proc.memory_info().rss
            alive += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            have_pss = False
            try:
                rss += proc.memory_info().rss
                alive += 1
            except psutil.Error:
                continue
    return MemorySample(rss, pss if have_pss else None, alive, cpu)


class TreeMemoryWatch:
    """Sample a process tree's memory every ``interval`` seconds in a daemon thread; keep the peak.

    The pid can be given later with :meth:`watch` (a kernel's pid is known only once it started).
    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive seconds, got {interval}")
        self.interval = interval
        self._pid = pid
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss = 0
        self.peak_pss: int | None = None
        self.peak_processes = 0
        self.samples = 0
        self._cpu: dict[int, float] = {}

    @property
    def peak(self) -> int:
        """Peak summed memory in bytes (PSS when available, else RSS)."""
        return self.peak_pss if self.peak_pss is not None else self.peak_rss

    @property
    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every process seen in the tree, up to its last sample."""
        with self._lock:
            return sum(self._cpu.values())

    @property
    def measure(self) -> str:
        """Which measure :attr:`peak` holds: ``"pss"`` or ``"rss"``."""
        return "pss" if self.peak_pss is not None else "rss"

    def watch(self, pid: int) -> None:
        """Start (or switch to) watching process ``pid`` and its children; take a sample at once."""
        with self._lock:
            self._pid = pid
        self.sample()

    def sample(self) -> MemorySample | None:
        """Take one sample now and fold it into the peaks."""
        with self._lock:
            pid = self._pid
        if pid is None:
            return None
        s = tree_memory(pid)
        with self._lock:
            self.samples += 1
            self.peak_rss = max(self.peak_rss, s.rss)
            if s.pss is not None:
                self.peak_pss = max(self.peak_pss or 0, s.pss)
            self.peak_processes = max(self.peak_processes, s.processes)
            for pid, seconds in s.cpu.items():
                self._cpu[pid] = max(self._cpu.get(pid, 0.0), seconds)
        return s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "TreeMemoryWatch":
        """Start the sampling thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="labkit-memwatch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (one last sample is taken first)."""
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "TreeMemoryWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
