"""Checkers for the training notebook: the learning-rate schedule and the effective batch size.

Each checker runs the learner's answer on fresh cases, compares it with ``labkit.train`` and
says *what* is off (warmup off by one, no floor at ``min_lr``, linear instead of cosine, a
factor missing from the batch, ...). ``check("lr_schedule", fn)`` and ``check("effective_batch", fn)`` never raise for a wrong answer, so a
notebook with an unfinished exercise still runs top to bottom; they return a
:class:`~labkit.check.Result` that names the mistake.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

from labkit.check import Result, attempt, checker_book, correct, defined_function, mistake, solution_book
from labkit.train import TrainConfig, lr_at


def _diagnose_lr(got: Callable[[int], float], c: TrainConfig) -> str | None:
    """What is wrong with a schedule, as one sentence; None when it matches."""
    want = [lr_at(s, c) for s in range(c.max_steps + 5)]
    have = [got(s) for s in range(c.max_steps + 5)]
    if any(h is None for h in have):
        return "your function returned None: return the learning rate as a float"
    try:
        have = [float(h) for h in have]
    except (TypeError, ValueError):
        return "your function must return a number"
    if all(math.isclose(h, w, rel_tol=1e-6, abs_tol=1e-12) for h, w in zip(have, want)):
        return None
    w = c.warmup_steps
    if w and have[0] == 0.0:
        return ("the first step gets lr 0, so it is wasted: during warmup use lr * (step + 1) / warmup_steps, "
                "reaching the full lr at step warmup_steps - 1")
    if w and not math.isclose(have[w - 1], c.lr, rel_tol=1e-6):
        return (f"at the end of warmup (step {w - 1}) the lr should be the full lr={c.lr}, yours is {have[w - 1]:.4g}; "
                "ramp linearly: lr * (step + 1) / warmup_steps")
    if any(h < c.min_lr - 1e-12 for h in have):
        return f"your lr goes below min_lr={c.min_lr}: the cosine must end at min_lr, not at 0"
    if not math.isclose(have[c.max_steps + 2], c.min_lr, rel_tol=1e-6):
        return f"after max_steps the lr should stay at min_lr={c.min_lr}, yours is {have[c.max_steps + 2]:.4g}"
    mid = w + (c.max_steps - w) // 4  # a quarter in: cosine and linear differ there (not half-way)
    linear = c.min_lr + (c.lr - c.min_lr) * (1 - (mid - w) / max(1, c.max_steps - w))
    if math.isclose(have[mid], linear, rel_tol=1e-3) and not math.isclose(have[mid], want[mid], rel_tol=1e-3):
        return "your decay is linear; use a half cosine: min_lr + 0.5 * (1 + cos(pi * progress)) * (lr - min_lr)"
    bad = next(s for s, (h, x) in enumerate(zip(have, want)) if not math.isclose(h, x, rel_tol=1e-6, abs_tol=1e-12))
    return (f"at step {bad} (warmup_steps={w}, max_steps={c.max_steps}) the lr should be {want[bad]:.6g}, "
            f"yours is {have[bad]:.6g}")


def _check_lr_schedule(fn: Callable[..., float]) -> Result:
    """Check ``fn(step, lr, min_lr, warmup_steps, max_steps) -> float`` against warmup + cosine decay."""
    rng = random.Random()
    cases = [TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)]
    for _ in range(3):
        lr = rng.choice([1e-3, 6e-4, 3e-3])
        cases.append(TrainConfig(lr=lr, min_lr=lr * rng.choice([0.0, 0.1]), warmup_steps=rng.randint(1, 20),
                                 max_steps=rng.randint(40, 200)))
    for c in cases:
        problem = _diagnose_lr(lambda s, c=c: attempt(fn, s, c.lr, c.min_lr, c.warmup_steps, c.max_steps), c)
        if problem:
            return mistake("schedule", problem)
    return correct(f"your schedule matches labkit.train.lr_at on {len(cases)} random settings")


def _check_effective_batch(fn: Callable[..., int]) -> Result:
    """Check ``fn(batch_size, grad_accum, world_size, block_size) -> tokens per optimizer step``."""
    rng = random.Random()
    for _ in range(5):
        while True:  # distinct factors, so a missing one can be named without ambiguity
            b, a, w, t = rng.randint(2, 48), rng.randint(2, 8), rng.randint(2, 16), rng.choice([64, 128, 256, 1024])
            if len({b, a, w, t}) == 4:
                break
        want = b * a * w * t
        have = attempt(fn, b, a, w, t)
        if have is None:
            return mistake("none", "your function returned None: return the number of tokens per optimizer step")
        if have == want:
            continue
        for name, missing in (("grad_accum", a), ("world_size", w), ("block_size", t), ("batch_size", b)):
            if missing > 1 and have * missing == want:
                return mistake("missing_factor", f"you left out {name}: every one of the {w} ranks does {a} "
                                                 f"micro-batches of {b} sequences of {t} tokens before one optimizer step")
        if have == b * a * w:
            return mistake("sequences", "that is sequences per step; multiply by block_size for tokens")
        return mistake("values", f"for batch_size={b}, grad_accum={a}, world_size={w}, block_size={t} the answer "
                                 f"is {want:,} tokens, yours is {have!r}")
    return correct("right: tokens per step = batch_size × grad_accum × world_size × block_size")


check = checker_book("training", {"lr_schedule": _check_lr_schedule, "effective_batch": _check_effective_batch})


_SOLUTIONS = {
    "lr_schedule": '''\
import math

def my_lr(step, lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:                      # linear warmup, full lr at step warmup_steps - 1
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:                        # after the schedule: stay at the floor
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
''',
    "effective_batch": '''\
def tokens_per_step(batch_size, grad_accum, world_size, block_size):
    return batch_size * grad_accum * world_size * block_size
''',
}


solution = solution_book("training", _SOLUTIONS)


def solved(name: str) -> Any:
    """The reference solution as a function (what ``solution(name)`` defines)."""
    return defined_function(solution(name))
