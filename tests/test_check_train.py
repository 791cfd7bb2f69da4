"""labkit.check.train: the checkers accept right answers and say what is wrong with wrong ones."""


from labkit.check.train import check, solution, solved


def test_solutions_pass():
    assert check("lr_schedule", solved("lr_schedule")).passed
    assert check("effective_batch", solved("effective_batch")).passed
    assert "def my_lr" in solution("lr_schedule")


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
    assert "None" in check("lr_schedule", lambda *a: None).message
    assert "raised ZeroDivisionError" in check("lr_schedule", lambda *a: 1 / 0).message
    assert not check("lr_schedule", lambda s, lr, lo, w, m: lr)  # constant


def test_batch_mistakes_are_named():
    assert "grad_accum" in check("effective_batch", lambda b, a, w, t: b * w * t).message
    assert "world_size" in check("effective_batch", lambda b, a, w, t: b * a * t).message
    assert "sequences" in check("effective_batch", lambda b, a, w, t: b * a * w).message
    assert "None" in check("effective_batch", lambda *a: None).message
    assert repr(check("effective_batch", lambda b, a, w, t: b * a * w * t)).startswith("✅")
