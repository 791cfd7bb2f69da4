"""A snapshot of a cluster for panels and reports: workers (GPUs, memory, tasks) and pending jobs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerRow:
    """One worker as the scheduler sees it, plus its GPU ids."""

    name: str
    address: str
    gpus: tuple[str, ...]
    threads: int
    memory_used: int
    memory_limit: int
    executing: int
    ready: int
    in_memory: int
    host: str = ""  # the node's hostname


@dataclass(frozen=True)
class ClusterStatus:
    """Everything a panel shows; ``pending`` holds squeue lines like ``123 PENDING (Resources)``."""

    kind: str
    profile: str
    address: str
    dashboard: str
    target: int
    workers: list[WorkerRow] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    closed: bool = False

    def text(self) -> str:
        """Plain-text table for terminals, logs and tests."""
        head = (f"{self.kind} cluster, profile {self.profile!r}: {len(self.workers)}/{self.target} workers"
                + (" (closed)" if self.closed else "") + f"\n  scheduler {self.address}\n  dashboard {self.dashboard}")
        lines = [head]
        if self.workers:
            lines.append(f"  {'worker':<22} {'node':<12} {'GPUs':<8} {'memory':<19} {'tasks run/ready/held'}")
            for w in self.workers:
                mem = f"{_gib(w.memory_used)}/{_gib(w.memory_limit)} GiB"
                lines.append(f"  {w.name:<22} {w.host or '-':<12} {','.join(w.gpus) or '-':<8} {mem:<19} "
                             f"{w.executing}/{w.ready}/{w.in_memory}")
        for p in self.pending:
            lines.append(f"  pending job {p}")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"
