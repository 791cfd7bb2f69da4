"""Checkers for the attention exercises: attention from scratch, a causal mask, an online-softmax
block update, splitting and merging heads.

``check(name, fn, seed=None)`` runs the learner's function on fresh random inputs (a new seed each
call unless ``seed`` is given; the seed is in the message, so a case can be repeated) and returns a
:class:`~labkit.check.Result` that names the mistake (missing scale, softmax over the wrong axis,
mask inverted, overflow on large scores, a running sum not rescaled, ...) without writing the fix.
The exercises are to write these things, so a function that calls torch's or labkit's own softmax,
attention, mask or head helpers is refused. ``solution(name)`` returns a reference solution's
source; it is only shown when asked for.
"""

from __future__ import annotations

import contextlib
import functools
import math
import secrets
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from labkit import attention as A
from labkit.check import Result, _Stopped, attempt, checker_book, correct, mistake, solution_book

TOL = 1e-5

# what an exercise may not call: (owner, attribute, the name a learner would recognise)
LIBRARY = [
    (torch, "softmax", "torch.softmax"), (torch, "log_softmax", "torch.log_softmax"),
    (torch.special, "softmax", "torch.special.softmax"), (torch.Tensor, "softmax", "Tensor.softmax"),
    (torch.Tensor, "log_softmax", "Tensor.log_softmax"), (F, "softmax", "F.softmax"),
    (F, "log_softmax", "F.log_softmax"), (F, "scaled_dot_product_attention", "F.scaled_dot_product_attention"),
    (F, "multi_head_attention_forward", "F.multi_head_attention_forward"),
    (torch.nn.MultiheadAttention, "forward", "nn.MultiheadAttention"),
] + [(A, name, f"labkit.attention.{name}") for name in (
    "softmax", "scaled_dot_product_attention", "attention_weights", "online_softmax_attention", "causal_mask",
    "split_heads", "merge_heads")]


def _close(a: Any, b: torch.Tensor, tol: float = TOL) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and bool(torch.allclose(
        a.double(), b.double(), atol=tol, rtol=tol))


@contextlib.contextmanager
def _watch_library() -> Iterator[list[str]]:
    """Record every call of the functions in :data:`LIBRARY` while the block runs (they still work)."""
    used: list[str] = []
    saved = []
    for owner, attr, label in LIBRARY:
        own = attr in vars(owner)
        original = getattr(owner, attr)

        def spy(*args, _original=original, _label=label, **kwargs):
            used.append(_label)
            return _original(*args, **kwargs)

        saved.append((owner, attr, own, vars(owner).get(attr)))
        setattr(owner, attr, functools.wraps(original)(spy) if callable(original) else spy)
    try:
        yield used
    finally:
        for owner, attr, own, original in reversed(saved):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


def _run(fn: Callable, *args: Any, on: str = "", **kwargs: Any) -> Any:
    """Call the learner's ``fn`` like :func:`attempt`; a call of a library version ends the check."""
    same = [label for owner, attr, label in LIBRARY if getattr(owner, attr) is fn]
    if same:  # the function object itself, e.g. split_heads = A.split_heads
        used = same
    else:
        with _watch_library() as used:
            got = attempt(fn, *args, on=on, **kwargs)
    if used:
        raise _Stopped(mistake("library", f"your function calls {used[0]}: this exercise is to write it yourself "
                                          "from tensor operations (exp, max, sum, @, reshapes)", used=used[0]))
    return got


def _fresh(checker: Callable[..., Result]) -> Callable[..., Result]:
    """Give a checker a generator from ``seed`` (a fresh one when None) and put the seed in its verdict."""

    def run(fn: Callable, seed: int | None = None) -> Result:
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        try:
            result = checker(fn, torch.Generator().manual_seed(seed))
        except _Stopped as stop:
            result = stop.result
        if result.passed is None:
            return result
        return replace(result, message=f"{result.message} (seed {seed})", details={**result.details, "seed": seed})

    run.__name__, run.__doc__ = checker.__name__, checker.__doc__  # not functools.wraps: keep run's signature
    return run


def _tensor(got: Any, what: str, shape: tuple[int, ...], hint: str = "") -> Result | None:
    if not isinstance(got, torch.Tensor):
        return mistake("type", f"{what}: return a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != shape:
        return mistake("shape", f"{what} has shape {tuple(got.shape)}, expected {shape}{hint}")
    return None


# ---------------------------------------------------------------------------------------- attention
def _ref_attention(q, k, v, mask=None, scale=None, dim=-1):
    s = q.double() @ k.double().transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=dim) @ v.double()


@_fresh
def _check_attention(fn: Callable, g: torch.Generator) -> Result:
    """Check ``fn(q, k, v, mask=None)`` = softmax(q k^T / sqrt(d_k)) v, bool mask True = may attend."""
    b, h, t, s, d, dv = 2, 3, 5, 6, 8, 4  # every size distinct, so a swapped axis shows in the shape
    q, k = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, s, d, generator=g)
    v = torch.randn(b, h, s, dv, generator=g)
    got = _run(fn, q, k, v)
    want = _ref_attention(q, k, v)
    hint = " (the T_q x T_k weights, not yet multiplied by v?)" if isinstance(got, torch.Tensor) and \
        got.shape == (b, h, t, s) else " = (..., T_q, d_v)"
    if (bad := _tensor(got, "the output", tuple(want.shape), hint)) is not None:
        return bad
    if not _close(got, want):
        if _close(got, _ref_attention(q, k, v, scale=1.0)):
            return mistake("missing_scale", "the scores are not scaled: their spread grows with d_k (here 8) and the "
                                            "softmax saturates; see section 3")
        if _close(got, _ref_attention(q, k, v, scale=1 / d)):
            return mistake("wrong_scale", "the scores are scaled by 1/d_k; look again at the formula's denominator")
        if _close(got, _ref_attention(q, k, v, dim=-2)):
            return mistake("wrong_axis", "your weights sum to 1 over the queries (dim=-2); each query's weights over "
                                         "the keys must sum to 1")
        return mistake("values", f"wrong values: max difference {(got - want).abs().max():.3g}")
    mask = torch.rand(b, 1, t, s, generator=g) > 0.5  # broadcast over the heads, as a padding mask is
    # every row keeps one allowed and one forbidden key, so an inverted mask never makes a row
    # all -inf (softmax NaN), which would hide the inversion behind a generic message
    mask[..., 0] = True
    mask[..., -1] = False
    got_m = _run(fn, q, k, v, mask=mask, on="a call with mask=")
    if not _close(got_m, _ref_attention(q, k, v, mask=mask)):
        flipped = ~mask
        flipped[..., 0] = True
        if _close(got_m, _ref_attention(q, k, v, mask=~mask)) or _close(got_m, _ref_attention(q, k, v, mask=flipped)):
            return mistake("mask_inverted", "the mask is inverted: your output attends where the mask is False. Here "
                                            "(as in F.scaled_dot_product_attention) True means 'may attend'")
        if _close(got_m, want):
            return mistake("mask_ignored", "the mask is ignored: the output is the same with and without it")
        return mistake("mask", "right without a mask, wrong with one: a forbidden key must get weight exactly 0")
    qb, kb = q * 10, k * 10  # scaled scores in the hundreds: what large activations give
    got_big = _run(fn, qb, kb, v, on="large scores")
    if not (isinstance(got_big, torch.Tensor) and torch.isfinite(got_big).all()):
        top = float((qb @ kb.transpose(-2, -1)).abs().max() / math.sqrt(d))
        return mistake("overflow", f"inf or nan when the scaled scores reach {top:.0f}: exp() overflows float32 "
                                   "above about 88.7 (worked example, step 3)")
    if not _close(got_big, _ref_attention(qb, kb, v), tol=1e-3):  # float32 rounds scores of 100s by ~1e-5
        return mistake("values", "right on small scores, wrong on large ones")
    return correct("attention is right: scaled, softmax over the keys, masked the right way round, stable")


# ------------------------------------------------------------------------------------- causal mask
def _lower_right(t_q: int, t_k: int) -> torch.Tensor:
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)


@_fresh
def _check_causal_mask(fn: Callable[[int, int], torch.Tensor], g: torch.Generator) -> Result:
    """Check ``fn(t_q, t_k)``: bool (t_q, t_k), the queries being the last t_q of t_k positions."""
    t_k = int(torch.randint(6, 12, (), generator=g))
    cases = [(t_k, t_k), (int(torch.randint(2, t_k - 1, (), generator=g)), t_k), (1, t_k)]
    for t_q, t_k in cases:
        got = _run(fn, t_q, t_k, on=f"t_q={t_q}, t_k={t_k}")
        want = _lower_right(t_q, t_k)
        if (bad := _tensor(got, f"the mask for t_q={t_q}, t_k={t_k}", (t_q, t_k), " = (t_q, t_k)")) is not None:
            return bad
        if got.dtype != torch.bool:
            if got.is_floating_point() and torch.equal(torch.isinf(got), ~want):
                return mistake("dtype", "this is an additive float mask (0 / -inf); the exercise asks for a bool "
                                        "mask, True = may attend")
            return mistake("dtype", f"return a bool tensor (True = may attend), got {got.dtype}")
        if torch.equal(got, want):
            continue
        where = f" (t_q={t_q}, t_k={t_k})"
        off = t_k - t_q
        eye = torch.ones(t_q, t_k, dtype=torch.bool).tril(off) & ~torch.ones(t_q, t_k, dtype=torch.bool).tril(off - 1)
        if torch.equal(got, ~want):
            return mistake("mask_inverted", f"the mask is inverted{where}: True must mean 'may attend', and a query "
                                            "may attend to itself and to the past")
        if torch.equal(got, torch.ones(t_q, t_k, dtype=torch.bool).triu(off)) or torch.equal(
                got, torch.ones(t_q, t_k, dtype=torch.bool).triu()):
            return mistake("future", f"your queries see the future{where}: query (row) i may see the keys (columns) "
                                     "at or before its own position, none after")
        if torch.equal(got, want & ~eye):
            return mistake("diagonal", f"a query may not see its own key in your mask{where}; it should")
        if t_q < t_k and torch.equal(got, torch.ones(t_q, t_k, dtype=torch.bool).tril()):
            return mistake("top_left", f"right when t_q == t_k, but{where} your queries see only as far as if they "
                                       "were the first t_q tokens; they are the last t_q of the t_k")
        return mistake("values", f"wrong values{where}; print your mask and check row by row which keys each "
                                 "query may see")
    return correct(f"causal mask is right (checked at {', '.join(f'{a}x{b}' for a, b in cases)})")


# ------------------------------------------------------------------------------------ online softmax
def _ref_update(m, l, acc, s, v):
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    alpha = torch.exp(m - m_new)
    p = torch.exp(s - m_new)
    return m_new, l * alpha + p.sum(-1, keepdim=True), acc * alpha + p @ v


def _blocks(t: int, g: torch.Generator) -> list[tuple[int, int]]:
    """Split range(t) into consecutive blocks of random sizes 1..5."""
    out, i = [], 0
    while i < t:
        j = min(t, i + int(torch.randint(1, 6, (), generator=g)))
        out.append((i, j))
        i = j
    return out


def _diagnose_step(got, m, l, acc, s, v) -> Result | None:
    """Compare one learner step with the reference, from the same state; name what is off."""
    m_new, l_new, acc_new = _ref_update(m, l, acc, s, v)
    gm, gl, gacc = got
    alpha, p = torch.exp(m - m_new), torch.exp(s - m_new)
    if not _close(gm, m_new):
        if _close(gm, s.amax(-1, keepdim=True)):
            return mistake("block_max", "m is the maximum of this block only; it must stay the maximum of every "
                                        "score seen so far")
        if _close(gm, m):
            return mistake("max_not_updated", "m does not change when the new block holds larger scores")
        return mistake("running_max", "m is not the maximum of the scores seen so far")
    if not _close(gl, l_new):
        if _close(gl, l + p.sum(-1, keepdim=True)):
            return mistake("l_not_rescaled", "l is off whenever the maximum grows: the old sum was taken relative to "
                                             "the old maximum and the new terms relative to the new one")
        if _close(gl, l * alpha + torch.exp(s).sum(-1, keepdim=True)) or _close(gl, l + torch.exp(s).sum(-1, keepdim=True)):
            return mistake("no_max_subtracted", "the new terms of l are exp(s) of the raw scores: that overflows for "
                                                "large scores, and mixes with terms taken relative to m")
        if _close(gl, l / alpha + p.sum(-1, keepdim=True)):
            return mistake("rescale_inverted", "l is rescaled the wrong way: when the maximum grows, the old terms "
                                               "must get smaller relative to it, not larger")
        return mistake("running_sum", "l is not the sum of exp(score - m) over the scores seen so far")
    if not _close(gacc, acc_new):
        if _close(gacc, acc + p @ v):
            return mistake("acc_not_rescaled", "acc is off whenever the maximum grows: its old part was weighted "
                                               "relative to the old maximum (l is right, acc is not)")
        if _close(gacc, acc_new / l_new):
            return mistake("normalised", "acc is already divided by l; here acc stays un-normalised and the "
                                         "output is acc / l after the last block")
        if _close(gacc, acc / alpha + p @ v):
            return mistake("rescale_inverted", "acc is rescaled the wrong way: when the maximum grows, the old "
                                               "part must get smaller relative to it, not larger")
        if _close(gacc, acc * alpha + torch.exp(s) @ v):
            return mistake("no_max_subtracted", "the new part of acc weighs v by exp(s) of the raw scores: that "
                                                "overflows, and mixes with terms taken relative to m")
        return mistake("running_output", "acc is not the sum of exp(score - m) * v over the keys seen so far")
    return None


@_fresh
def _check_online_softmax(fn: Callable, g: torch.Generator) -> Result:
    """Check ``fn(m, l, acc, s, v) -> (m, l, acc)``: one online-softmax block update."""
    b, t_q, d, dv = 3, 4, 8, 5
    t_k = int(torch.randint(9, 20, (), generator=g))
    q, k = torch.randn(b, t_q, d, generator=g), torch.randn(b, t_k, d, generator=g)
    v = torch.randn(b, t_k, dv, generator=g)
    # first from a state the reference reached on block 1 (so every mistake shows on a state that is not
    # all -inf and 0), then from the start, then with scores so large that exp() of them overflows
    for spread, label, first in ((1.0, "ordinary scores", 1), (1.0, "ordinary scores", 0), (40.0, "large scores", 0)):
        scores = (q * spread) @ (k * spread).transpose(-2, -1) / math.sqrt(d)
        if spread == 1.0:  # a later block with a larger maximum: the case that needs rescaling
            scores[..., -1] += 4.0
        blocks = _blocks(t_k, g)
        m = torch.full((b, t_q, 1), float("-inf"))
        l, acc = torch.zeros(b, t_q, 1), torch.zeros(b, t_q, dv)
        ref = (m, l, acc)
        for n, (k0, k1) in enumerate(blocks):
            s, vb = scores[..., k0:k1], v[:, k0:k1]
            if n < first:
                ref = _ref_update(*ref, s, vb)
                continue
            where = f"block {n + 1} of {len(blocks)}, keys {k0}..{k1 - 1}, {label}"
            got = _run(fn, *(x.clone() for x in (*ref, s, vb)), on=where)
            if not (isinstance(got, tuple | list) and len(got) == 3):
                return mistake("type", f"return the three updated tensors (m, l, acc), got {type(got).__name__}")
            for x, name, shape in zip(got, "m l acc".split(), [(b, t_q, 1), (b, t_q, 1), (b, t_q, dv)]):
                hint = " (did a max or sum lose its kept dimension?)" if name != "acc" else ""
                if (bad := _tensor(x, f"{name} after {where}", shape, hint)) is not None:
                    return bad
            if not all(torch.isfinite(x).all() for x in got):
                if spread > 1:
                    return mistake("overflow", f"inf or nan after {where} (scores up to {float(s.max()):.0f}): "
                                               "exp() overflows float32 above about 88.7")
                return mistake("nan", f"inf or nan after {where}" + (
                    ": on the first block m is still -inf" if n == 0 else ""))
            if (bad := _diagnose_step(got, *ref, s, vb)) is not None:
                return replace(bad, message=f"{bad.message} (after {where})")
            ref = _ref_update(*ref, s, vb)
        want = torch.softmax(scores.double(), -1) @ v.double()
        if not _close(ref[2] / ref[1], want, tol=1e-4):  # labkit's bug, not the learner's
            raise AssertionError("the reference online update disagrees with softmax attention")
    return correct(f"online update is right: over {len(blocks)} blocks of random sizes, acc / l equals full "
                   "softmax attention, also for scores that would overflow exp()")


# ------------------------------------------------------------------------------------------ heads
@_fresh
def _check_split_heads(fn: Callable[[torch.Tensor, int], torch.Tensor], g: torch.Generator) -> Result:
    """Check ``fn(x, n_head)``: (B, T, C) -> (B, n_head, T, C // n_head), head h = channels h*D..(h+1)*D."""
    b, t, h, d = 2, 5, 3, 4
    x = torch.randn(b, t, h * d, generator=g)
    got = _run(fn, x, h)
    want = x.view(b, t, h, d).transpose(1, 2)
    if isinstance(got, torch.Tensor) and tuple(got.shape) == (b, t, h, d):
        return mistake("shape", f"shape {tuple(got.shape)} is (B, T, H, D); attention wants the heads before time, "
                                "(B, H, T, D)")
    if (bad := _tensor(got, "the output", tuple(want.shape), " = (B, H, T, D)")) is not None:
        return bad
    if not torch.equal(got, want):
        if torch.equal(got, x.reshape(b, h, t, d)):
            return mistake("layout", "right shape, but the heads are scrambled: each 'head' holds pieces of several "
                                     "tokens; head h must hold channels h*D:(h+1)*D of every token")
        if torch.equal(got, x.view(b, t, d, h).permute(0, 3, 1, 2)):
            return mistake("interleaved", "head h holds every H-th channel; it must hold a contiguous slice, "
                                          "channels h*D:(h+1)*D")
        return mistake("layout", "right shape, wrong values: head h must hold channels h*D:(h+1)*D of every token")
    return correct("split_heads is right")


@_fresh
def _check_merge_heads(fn: Callable[[torch.Tensor], torch.Tensor], g: torch.Generator) -> Result:
    """Check ``fn(y)``: (B, H, T, D) -> (B, T, H * D), the inverse of split_heads."""
    b, h, t, d = 2, 3, 5, 4
    y = torch.randn(b, h, t, d, generator=g)
    got = _run(fn, y)
    want = y.transpose(1, 2).reshape(b, t, h * d)
    if (bad := _tensor(got, "the output", tuple(want.shape), " = (B, T, H*D)")) is not None:
        return bad
    if not torch.equal(got, want):
        if torch.equal(got, y.reshape(b, t, h * d)):
            return mistake("layout", "right shape, but tokens are scrambled: y is laid out head by head, so reshaping "
                                     "it directly glues pieces of different tokens together")
        if torch.equal(got, y.permute(0, 2, 3, 1).reshape(b, t, h * d)):
            return mistake("interleaved", "the channels of the heads are interleaved; token t's channels must be head "
                                          "0's D values, then head 1's, ... (what split_heads took apart)")
        return mistake("layout", "right shape, wrong values: merging must undo split_heads")
    return correct("merge_heads is right: it undoes split_heads")


check = checker_book("attention", {"attention": _check_attention, "causal_mask": _check_causal_mask,
                                   "online_softmax": _check_online_softmax, "split_heads": _check_split_heads,
                                   "merge_heads": _check_merge_heads})
EXERCISES = check.names


# --------------------------------------------------------------------------------------- solutions
def _solution_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # True = may attend
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # subtract the row max: exp never overflows
    weights = e / e.sum(dim=-1, keepdim=True)  # each query's row sums to 1
    return weights @ v


def _solution_causal_mask(t_q, t_k):
    # query i sits at position t_k - t_q + i and may see the keys 0 .. t_k - t_q + i
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)


def _solution_online_softmax(m, l, acc, s, v):
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # the largest score seen so far
    alpha = torch.exp(m - m_new)  # moves sums taken relative to m to be relative to m_new (<= 1)
    p = torch.exp(s - m_new)  # the new block's terms, relative to m_new: never overflow
    return m_new, l * alpha + p.sum(dim=-1, keepdim=True), acc * alpha + p @ v


def _solution_split_heads(x, n_head):
    b, t, c = x.shape
    return x.view(b, t, n_head, c // n_head).transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)


def _solution_merge_heads(y):
    b, h, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, h * d)  # reshape copies: the transpose is not contiguous


_SOLUTIONS = {"attention": _solution_attention, "causal_mask": _solution_causal_mask,
              "online_softmax": _solution_online_softmax, "split_heads": _solution_split_heads,
              "merge_heads": _solution_merge_heads}


solution = solution_book("attention", _SOLUTIONS)


def solution_function(name: str) -> Callable:
    """The reference solution as a function (used by the tests and to compare outputs)."""
    if name not in _SOLUTIONS:
        raise ValueError(f"no solution named {name!r}; valid choices: {', '.join(EXERCISES)}")
    return _SOLUTIONS[name]
