"""Checkers for the pruning exercises: a magnitude mask, and one layer's sparsity.

``check("magnitude_mask", fn)`` and ``check("layer_sparsity", fn)`` run the learner's function on
fresh random inputs and say what is wrong (kept the small weights, forgot the absolute value, pruned the
wrong count, returned a percentage...). ``solution(name)`` returns a reference solution's source,
only when asked for.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from labkit.check import Result, attempt, checker_book, correct, mistake, solution_book


def reference_magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep-mask (True = keep) that drops the ``round(amount * n)`` smallest |w|."""
    k = round(amount * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    if k > 0:
        smallest = torch.topk(weight.abs().flatten(), k, largest=False).indices
        mask[smallest] = False
    return mask.view_as(weight)


def reference_layer_sparsity(module: nn.Module) -> float:
    """Fraction of the module's weight entries that are exactly zero (biases not counted)."""
    w = module.weight
    return float((w == 0).sum()) / w.numel()


def _check_magnitude_mask(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Result:
    """Check ``fn(weight, amount) -> bool mask`` (True = keep) against magnitude pruning."""
    g = torch.Generator().manual_seed(7)
    for shape, amount in (((8, 6), 0.5), ((16, 10), 0.25), ((5, 7), 0.8)):
        w = torch.randn(shape, generator=g)
        before = w.clone()
        got = attempt(fn, w, amount)
        if not torch.equal(w, before):
            return mistake("modified_input", "your function changed the weight; build a mask and leave the weight alone")
        if not isinstance(got, torch.Tensor) or got.shape != w.shape:
            return mistake("shape", f"return a tensor shaped like the weight {tuple(shape)}, got "
                                    f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        if got.dtype != torch.bool:
            if got.dtype.is_floating_point and set(got.unique().tolist()) <= {0.0, 1.0}:
                got = got.bool()
            else:
                return mistake("dtype", "return a boolean mask (True = keep), e.g. `w.abs() > threshold`")
        k = round(amount * w.numel())
        pruned = int((~got).sum())
        want = reference_magnitude_mask(w, amount)
        kept, gone = w.abs()[got], w.abs()[~got]
        if kept.numel() and gone.numel() and kept.max() <= gone.min():
            return mistake("inverted", "your mask keeps the smallest weights: True must mark the weights to *keep*")
        if pruned != k:
            return mistake("count", f"amount={amount} of {w.numel()} weights means pruning {k}; your mask prunes {pruned}",
                           expected=k, got=pruned)
        if not torch.equal(got, want):
            signed = torch.ones(w.numel(), dtype=torch.bool)
            signed[torch.topk(w.flatten(), k, largest=False).indices] = False
            if torch.equal(got, signed.view_as(w)):
                return mistake("no_abs", "you ranked by signed value, so large negative weights were pruned: rank by |w|")
            return mistake("wrong_weights", "the count is right but some kept weights are smaller in |w| than pruned ones")
    return correct("magnitude mask correct: the smallest |w| go, the right count, input untouched")


def _check_layer_sparsity(fn: Callable[[nn.Module], float]) -> Result:
    """Check ``fn(module) -> float``, the fraction of zero entries in ``module.weight``."""
    g = torch.Generator().manual_seed(3)
    for out_f, in_f, amount in ((10, 20, 0.3), (7, 9, 0.0), (12, 4, 0.75)):
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
            lin.weight[~reference_magnitude_mask(lin.weight, amount)] = 0
            lin.bias.zero_()  # zeros in the bias must not count
        got = attempt(fn, lin)
        want = reference_layer_sparsity(lin)
        try:
            value = float(got)
        except (TypeError, ValueError):
            return mistake("type", f"return a number (a fraction between 0 and 1), got {type(got).__name__}")
        zeros = int((lin.weight == 0).sum())
        if abs(value - want) < 1e-6:
            continue
        if abs(value - 100 * want) < 1e-4 and want > 0:
            return mistake("percent", f"you returned a percentage ({value:g}); return a fraction ({want:g})")
        if abs(value - zeros) < 1e-6 and zeros > 1:
            return mistake("count", f"you returned the number of zeros ({zeros}); divide by the number of weights")
        if abs(value - (1 - want)) < 1e-6:
            return mistake("density", "you returned the fraction of *nonzero* weights; sparsity counts the zeros")
        with_bias = (zeros + out_f) / (lin.weight.numel() + out_f)
        if abs(value - with_bias) < 1e-6:
            return mistake("bias", "you counted the bias too; sparsity here is about the weight matrix only")
        return mistake("wrong", f"a layer with {zeros} zeros out of {lin.weight.numel()} weights has sparsity {want:.4f}; "
                                f"you returned {value:.4f}")
    return correct("layer sparsity correct")


check = checker_book("pruning", {"magnitude_mask": _check_magnitude_mask, "layer_sparsity": _check_layer_sparsity})
EXERCISES = check.names


solution = solution_book("pruning", {"magnitude_mask": reference_magnitude_mask,
                                     "layer_sparsity": reference_layer_sparsity})
