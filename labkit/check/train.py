"""Checkers for the training notebook: the learning-rate schedule and a ring all-reduce by hand.

Each checker runs the learner's answer on fresh random cases (``seed=None``: a new seed each time,
named in the message so a case can be replayed with ``seed=``) and says *what* is off (warmup off
by one, no floor at ``min_lr``, linear instead of cosine; the sum instead of the mean, a chunk sent
at the wrong step, the all-gather left out, ...). ``check("lr_schedule", fn)`` and
``check("ring_allreduce", fn)`` never raise for a wrong answer, so a notebook with an unfinished
exercise still runs top to bottom; they return a :class:`~labkit.check.Result` that names the mistake.

:class:`Ring` simulates the ring in one process: ``p`` ranks, each step every rank sends one chunk
of its tensor to its right neighbour; it counts the steps and the numbers each rank sent.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

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
        return ("the first step gets lr 0, so it is wasted: step 0 should already be the first step of the "
                "ramp, which reaches the full lr at step warmup_steps - 1")
    if w and not math.isclose(have[w - 1], c.lr, rel_tol=1e-6):
        return (f"at the end of warmup (step {w - 1}) the lr should be the full lr={c.lr}, yours is {have[w - 1]:.4g}: "
                "your ramp ends one step early or late, or is not a straight line")
    if any(h < c.min_lr - 1e-12 for h in have):
        return f"your lr goes below min_lr={c.min_lr}: the cosine must end at min_lr, not at 0"
    if not math.isclose(have[c.max_steps + 2], c.min_lr, rel_tol=1e-6):
        return f"after max_steps the lr should stay at min_lr={c.min_lr}, yours is {have[c.max_steps + 2]:.4g}"
    mid = w + (c.max_steps - w) // 4  # a quarter in: cosine and linear differ there (not half-way)
    linear = c.min_lr + (c.lr - c.min_lr) * (1 - (mid - w) / max(1, c.max_steps - w))
    if math.isclose(have[mid], linear, rel_tol=1e-3) and not math.isclose(have[mid], want[mid], rel_tol=1e-3):
        return ("your decay is linear; the schedule asks for half a cosine period from lr down to min_lr "
                "(slow at first, fastest half-way, slow again near the end)")
    bad = next(s for s, (h, x) in enumerate(zip(have, want)) if not math.isclose(h, x, rel_tol=1e-6, abs_tol=1e-12))
    return (f"at step {bad} (warmup_steps={w}, max_steps={c.max_steps}) the lr should be {want[bad]:.6g}, "
            f"yours is {have[bad]:.6g}")


def _seeded(result: Result, seed: int) -> Result:
    """The verdict with its random seed in the message and the details, so the case can be replayed."""
    return replace(result, message=f"{result.message} (seed {seed})", details={**result.details, "seed": seed})


def _fresh_seed(seed: int | None) -> int:
    return random.SystemRandom().randrange(2**31) if seed is None else seed


def _check_lr_schedule(fn: Callable[..., float], seed: int | None = None) -> Result:
    """Check ``fn(step, lr, min_lr, warmup_steps, max_steps) -> float`` against warmup + cosine decay."""
    seed = _fresh_seed(seed)
    rng = random.Random(seed)
    cases = [TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)]
    for _ in range(3):
        lr = rng.choice([1e-3, 6e-4, 3e-3])
        cases.append(TrainConfig(lr=lr, min_lr=lr * rng.choice([0.0, 0.1]), warmup_steps=rng.randint(1, 20),
                                 max_steps=rng.randint(40, 200)))
    for c in cases:
        problem = _diagnose_lr(lambda s, c=c: attempt(fn, s, c.lr, c.min_lr, c.warmup_steps, c.max_steps), c)
        if problem:
            return _seeded(mistake("schedule", problem), seed)
    return _seeded(correct(f"your schedule matches labkit.train.lr_at on {len(cases)} random settings"), seed)


class RingError(ValueError):
    """A send the ring cannot carry: not one (chunk index, chunk) per rank, or a piece of the wrong size."""


class Ring:
    """``world_size`` ranks in a ring, simulated in one process. ``exchange(sends)`` is one step: rank r
    sends ``sends[r] = (chunk_index, tensor)`` to rank r+1 (the last to rank 0) and receives from rank r-1.
    ``steps`` counts the steps, ``sent[r]`` the numbers rank r sent, ``log`` the chunk indices sent per step."""

    def __init__(self, world_size: int, numel: int | None = None) -> None:
        if world_size < 1:
            raise ValueError("a ring needs at least one rank")
        self.world_size = world_size
        self.numel = numel  # the length of each rank's tensor; None: learnt from the first split()
        self.steps = 0
        self.sent = [0] * world_size
        self.log: list[list[int]] = []

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A tensor's ``world_size`` chunks, flattened (copies; the last ones are shorter by one when the
        world size does not divide its length)."""
        flat = tensor.reshape(-1)
        if self.numel is None:
            self.numel = flat.numel()
        return [c.clone() for c in torch.tensor_split(flat, self.world_size)]

    def chunk_sizes(self) -> list[int]:
        """How many numbers each chunk index holds."""
        n, p = self.numel or 0, self.world_size
        return [n // p + (1 if c < n % p else 0) for c in range(p)]

    def exchange(self, sends: Sequence[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
        """One step of the ring: every rank sends one chunk to its right neighbour; ``received[r]`` is
        the ``(chunk_index, tensor)`` rank r got from rank r-1."""
        p = self.world_size
        sends = list(sends)
        if len(sends) != p:
            raise RingError(f"a step needs one send per rank: {p} ranks, {len(sends)} sends")
        sizes = self.chunk_sizes() if self.numel is not None else None
        for r, item in enumerate(sends):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise RingError(f"rank {r}'s send is not a pair (chunk_index, tensor): {type(item).__name__}")
            c, t = item
            if not isinstance(c, int) or not 0 <= c < p:
                raise RingError(f"rank {r} sends chunk index {c!r}; chunk indices run from 0 to {p - 1}")
            if sizes is not None and t.numel() != sizes[c]:
                raise RingError(f"rank {r} sends {t.numel()} numbers as chunk {c}, which holds {sizes[c]}: "
                                "a step carries one chunk, not a whole gradient")
        self.steps += 1
        self.log.append([c for c, _ in sends])
        for r, (_, t) in enumerate(sends):
            self.sent[r] += t.numel()
        return [(sends[r - 1][0], sends[r - 1][1].detach().clone()) for r in range(p)]


def _close(a: Any, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.to(b.dtype), b, rtol=1e-9, atol=1e-9)


def _contributors(value: float, p: int) -> set[int] | None:
    """Which ranks' gradients a chunk's average holds, when rank r's gradient is all 2**r; None: some twice."""
    total = value * p
    k = round(total)
    if abs(total - k) > 1e-6 or k < 0 or k >= 2**p:
        return None
    return {r for r in range(p) if k >> r & 1}


def _diagnose_ring(fn: Callable[..., Any], p: int, n: int, gen: torch.Generator) -> Result | None:
    """Run ``fn`` on one ring of ``p`` ranks with ``n`` numbers each; a mistake, or None when right."""
    grads = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(p)]
    mean = torch.stack(grads).mean(0)
    ring = Ring(p, numel=n)
    out = attempt(fn, [g.clone() for g in grads], ring, on=f"{p} ranks, {n} numbers each")
    if out is None:
        return mistake("none", "your function returned None: return one tensor per rank, each rank's averaged gradient")
    out = list(out) if isinstance(out, (list, tuple)) else out
    if not isinstance(out, list) or len(out) != p or not all(isinstance(t, torch.Tensor) for t in out):
        return mistake("shape", f"return a list of {p} tensors, one per rank (the world size is {p})")
    out = [t.reshape(-1) if t.numel() == n else t for t in out]
    if ring.steps == 0:
        return mistake("no_ring", "your ranks never sent anything: on a cluster a rank holds only its own gradient, "
                                  "so every number it averages must reach it through ring.exchange")
    if all(_close(t, mean) for t in out):
        if ring.steps != 2 * (p - 1) or sum(ring.sent) != 2 * (p - 1) * n:
            return mistake("steps", f"right values, but {ring.steps} steps for {p} ranks, and the ranks sent "
                                    f"{sum(ring.sent)} numbers in all: a ring all-reduce takes 2(p-1) = {2 * (p - 1)} "
                                    f"steps, and each rank sends 2(p-1)/p of its {n} numbers")
        return None
    if all(_close(t, mean * p) for t in out):
        return mistake("sum", "every rank holds the sum of the gradients, not their mean: DDP applies the average, "
                              "so the learning rate means the same on any number of ranks")
    sizes = ring.chunk_sizes()
    bounds = [sum(sizes[:c]) for c in range(p + 1)]
    done = [[c for c in range(p) if sizes[c] and (_close(out[r][bounds[c]:bounds[c + 1]], mean[bounds[c]:bounds[c + 1]])
                                                   or _close(out[r][bounds[c]:bounds[c + 1]], p * mean[bounds[c]:bounds[c + 1]]))]
            for r in range(p) if out[r].shape == mean.shape]
    if len(done) == p and all(len(d) == 1 for d in done) and ring.steps == p - 1:
        return mistake("no_allgather", "after your p-1 steps each rank holds the finished average of one chunk only, "
                                       "the rest are partial sums: that is the reduce-scatter; the other half of a "
                                       "ring all-reduce is still missing")
    # replay with rank r's gradient all 2**r: each chunk's value says which ranks' gradients it holds
    probe = Ring(p, numel=n)
    out2 = attempt(fn, [torch.full((n,), 2.0 ** r, dtype=torch.float64) for r in range(p)], probe,
                   on=f"{p} ranks, rank r's gradient all 2**r")
    for r in range(p):
        for c in range(p):
            if not sizes[c]:
                continue
            piece = out2[r].reshape(-1)[bounds[c]:bounds[c + 1]] if out2[r].numel() == n else None
            if piece is None or not torch.all(piece == piece[0]):
                continue
            got = _contributors(float(piece[0]), p) or _contributors(float(piece[0]) / p, p)
            if got is None:
                return mistake("chunk_index", f"with {p} ranks, rank {r}'s chunk {c} counts some rank's gradient "
                                              "more than once: a chunk was added in at a step where it was already "
                                              "complete; check which chunk index each rank sends at each step")
            if got != set(range(p)):
                return mistake("chunk_index", f"with {p} ranks, rank {r}'s chunk {c} holds the gradients of ranks "
                                              f"{sorted(got)} only: some rank passed on a chunk it had not finished "
                                              "(or had not received yet); follow one chunk around the ring, step by step")
    return mistake("values", f"with {p} ranks and {n} numbers each, rank(s) "
                             f"{[r for r in range(p) if not _close(out[r], mean)]} do not hold the mean of the gradients")


def _check_ring_allreduce(fn: Callable[..., Any], seed: int | None = None) -> Result:
    """Check ``fn(grads, ring) -> list of tensors``: every rank ends with the mean of all ranks' gradients,
    sent chunk by chunk around the ring (reduce-scatter, then all-gather: 2(p-1) steps)."""
    seed = _fresh_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for p in (rng.randint(3, 8), 2, rng.randint(3, 8)):
        n = rng.randint(p, 6 * p)
        n += 1 if n % p == 0 else 0  # uneven chunks: the last ones shorter by one
        cases.append((p, n))
    for p, n in cases:
        problem = _diagnose_ring(fn, p, n, gen)
        if problem is not None:
            return _seeded(problem, seed)
    p, n = cases[0]
    return _seeded(correct(f"every rank holds the mean on {len(cases)} random rings ({', '.join(str(c[0]) for c in cases)} "
                           f"ranks); with {p} ranks: {2 * (p - 1)} steps, and each rank sent 2(p-1)/p = {2 * (p - 1) / p:.2f} "
                           "times its gradient's size: under twice, however many ranks"), seed)


check = checker_book("training", {"lr_schedule": _check_lr_schedule, "ring_allreduce": _check_ring_allreduce})


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
    "ring_allreduce": '''\
import torch

def ring_allreduce(grads, ring):
    p = len(grads)
    chunks = [ring.split(g) for g in grads]          # chunks[r][c]: rank r's copy of chunk c
    # reduce-scatter: at step s rank r passes on chunk r - s; after p - 1 steps rank r owns chunk r + 1, summed
    for s in range(p - 1):
        sends = [((r - s) % p, chunks[r][(r - s) % p]) for r in range(p)]
        for r, (c, piece) in enumerate(ring.exchange(sends)):
            chunks[r][c] = chunks[r][c] + piece
    # all-gather: the finished chunks go round once more, replacing the partial ones
    for s in range(p - 1):
        sends = [((r + 1 - s) % p, chunks[r][(r + 1 - s) % p]) for r in range(p)]
        for r, (c, piece) in enumerate(ring.exchange(sends)):
            chunks[r][c] = piece
    return [torch.cat(chunks[r]) / p for r in range(p)]
''',
}


solution = solution_book("training", _SOLUTIONS)


def solved(name: str) -> Any:
    """The reference solution as a function (what ``solution(name)`` defines)."""
    return defined_function(solution(name))
