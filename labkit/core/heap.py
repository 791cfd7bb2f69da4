"""Keep freed memory inside a training process instead of handing it back to the OS each step.

A training step allocates its activations (megabytes to gigabytes) in the forward pass and frees them
in the backward pass. glibc's malloc gives large blocks back to the kernel (munmap, or a trim of the
heap's top) as soon as they are free, so the next step touches fresh pages and the kernel zero-fills
each one on first touch: a minor page fault per 4 KiB page, every step. Dask makes it worse on
purpose: its nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (distributed.yaml,
``nanny.pre-spawn-environ``), good for a worker that holds data frames, costly for one that trains.

``keep_freed_memory`` asks malloc to keep what was freed (as PyTorch's CUDA caching allocator does
on a GPU, and as the jemalloc/tcmalloc that PyTorch's CPU tuning guide preloads would): the pages
stay mapped and the next step reuses them. ``python -m bench.train --part a`` prints the page faults
per step with and without it. The price: the process keeps its peak heap until it exits, which is
what a training process reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory", "return_freed_memory"]

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' starting values in glibc
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit where it checks one


def _mallopt() -> tuple[object, object] | None:
    """glibc's ``mallopt`` and ``malloc_trim``, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, trim


def keep_freed_memory(keep_bytes: int = 1 << 30) -> bool:
    """Make malloc serve blocks under ``keep_bytes`` from its heap and keep up to ``keep_bytes`` freed
    memory mapped, so a training loop stops re-faulting its activations every step. Returns False
    where the C library is not glibc (macOS, musl): nothing is changed there."""
    fns = _mallopt()
    if fns is None:
        return False
    mallopt, _ = fns
    keep = int(min(keep_bytes, 2**31 - 1))
    # blocks under the threshold come from the heap, not from a fresh mmap each time; older glibc
    # refuses values above 32 MiB, so fall back to its maximum there
    ok_mmap = mallopt(M_MMAP_THRESHOLD, keep) == 1 or mallopt(M_MMAP_THRESHOLD, min(keep, MMAP_THRESHOLD_MAX)) == 1
    ok_trim = mallopt(M_TRIM_THRESHOLD, keep) == 1
    return ok_mmap and ok_trim


def return_freed_memory() -> bool:
    """Undo ``keep_freed_memory``: glibc's starting thresholds again and the free heap handed back
    (``malloc_trim``), so that what the data segment counts is what is in use (``labkit.core.memcap``
    caps exactly that). Returns False where the C library is not glibc."""
    fns = _mallopt()
    if fns is None:
        return False
    mallopt, trim = fns
    ok = mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD) == 1
    trim(0)
    return ok
