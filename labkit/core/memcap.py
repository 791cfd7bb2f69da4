"""A per-rank memory cap: make a small machine behave like a GPU with a fixed amount of memory.

``memory_cap(mb, device)`` lets this process allocate at most ``mb`` MiB more while it is open:

- on CUDA through ``torch.cuda.set_per_process_memory_fraction`` (the caching allocator refuses
  past the cap, as a smaller GPU would);
- on CPU through the soft ``RLIMIT_DATA`` of the process (Linux counts every private writable
  mapping, so a tensor past the cap fails with ``can't allocate memory``), set to what the
  process holds now plus ``mb``, and put back at exit.

So a lesson can show, on a laptop, that a model whose DDP replica does not fit a rank's memory
trains when FSDP shards it. The cap stands for the device's memory; what a real run would put in
the host's memory (the gathered model for samples and the result) goes under ``cap.lifted()``.
``is_out_of_memory`` tells such a failure from other errors.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import torch

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


class MemoryCapUnsupported(RuntimeError):
    """The platform has no way to cap this process's memory (no RLIMIT_DATA, no CUDA)."""


def data_bytes() -> int:
    """The private writable memory this process has mapped now (Linux ``VmData``)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmData:\s+(\d+) kB", text, re.M).group(1)) * 1024


class Cap:
    """An open cap; ``lifted()`` suspends it for host-side work (a CPU cap only: CUDA's leaves host memory alone)."""

    def __init__(self, restore: tuple[int, int] | None = None, limit: int | None = None) -> None:
        self._restore, self._limit = restore, limit

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        """The process's own limit while inside, the cap again after."""
        if self._restore is None:
            yield
            return
        resource.setrlimit(resource.RLIMIT_DATA, self._restore)
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_DATA, (self._limit, self._restore[1]))


@contextlib.contextmanager
def memory_cap(mb: float | None, device: torch.device | str = "cpu") -> Iterator[Cap]:
    """While open, this process may allocate at most ``mb`` MiB more on ``device`` (None: no cap)."""
    if mb is None:
        yield Cap()
        return
    device = torch.device(device)
    if mb <= 0:
        raise ValueError(f"memory_cap_mb must be > 0 MiB, got {mb}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.memory_allocated(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, (used + mb * 2**20) / total), device)
        try:
            yield Cap()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    if resource is None or not hasattr(resource, "RLIMIT_DATA") or not Path("/proc/self/status").is_file():
        raise MemoryCapUnsupported("a CPU memory cap needs Linux (RLIMIT_DATA and /proc); leave memory_cap_mb=None here")
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_bytes() + int(mb * 2**20)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield Cap((soft, hard), limit)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation refused for lack of memory (CPU allocator, CUDA, MemoryError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return "can't allocate memory" in text or "CUDA out of memory" in text
