"""Quality against sparsity: validation perplexity of a GPT pruned in different ways.

``apply`` is the one entry point the curves, the Dask sweep and the slider widget share:
``method`` is ``unstructured`` (magnitude zeros, global), ``heads``, ``ffn`` or ``structured``
(heads and FFN neurons together, physically removed).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .importance import batches_of
from .speed import speedups, time_models
from .structured import prune_ffn, prune_heads, prune_structured
from .unstructured import check_amount, magnitude, sparsity

METHODS = ("unstructured", "heads", "ffn", "structured")


def val_windows(reader: Any, block_size: int, max_windows: int = 16) -> torch.Tensor:
    """Up to ``max_windows`` consecutive, non-overlapping windows ``(N, block_size+1)`` of a token source.

    ``reader`` is a ``labkit.data.ShardReader`` (anything with ``len`` and ``read(start, n)``), or a
    1-D token tensor/array. The same windows every time, so perplexities compare.
    """
    if isinstance(reader, (torch.Tensor, np.ndarray)):
        tokens = torch.as_tensor(reader).long().reshape(-1)
        read = lambda s, n: tokens[s : s + n]  # noqa: E731
        total = tokens.numel()
    else:
        read = lambda s, n: torch.from_numpy(np.asarray(reader.read(s, n)).astype(np.int64))  # noqa: E731
        total = len(reader)
    n = min(max_windows, (total - 1) // block_size)
    if n < 1:
        raise ValueError(f"{total} tokens are too few for one window of block_size+1={block_size + 1}; use a smaller block_size")
    return torch.stack([read(i * block_size, block_size + 1) for i in range(n)])


@torch.inference_mode()
def perplexity(model: nn.Module, data: Any, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over ``data`` (token windows (N, T+1) or (x, y) batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for x, y in batches_of(data, getattr(model.config, "block_size", None), batch_size):
            _, loss = model(x.to(device), y.to(device))
            total += float(loss) * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("no validation batches: give token windows (N, T+1)")
    return math.exp(min(total / count, 50.0))


def apply(model: nn.Module, method: str, amount: float, importance: str = "magnitude", data: Any = None) -> nn.Module:
    """A pruned copy of ``model`` (the input is never changed)."""
    check_amount(amount)
    if method == "unstructured":
        return magnitude(copy.deepcopy(model), amount, scope="global")
    if method == "heads":
        return prune_heads(model, amount, importance, data)
    if method == "ffn":
        return prune_ffn(model, amount, importance, data)
    if method == "structured":
        return prune_structured(model, amount, importance, data)
    raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")


def removed_fraction(original: nn.Module, pruned: nn.Module) -> float:
    """Fraction of the original's prunable weights that are gone: zeroed or physically removed."""
    before = sparsity(original).params
    after = sparsity(pruned)
    return 1.0 - (after.params - after.zeros) / before if before else 0.0


@dataclass(frozen=True)
class CurvePoint:
    """One (method, amount) point: how much was removed and the perplexity left."""

    method: str
    amount: float
    sparsity: float
    params: int
    perplexity: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _pruned_point(model: nn.Module, method: str, amount: float, val: torch.Tensor, importance: str,
                  calib: Any) -> tuple[nn.Module, CurvePoint]:
    pruned = apply(model, method, amount, importance, calib if calib is not None else val)
    return pruned, CurvePoint(method, float(amount), removed_fraction(model, pruned),
                              sum(p.numel() for p in pruned.parameters()), perplexity(pruned, val))


def evaluate_point(model: nn.Module, method: str, amount: float, val: torch.Tensor, importance: str = "magnitude",
                   calib: Any = None) -> CurvePoint:
    """Prune a copy one way and measure it on ``val`` windows."""
    return _pruned_point(model, method, amount, val, importance, calib)[1]


def measure_point(model: nn.Module, method: str, amount: float, val: torch.Tensor, x: torch.Tensor | None = None,
                  repeats: int = 3, warmup: int = 3, dense_perplexity: float | None = None,
                  importance: str = "magnitude") -> dict:
    """``evaluate_point`` plus latency: the pruned copy and the dense model timed on ``x`` (default: the
    first two ``val`` windows). Pass ``dense_perplexity`` to reuse it; the row the sparsity slider shows."""
    pruned, point = _pruned_point(model, method, amount, val, importance, None)
    t = time_models({"dense": model, "pruned": pruned}, x if x is not None else val[:2, :-1],
                    repeats=repeats, warmup=warmup)
    dense_ppl = perplexity(model, val) if dense_perplexity is None else float(dense_perplexity)
    return {"method": method, "amount": point.amount, "sparsity": point.sparsity, "perplexity": point.perplexity,
            "perplexity_dense": dense_ppl, "ms": t["pruned"].ms, "ms_dense": t["dense"].ms,
            "speedup": speedups(t, "dense")["pruned"]}


def sparsity_curve(model: nn.Module, val: torch.Tensor, amounts: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
                   methods: Sequence[str] = ("unstructured", "structured"), importance: str = "magnitude") -> list[CurvePoint]:
    """Perplexity against sparsity, for each method and amount, in this process."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method={m!r}: choose from {', '.join(METHODS)}")
    return [evaluate_point(model, m, a, val, importance) for m in methods for a in amounts]
