"""What attention costs: time and peak memory against sequence length for naive, online-softmax and SDPA.

Peak memory is measured, not estimated:

- on CUDA with ``torch.cuda.max_memory_allocated`` (the caching allocator's own counter);
- on CPU with ``torch.profiler`` (``profile_memory=True``): every allocation and free of torch's CPU
  allocator is an event with a byte count; their running sum, in time order, peaks at the answer.
  ``tracemalloc`` would not do: it only sees Python's allocator, and torch allocates outside it.

The figure is the peak of bytes allocated *during* the call, above what was allocated before it
(the inputs are not counted; the output, saved tensors and gradients are). It counts tensor memory
only: the allocator's caching, the Python objects and the operating system's view (RSS) are not in it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from labkit import attention as A
from labkit.config import ScaleSettings

Impl = Literal["naive", "online", "sdpa"]
IMPLS: tuple[str, ...] = get_args(Impl)


class CostConfig(ScaleSettings):
    """Sizes for a cost sweep; ``for_scale`` gives presets that fit each scale."""

    section = noun = "attention_cost"
    presets = {
        "tiny": dict(seq_lens=(64, 128, 256), batch=1, heads=2, head_dim=16, block_size=64, repeat=1),
        "binder": dict(seq_lens=(128, 256, 512, 1024), batch=1, heads=4, head_dim=32, block_size=128),
        "workshop": dict(seq_lens=(256, 512, 1024, 2048), batch=4, heads=8, head_dim=64, block_size=512),
        "full": dict(seq_lens=(512, 1024, 2048, 4096), batch=4, heads=8, head_dim=64, block_size=512),
    }

    seq_lens: tuple[int, ...] = (128, 256, 512)
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    causal: bool = True
    block_size: int = 128
    repeat: int = 2
    backward: bool = False
    impls: tuple[Impl, ...] = IMPLS


@dataclass
class CostPoint:
    """One measurement: an implementation at one sequence length."""

    impl: str
    seq_len: int
    seconds: float
    peak_bytes: int
    backward: bool
    device: str
    method: str = field(default="")

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def attention_fn(impl: str, causal: bool = True, block_size: int = A.DEFAULT_BLOCK) -> Callable:
    """The attention function ``f(q, k, v)`` for one implementation name."""
    if impl == "naive":
        return lambda q, k, v: A.scaled_dot_product_attention(q, k, v, causal=causal)
    if impl == "online":
        return lambda q, k, v: A.online_softmax_attention(q, k, v, causal=causal, block_size=block_size)
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    raise ValueError(f"unknown attention implementation {impl!r}; valid choices: {', '.join(IMPLS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, str]:
    """Peak bytes allocated while ``fn()`` runs, above the level before it, and how it was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak, "torch.cuda.max_memory_allocated"

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            level += e.nbytes()
            peak = max(peak, level)
    return peak, "torch.profiler CPU allocator events"


def time_call(fn: Callable[[], object], repeat: int = 3, device: torch.device | str = "cpu") -> float:
    """Best wall time of ``repeat`` calls after one warm-up (best, not mean: other load only adds)."""
    device = torch.device(device)
    fn()
    _sync(device)
    best = math.inf
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Best wall time of each function, calling them in turn for ``rounds`` rounds, so that a burst of
    load from other processes hits all of them alike (ratios stay meaningful on a shared machine)."""
    device = torch.device(device)
    best = {name: math.inf for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    _sync(device)
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def make_inputs(batch: int, heads: int, seq_len: int, head_dim: int, device="cpu", requires_grad=False, seed=0):
    """Random float32 q, k, v of shape (batch, heads, seq_len, head_dim)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, head_dim, generator=g).to(device).requires_grad_(requires_grad)
            for _ in range(3)]


def measure_one(impl: str, seq_len: int, cfg: CostConfig, device: torch.device | str = "cpu") -> CostPoint:
    """Time and peak memory of one implementation at one length (forward, or forward + backward)."""
    device = torch.device(device)
    f = attention_fn(impl, cfg.causal, cfg.block_size)
    q, k, v = make_inputs(cfg.batch, cfg.heads, seq_len, cfg.head_dim, device, requires_grad=cfg.backward)

    def run():
        if cfg.backward:
            out = f(q, k, v)
            out.sum().backward()
            for x in (q, k, v):
                x.grad = None
            return None
        with torch.no_grad():
            return f(q, k, v)

    seconds = time_call(run, cfg.repeat, device)
    peak, method = peak_memory(run, device)
    return CostPoint(impl, seq_len, seconds, peak, cfg.backward, str(device), method)


def measure_cost(cfg: CostConfig | None = None, device: torch.device | str = "cpu") -> list[CostPoint]:
    """Sweep every implementation over ``cfg.seq_lens``; returns one :class:`CostPoint` per pair."""
    cfg = cfg or CostConfig()
    return [measure_one(impl, t, cfg, device) for t in cfg.seq_lens for impl in cfg.impls]


def saved_tensor_bytes(impl: str, seq_len: int, cfg: CostConfig | None = None) -> int:
    """Bytes the autograd graph keeps for backward (via saved-tensor hooks): the memory training pays
    per attention layer between forward and backward. Naive keeps T x T tensors; online keeps O(T)."""
    cfg = cfg or CostConfig()
    q, k, v = make_inputs(cfg.batch, cfg.heads, seq_len, cfg.head_dim, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = attention_fn(impl, cfg.causal, cfg.block_size)(q, k, v)
    del out
    return sum(seen.values())


def cost_table(points: Sequence[CostPoint]) -> str:
    """A plain-text table of the measurements."""
    lines = [f"{'impl':>7} {'T':>6} {'ms':>10} {'peak MiB':>10}"]
    for p in points:
        lines.append(f"{p.impl:>7} {p.seq_len:>6} {p.seconds * 1e3:>10.1f} {p.peak_mib:>10.1f}")
    return "\n".join(lines)
