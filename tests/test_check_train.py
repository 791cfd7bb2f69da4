"""labkit.check.train: the checkers accept right answers and say what is wrong with wrong ones."""

import pytest
import torch

from labkit.check.train import Ring, RingError, check, solution, solved


def _todo(*args):
    raise NotImplementedError


def test_solutions_pass_on_fresh_seeds_and_name_the_seed():
    for name in ("lr_schedule", "ring_allreduce"):
        a, b = check(name, solved(name)), check(name, solved(name))
        assert a.passed and b.passed and "seed " in a.message
        assert a.details["seed"] != b.details["seed"]  # fresh random cases each time
        assert check(name, solved(name), seed=7).details["seed"] == 7
        assert check(name, _todo).passed is None  # the untouched starter: not attempted yet
    assert "def my_lr" in solution("lr_schedule") and "ring.exchange" in solution("ring_allreduce")


def test_lr_mistakes_are_named():
    def zero_start(s, lr, lo, w, m):
        return solved("lr_schedule")(s - 1, lr, lo, w, m) if s else 0.0

    def to_zero(s, lr, lo, w, m):
        return solved("lr_schedule")(s, lr, 0.0, w, m) if s >= w else lr * (s + 1) / w

    def linear(s, lr, lo, w, m):
        if s < w:
            return lr * (s + 1) / w
        return lo if s >= m else lo + (lr - lo) * (1 - (s - w) / (m - w))

    assert "wasted" in check("lr_schedule", zero_start).message
    fb = check("lr_schedule", to_zero)
    assert not fb.passed and "min_lr" in fb.message
    assert "linear" in check("lr_schedule", linear).message

    def late_ramp(s, lr, lo, w, m):  # reaches the full lr one step after warmup
        return lr * (s + 1) / (w + 1) if s < w else solved("lr_schedule")(s, lr, lo, w, m)

    r = check("lr_schedule", late_ramp)
    assert r.problem == "schedule" and "end of warmup" in r.message
    assert "None" in check("lr_schedule", lambda *a: None).message
    assert "raised ZeroDivisionError" in check("lr_schedule", lambda *a: 1 / 0).message
    assert not check("lr_schedule", lambda s, lr, lo, w, m: lr)  # constant


def _ring(grads, ring, *, mean=True, allgather=True, shift=1):
    """A ring all-reduce with knobs for the plausible mistakes: sum, no all-gather, all-gather off by one."""
    p = len(grads)
    chunks = [ring.split(g) for g in grads]
    for s in range(p - 1):
        sends = [((r - s) % p, chunks[r][(r - s) % p]) for r in range(p)]
        for r, (c, piece) in enumerate(ring.exchange(sends)):
            chunks[r][c] = chunks[r][c] + piece
    for s in range(p - 1 if allgather else 0):
        sends = [((r + shift - s) % p, chunks[r][(r + shift - s) % p]) for r in range(p)]
        for r, (c, piece) in enumerate(ring.exchange(sends)):
            chunks[r][c] = piece
    return [torch.cat(ch) / (p if mean else 1) for ch in chunks]


def test_ring_mistakes_are_named():
    assert check("ring_allreduce", _ring).passed
    cases = {
        "sum": lambda g, ring: _ring(g, ring, mean=False),
        "no_allgather": lambda g, ring: _ring(g, ring, allgather=False),
        "chunk_index": lambda g, ring: _ring(g, ring, shift=0),  # sends a chunk it has not finished
        "no_ring": lambda g, ring: [torch.stack(g).mean(0) for _ in g],  # reads the other ranks' memory
        "none": lambda g, ring: None,
    }
    for problem, fn in cases.items():
        r = check("ring_allreduce", fn)
        assert r.passed is False and r.problem == problem, (problem, r)
        assert "seed " in r.message

    def whole_gradients(g, ring):  # every rank sends its whole gradient: not one chunk a step
        ring.exchange([(0, t) for t in g])
        return [torch.stack(g).mean(0) for _ in g]

    r = check("ring_allreduce", whole_gradients)
    assert r.problem == "error" and "RingError" in r.message and "one chunk" in r.message

    def twice(g, ring):  # right values, but the all-reduce runs twice: 4(p-1) steps
        _ring(g, ring)
        return _ring(g, ring)

    assert check("ring_allreduce", twice).problem == "steps"


def test_the_ring_passes_chunks_to_the_right_neighbour_and_counts_them():
    ring = Ring(3)
    chunks = ring.split(torch.arange(7.0))
    assert [c.numel() for c in chunks] == ring.chunk_sizes() == [3, 2, 2]
    got = ring.exchange([(0, chunks[0]), (1, chunks[1]), (2, chunks[2])])
    assert [c for c, _ in got] == [2, 0, 1] and torch.equal(got[1][1], chunks[0])
    assert ring.steps == 1 and ring.sent == [3, 2, 2] and ring.log == [[0, 1, 2]]
    with pytest.raises(RingError, match="one send per rank"):
        ring.exchange([(0, chunks[0])])
    with pytest.raises(RingError, match="chunk indices run from 0 to 2"):
        ring.exchange([(3, chunks[0])] * 3)
