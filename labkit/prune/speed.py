"""Speed, measured: latency and throughput of models side by side, and when sparse kernels pay.

Unstructured pruning leaves every weight matrix the same shape: a dense matmul multiplies the zeros
like any other number, so it costs exactly as much. Only a kernel that skips zeros (a sparse
format such as CSR) can gain, and it pays an index lookup per nonzero and irregular memory access,
so it only wins at high sparsity. Structured pruning makes the matrices smaller: every dense
kernel gains at once.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from labkit.model import resolve_device

from .unstructured import prunable_layers

pick_device = resolve_device  # the name this module's callers and tests know


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPU cores this process may really use: its affinity (what Slurm or taskset allotted), capped by a
    cgroup v2 CPU quota (containers, Binder), which ``os.cpu_count()`` and torch's default ignore."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    try:
        quota, period = open(cpu_max).read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, cores)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    first = next(iter(model.parameters()), None)
    if first is None or first.device == device or (first.device.type == device.type == "cpu"):
        return model
    return copy.deepcopy(model).to(device)


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


@dataclass(frozen=True)
class Timing:
    """Latency of one call (median and best over repeats) and the throughput it implies."""

    name: str
    ms: float
    ms_min: float
    sequences: int
    tokens: int
    device: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.ms / 1e3)

    @property
    def sequences_per_s(self) -> float:
        return self.sequences / (self.ms / 1e3)

    def as_dict(self) -> dict:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s, "sequences_per_s": self.sequences_per_s}


def time_models(models: Mapping[str, nn.Module], inputs: Any, repeats: int = 10, warmup: int = 2,
                device: str | torch.device = "cpu") -> dict[str, Timing]:
    """Time each model on the same inputs (a token tensor, or a dict for ``model(**inputs)``).

    Calls are interleaved round-robin, so a noisy machine slows every model alike and the ratios
    stay honest. ``device="auto"`` times on the GPU when there is one; a model on another device is
    copied there (the caller's model stays put). Models run in eval mode under ``inference_mode``.
    """
    if not models:
        raise ValueError("give at least one model to time, as {name: model}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    dev = resolve_device(device)
    x = _to(inputs, dev)
    ref = x["input_ids"] if isinstance(x, Mapping) else x
    seqs, toks = (ref.shape[0], ref.numel()) if ref.dim() > 1 else (1, ref.numel())
    runs = {name: _on(m, dev).eval() for name, m in models.items()}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, m in runs.items():
                _sync(dev)
                t0 = time.perf_counter()
                _call(m, x)
                _sync(dev)
                if i >= warmup:
                    samples[name].append(time.perf_counter() - t0)
    out = {}
    for name, s in samples.items():
        s.sort()
        out[name] = Timing(name, s[len(s) // 2] * 1e3, s[0] * 1e3, int(seqs), int(toks), str(dev))
    return out


def speedups(timings: Mapping[str, Timing], baseline: str) -> dict[str, float]:
    """Each model's speedup over ``baseline`` (median latency ratio; > 1 is faster)."""
    if baseline not in timings:
        raise KeyError(f"baseline {baseline!r} not timed; have {', '.join(timings)}")
    base = timings[baseline].ms
    return {name: base / t.ms for name, t in timings.items()}


class SparseLinear(nn.Module):
    """A Linear layer whose weight is stored in CSR and multiplied with ``torch.sparse.mm`` (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.weight = nn.Parameter(linear.weight.detach().to_sparse_csr(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def to_sparse(model: nn.Module, min_sparsity: float = 0.0) -> nn.Module:
    """A copy of the model with every prunable Linear at least ``min_sparsity`` sparse swapped for ``SparseLinear``."""
    model = copy.deepcopy(model)
    for name, m in prunable_layers(model):
        if not isinstance(m, nn.Linear):
            continue
        if float((m.weight == 0).float().mean()) < min_sparsity:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLinear(m))
    return model


@dataclass(frozen=True)
class SparsePoint:
    """Dense vs CSR matmul time for one weight sparsity."""

    sparsity: float
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


@dataclass(frozen=True)
class SparseStudy:
    """Dense vs sparse (CSR) matmul across sparsities, for one weight shape and batch of tokens."""

    shape: tuple[int, int]
    tokens: int
    device: str
    rows: tuple[SparsePoint, ...]

    @property
    def crossover(self) -> float | None:
        """The lowest measured sparsity from which the sparse kernel is faster at every higher one."""
        found = None
        for r in reversed(self.rows):
            if r.speedup > 1.0:
                found = r.sparsity
            else:
                break
        return found

    def table(self) -> str:
        lines = [f"W {self.shape[0]}x{self.shape[1]}, {self.tokens} tokens, {self.device}",
                 f"{'sparsity':>8}  {'dense ms':>9}  {'CSR ms':>9}  {'speedup':>7}"]
        lines += [f"{r.sparsity:>8.0%}  {r.dense_ms:>9.3f}  {r.sparse_ms:>9.3f}  {r.speedup:>6.2f}x" for r in self.rows]
        c = self.crossover
        lines.append("sparse kernels pay from " + (f"{c:.0%} sparsity" if c is not None else "no measured sparsity"))
        return "\n".join(lines)


def sparse_kernel_study(out_features: int = 1024, in_features: int = 1024, tokens: int = 64,
                        sparsities: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
                        repeats: int = 10, seed: int = 0, device: str | torch.device = "cpu") -> SparseStudy:
    """Time ``W @ X`` dense and with W in CSR (best of ``repeats``, interleaved), for weights pruned by
    magnitude to each sparsity."""
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(in_features, tokens, generator=g).to(dev)
    order = w.abs().flatten().argsort()
    rows = []
    for s in sorted(float(v) for v in sparsities):
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity {s} must be in [0, 1)")
        ws = w.clone().flatten()
        ws[order[: round(s * ws.numel())]] = 0
        dense = ws.view(out_features, in_features).to(dev)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = dense.to_sparse_csr()
        t = {"dense": [], "csr": []}
        with torch.inference_mode():
            for i in range(repeats + 1):
                for kind, mat in (("dense", dense), ("csr", csr)):
                    _sync(dev)
                    t0 = time.perf_counter()
                    (mat @ x) if kind == "dense" else torch.sparse.mm(mat, x)
                    _sync(dev)
                    if i:
                        t[kind].append(time.perf_counter() - t0)
        best = {k: min(v) * 1e3 for k, v in t.items()}  # best of n: the kernel's cost, less the machine's noise
        rows.append(SparsePoint(s, best["dense"], best["csr"]))
    return SparseStudy((out_features, in_features), tokens, str(dev), tuple(rows))
