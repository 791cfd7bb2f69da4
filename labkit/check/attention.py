"""Checkers for the attention exercises: softmax, attention, a causal mask, head splitting.

``check(name, fn, seed=None)`` runs the learner's function on fresh random inputs and returns a
:class:`~labkit.check.Result` that says what is wrong (wrong shape, missing scale, mask inverted,
softmax over the wrong axis, overflow, ...), not only that something is. ``solution(name)`` returns a reference solution's
source; it is only shown when asked for.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from labkit import attention as A

from labkit.check import Result, attempt, checker_book, correct, mistake, solution_book

TOL = 1e-5


def _close(a, b, tol: float = TOL) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(
        a.float(), b.float(), atol=tol, rtol=tol, equal_nan=False)


def _gen(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)


# ------------------------------------------------------------------------------------------ softmax
def _check_softmax(fn: Callable[[torch.Tensor], torch.Tensor], seed: int | None = None) -> Result:
    """Check ``fn(x)`` = softmax over the last axis, stable for large inputs."""
    g = _gen(seed)
    x = torch.randn(3, 5, 7, generator=g) * 3
    got = attempt(fn, x.clone())
    want = torch.softmax(x, -1)
    if not isinstance(got, torch.Tensor):
        return mistake("type", f"return a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        return mistake("shape", f"wrong shape: got {tuple(got.shape)}, expected {tuple(want.shape)} "
                                "(softmax keeps the shape; did a sum lose keepdim=True?)")
    if not _close(got, want):
        for axis in (0, 1):
            if _close(got, torch.softmax(x, axis)):
                return mistake("wrong_axis", f"softmax over the wrong axis (dim={axis}); normalise over the last "
                                             "axis, dim=-1, so each row sums to 1")
        if _close(got, torch.exp(x)):
            return mistake("not_normalised", "you return exp(x): divide by the sum over the last axis")
        if torch.allclose(got.sum(-1), torch.ones(3, 5), atol=1e-4):
            return mistake("values", "rows sum to 1 but the values are wrong; compute exp(x) / sum(exp(x))")
        return mistake("values", f"wrong values: max difference {(got - want).abs().max():.3g}")
    big = x * 100 + 500  # scores of an unscaled, large-activation model
    got_big = attempt(fn, big.clone())
    if not torch.isfinite(got_big).all():
        return mistake("overflow", "numerical overflow: exp() of large scores is inf and inf/inf is nan. "
                                   "Subtract the row maximum first: softmax(x) = softmax(x - max(x)).")
    if not _close(got_big, torch.softmax(big, -1)):
        return mistake("values", "correct on small inputs, wrong on large ones: subtract the row maximum "
                                 "(keepdim=True) before exp")
    return correct("softmax is right, and stable for large scores")


# ---------------------------------------------------------------------------------------- attention
def _check_attention(fn: Callable, seed: int | None = None) -> Result:
    """Check ``fn(q, k, v, mask=None)`` = softmax(q k^T / sqrt(d_k)) v, bool mask True = may attend."""
    g = _gen(seed)
    b, h, t, s, d, dv = 2, 3, 5, 6, 8, 4  # every size distinct, so a swapped axis shows in the shape
    q, k = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, s, d, generator=g)
    v = torch.randn(b, h, s, dv, generator=g)
    got = attempt(fn, q, k, v)
    want = A.scaled_dot_product_attention(q, k, v)
    if not isinstance(got, torch.Tensor):
        return mistake("type", f"return a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        hint = " (did you return the weights instead of weights @ v?)" if got.shape == (b, h, t, s) else ""
        return mistake("shape", f"wrong shape: got {tuple(got.shape)}, expected {tuple(want.shape)} = "
                                f"(..., T_q, d_v){hint}")
    if not _close(got, want):
        ref = lambda scale=None, dim=-1: A.softmax((q @ k.transpose(-2, -1)) * (
            1 / math.sqrt(d) if scale is None else scale), dim=dim) @ v
        if _close(got, ref(scale=1.0)):
            return mistake("missing_scale", "missing scale: divide the scores by sqrt(d_k) = sqrt(q.shape[-1]); "
                                            "without it softmax saturates as d_k grows")
        if _close(got, ref(scale=1 / d)):
            return mistake("wrong_scale", "scale is 1/d_k; it should be 1/sqrt(d_k)")
        if _close(got, ref(dim=-2)):
            return mistake("wrong_axis", "softmax over the wrong axis (the queries); normalise over the keys, dim=-1")
        return mistake("values", f"wrong values: max difference {(got - want).abs().max():.3g}")
    mask = torch.rand(b, 1, t, s, generator=g) > 0.5
    # every row keeps one allowed and one forbidden key, so an inverted mask never makes a row
    # all -inf (softmax NaN), which would hide the inversion behind a generic message
    mask[..., 0] = True
    mask[..., -1] = False
    got_m = attempt(fn, q, k, v, mask=mask, on="a call with mask=")
    if not _close(got_m, A.scaled_dot_product_attention(q, k, v, mask=mask)):
        flipped = ~mask
        flipped[..., 0] = True
        if _close(got_m, A.scaled_dot_product_attention(q, k, v, mask=~mask)) or _close(
                got_m, A.scaled_dot_product_attention(q, k, v, mask=flipped)):
            return mistake("mask_inverted", "mask sign inverted: True means 'may attend'; fill the scores with "
                                            "-inf where the mask is False: scores.masked_fill(~mask, float('-inf'))")
        if _close(got_m, want):
            return mistake("mask_ignored", "the mask is ignored: fill forbidden scores with -inf before softmax")
        return mistake("mask", "wrong values with a mask; use scores.masked_fill(~mask, float('-inf'))")
    qb, kb = q * 30, k * 30  # large activations
    got_big = attempt(fn, qb, kb, v)
    if not torch.isfinite(got_big).all():
        return mistake("overflow", "numerical overflow with large scores: use a stable softmax "
                                   "(subtract the row max) or torch.softmax")
    return correct("attention is right: scaled, masked the right way, stable")


# ------------------------------------------------------------------------------------- causal mask
def _check_causal_mask(fn: Callable[[int], torch.Tensor], seed: int | None = None) -> Result:
    """Check ``fn(T)`` = bool (T, T) mask, True where query i may attend key j (j <= i)."""
    t = int(torch.randint(5, 12, (), generator=_gen(seed)))
    got = attempt(fn, t)
    want = A.causal_mask(t)
    if not isinstance(got, torch.Tensor):
        return mistake("type", f"return a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        return mistake("shape", f"wrong shape: got {tuple(got.shape)} for T={t}, expected ({t}, {t})")
    if got.dtype != torch.bool:
        if got.is_floating_point() and torch.equal(torch.isinf(got), ~want) and (got[want] == 0).all():
            return mistake("dtype", "this is an additive float mask (0 / -inf); the exercise asks for a bool "
                                    "mask, True = may attend: torch.ones(T, T, dtype=torch.bool).tril()")
        return mistake("dtype", f"return a bool tensor (True = may attend), got {got.dtype}")
    if torch.equal(got, want):
        return correct(f"causal mask is right (checked at T={t})")
    if torch.equal(got, ~want) or torch.equal(got, want.T & ~torch.eye(t, dtype=torch.bool)):
        return mistake("mask_inverted", "mask inverted: True must mean 'may attend', i.e. on and below the diagonal")
    if torch.equal(got, want.T):
        return mistake("transposed", "transposed: query i (row) may see keys j <= i (columns): use .tril(), not .triu()")
    if torch.equal(got, want & ~torch.eye(t, dtype=torch.bool)):
        return mistake("diagonal", "the diagonal is missing: a token may attend to itself (tril with diagonal=0)")
    return mistake("values", "wrong values; row i should be True for columns 0..i")


# ------------------------------------------------------------------------------------- split heads
def _check_split_heads(fn: Callable[[torch.Tensor, int], torch.Tensor], seed: int | None = None) -> Result:
    """Check ``fn(x, n_head)``: (B, T, C) -> (B, n_head, T, C // n_head), head h = channels h*D..(h+1)*D."""
    g = _gen(seed)
    b, t, h, d = 2, 5, 3, 4
    x = torch.randn(b, t, h * d, generator=g)
    got = attempt(fn, x, h)
    want = A.split_heads(x, h)
    if not isinstance(got, torch.Tensor):
        return mistake("type", f"return a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        if got.shape == (b, t, h, d):
            return mistake("shape", f"shape {tuple(got.shape)} is (B, T, H, D): transpose(1, 2) to put heads "
                                    "before time, (B, H, T, D)")
        return mistake("shape", f"wrong shape: got {tuple(got.shape)}, expected (B, H, T, D) = {tuple(want.shape)}")
    if not torch.equal(got, want):
        if torch.equal(got, x.reshape(b, h, t, d)):
            return mistake("layout", "heads scrambled: x.view(B, H, T, D) mixes time and channels; "
                                     "view(B, T, H, D) first, then transpose(1, 2)")
        return mistake("layout", "right shape, wrong values: head h must hold channels h*D:(h+1)*D of every token")
    return correct("split_heads is right")


check = checker_book("attention", {"softmax": _check_softmax, "attention": _check_attention,
                                   "causal_mask": _check_causal_mask, "split_heads": _check_split_heads})
EXERCISES = check.names


# --------------------------------------------------------------------------------------- solutions
def _solution_softmax(x):
    m = x.amax(dim=-1, keepdim=True)  # subtract the row max: exp never overflows
    e = torch.exp(x - m)
    return e / e.sum(dim=-1, keepdim=True)


def _solution_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _solution_causal_mask(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def _solution_split_heads(x, n_head):
    b, t, c = x.shape
    return x.view(b, t, n_head, c // n_head).transpose(1, 2)


_SOLUTIONS = {"softmax": _solution_softmax, "attention": _solution_attention,
              "causal_mask": _solution_causal_mask, "split_heads": _solution_split_heads}


solution = solution_book("attention", _SOLUTIONS)


def solution_function(name: str) -> Callable:
    """The reference solution as a function (used by the tests and to compare outputs)."""
    if name not in _SOLUTIONS:
        raise ValueError(f"no solution named {name!r}; valid choices: {', '.join(EXERCISES)}")
    return _SOLUTIONS[name]
