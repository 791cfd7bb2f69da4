"""Checkers for the fine-tuning notebook: mean pooling that ignores padding.

``check("mean_pool", fn, seed=None)`` calls ``fn(hidden, attention_mask)`` on fresh random hidden
states (B, T, C) and masks (B, T) of 1 for tokens and 0 for padding, compares it with the mean of each
row's real tokens, and names the usual mistakes: padding averaged in, dividing by the padded length,
a sum instead of a mean, the [CLS] vector only, the mean over the wrong axis. The seed is in the
message, so a failing case can be replayed with ``seed=``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from labkit.check import Result, attempt, checker_book, correct, defined_function, mistake, solution_book


def _gen(seed: int | None) -> tuple[torch.Generator, int]:
    seed = int(torch.randint(0, 2**31, ())) if seed is None else seed
    return torch.Generator().manual_seed(seed), seed


def _case(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states whose padding positions hold large values (so averaging them in shows), and a
    mask with a different number of real tokens per row (at least one, the [CLS] token)."""
    b, t, c = (int(torch.randint(3, 6, (), generator=g)), int(torch.randint(6, 11, (), generator=g)),
               int(torch.randint(4, 9, (), generator=g)))
    while c == t:
        c += 1  # a (B, T) answer must not pass for (B, C)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = t, max(1, t // 2)  # one full row, one half padded
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    hidden = torch.randn(b, t, c, generator=g)
    hidden = torch.where(mask[..., None].bool(), hidden, 50 + 10 * torch.randn(b, t, c, generator=g))
    return hidden, mask


def _reference(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask[..., None].to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def _check_mean_pool(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], seed: int | None = None) -> Result:
    """Check ``fn(hidden (B, T, C), attention_mask (B, T)) -> (B, C)``: the mean over each row's real tokens."""
    g, seed = _gen(seed)
    for _ in range(3):
        hidden, mask = _case(g)
        b, t, c = hidden.shape
        got = attempt(fn, hidden.clone(), mask.clone(), on=f"hidden {tuple(hidden.shape)}, mask {tuple(mask.shape)}")
        if got is None:
            return mistake("none", f"your function returned None: return a tensor of shape (B, C) (seed {seed})")
        if not isinstance(got, torch.Tensor):
            return mistake("type", f"return a torch.Tensor, not {type(got).__name__} (seed {seed})")
        want = _reference(hidden, mask)
        if _close(got, want):
            continue
        w = mask[..., None].to(hidden.dtype)
        if got.shape == (b, t):
            return mistake("axis", f"your result has shape (B, T) = {tuple(got.shape)}: you averaged over the "
                                   f"hidden dimension; a sentence vector keeps C = {c} numbers and averages over the "
                                   f"tokens (seed {seed})")
        if got.shape != (b, c):
            return mistake("shape", f"expected shape (B, C) = {(b, c)}, got {tuple(got.shape)} (seed {seed})")
        if _close(got, hidden.mean(1)):
            return mistake("padding", "the padding positions were averaged in: the padded vectors must not count, "
                                      f"the mask says which positions are real tokens (seed {seed})")
        if _close(got, (hidden * w).sum(1) / t):
            return mistake("length", "you left the padding out of the sum but divided by the padded length T: a row "
                                     f"with fewer real tokens comes out too small (seed {seed})")
        if _close(got, (hidden * w).sum(1)):
            return mistake("sum", f"that is the sum over the real tokens, not their mean (seed {seed})")
        if _close(got, hidden[:, 0]):
            return mistake("cls", "that is the first token's ([CLS]) vector only; the exercise asks for the mean of "
                                  f"all real tokens (seed {seed})")
        bad = int(((got - want).abs().amax(-1) > 1e-4).nonzero()[0])
        return mistake("values", f"row {bad} (with {int(mask[bad].sum())} real tokens of {t}) is off by "
                                 f"{float((got[bad] - want[bad]).abs().max()):.3g} (seed {seed})")
    return correct(f"right: the mean over the real tokens, on 3 random batches with padding (seed {seed})")


check = checker_book("fine-tuning", {"mean_pool": _check_mean_pool})

_SOLUTIONS = {
    "mean_pool": '''\
def my_mean_pool(hidden, attention_mask):
    w = attention_mask.unsqueeze(-1).to(hidden.dtype)   # (B, T, 1): 1 for tokens, 0 for padding
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)   # sum of real tokens / their count
''',
}

solution = solution_book("fine-tuning", _SOLUTIONS)


def solved(name: str) -> Any:
    """The reference solution as a function (what ``solution(name)`` defines)."""
    return defined_function(solution(name))
