"""The pruning checkers accept right answers and name the typical mistakes, on fresh random inputs."""

import pytest
import torch

from labkit.check.prune import (check, reference_global_masks, reference_head_mask, reference_magnitude_mask,
                                reference_zero_heads, solution)

SEEDS = [None, 1, 2, 3]  # None: a fresh draw, as in the notebook; fixed ones so a failure can be rerun


def not_yet(*args):
    raise NotImplementedError


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_solutions_pass(seed):
    assert check("magnitude_mask", reference_magnitude_mask, seed=seed)
    assert check("global_masks", reference_global_masks, seed=seed)
    assert check("head_mask", reference_head_mask, seed=seed)
    assert check("zero_heads", reference_zero_heads, seed=seed)


def test_the_seed_is_named_and_reproduces():
    r = check("magnitude_mask", reference_magnitude_mask)
    assert f"seed {r.details['seed']}" in r.message
    wrong = lambda w, a: reference_magnitude_mask(w, a / 2)  # noqa: E731
    assert check("magnitude_mask", wrong, seed=5).message == check("magnitude_mask", wrong, seed=5).message


@pytest.mark.parametrize("name", ["magnitude_mask", "global_masks", "head_mask", "zero_heads"])
def test_starters_are_not_attempted(name):
    assert check(name, not_yet).passed is None


def test_a_different_correct_mask_passes():
    def by_threshold(w, amount):
        k = round(amount * w.numel())
        if k == 0:
            return torch.ones_like(w, dtype=torch.bool)
        t = w.abs().flatten().kthvalue(k).values
        return w.abs() > t

    assert check("magnitude_mask", by_threshold)


def _signed(w, amount):
    k = round(amount * w.numel())
    m = torch.ones(w.numel(), dtype=torch.bool)
    m[torch.topk(w.flatten(), k, largest=False).indices] = False
    return m.view_as(w)


@pytest.mark.parametrize("fn,problem", [
    (lambda w, a: ~reference_magnitude_mask(w, a), "inverted"),
    (lambda w, a: reference_magnitude_mask(w, a / 2), "count"),
    (lambda w, a: reference_magnitude_mask(w, a).float(), None),  # a 0/1 float mask is accepted
    (lambda w, a: torch.ones(3), "shape"),
    (lambda w, a: w.mul_(0).bool(), "modified_input"),
    (_signed, "no_abs"),
])
def test_mask_mistakes_are_named(fn, problem):
    r = check("magnitude_mask", fn)
    if problem is None:
        assert r.passed
    else:
        assert not r.passed and r.problem == problem, r.message


@pytest.mark.parametrize("fn,problem", [
    (lambda ws, a: [reference_magnitude_mask(w, a) for w in ws], "per_layer"),          # the same fraction per layer
    (lambda ws, a: [~m for m in reference_global_masks(ws, a)], "inverted"),
    (lambda ws, a: reference_global_masks(ws, a / 2), "count"),
    (lambda ws, a: reference_global_masks(ws, a)[:1], "length"),
    (lambda ws, a: [torch.zeros(2) for _ in ws], "shape"),
    (lambda ws, a: [_signed(torch.cat([w.flatten() for w in ws]), a)[:0] for w in ws], "shape"),
])
def test_global_mask_mistakes_are_named(fn, problem):
    for seed in SEEDS:
        r = check("global_masks", fn, seed=seed)
        assert not r.passed and r.problem == problem, r.message


def test_global_masks_ranked_by_signed_value_are_caught():
    def signed(ws, amount):
        flat = torch.cat([w.flatten() for w in ws])
        keep = _signed(flat, amount)
        return [m.view_as(w) for m, w in zip(keep.split([w.numel() for w in ws]), ws)]

    r = check("global_masks", signed)
    assert not r.passed and r.problem == "no_abs", r.message


def _per_layer(scores, k):
    keep = torch.ones_like(scores, dtype=torch.bool)
    for i, s in enumerate(scores):
        keep[i, torch.topk(s, min(k, len(s)), largest=False).indices] = False
    return keep


def _spread_per_layer(scores, k):
    """k heads in all, but spread evenly over the layers: each layer's lowest."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    per = [k // len(scores) + (i < k % len(scores)) for i in range(len(scores))]
    for i, s in enumerate(scores):
        keep[i, torch.topk(s, per[i], largest=False).indices] = False
    return keep


@pytest.mark.parametrize("fn,problem", [
    (lambda s, k: reference_head_mask(-s, k), "most_important"),     # topk(largest=True)
    (lambda s, k: ~reference_head_mask(s, k), "most_important"),     # True marked the heads to drop
    (_per_layer, "per_layer"),
    (lambda s, k: reference_head_mask(s, k - 1), "count"),
    (_spread_per_layer, "wrong_heads"),
    (lambda s, k: reference_head_mask(s.T, k), "shape"),
    (lambda s, k: reference_head_mask(s.sort(dim=1).values, k), "wrong_heads"),   # sorted in place of indices
])
def test_head_mask_mistakes_are_named(fn, problem):
    for seed in SEEDS:
        r = check("head_mask", fn, seed=seed)
        assert not r.passed and r.problem == problem, (seed, r.message)


def _zero(model, keep, pick):
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            a = block.attn
            for h in torch.nonzero(~keep[layer]).flatten().tolist():
                pick(a, h, a.n_head, a.head_dim)


@pytest.mark.parametrize("pick,problem", [
    (lambda a, h, n, d: a.c_proj.weight[h * d:(h + 1) * d].zero_(), "wrong_axis"),          # rows = outputs
    (lambda a, h, n, d: a.c_proj.weight[:, h::n].zero_(), "strided"),                        # every n-th column
    (lambda a, h, n, d: None, "unchanged"),
])
def test_zero_heads_mistakes_are_named(pick, problem):
    for seed in SEEDS:
        r = check("zero_heads", lambda m, keep: _zero(m, keep, pick), seed=seed)
        assert not r.passed and r.problem == problem, (seed, r.message)


def test_zero_heads_that_zeroes_the_kept_heads_or_one_layer_only_fails():
    r = check("zero_heads", lambda m, keep: reference_zero_heads(m, ~keep))
    assert not r.passed and r.problem == "inverted", r.message
    r = check("zero_heads", lambda m, keep: reference_zero_heads(m, keep[:1].expand_as(keep)), seed=2)
    assert not r.passed and r.problem in ("other_layers", "wrong"), r.message


def test_zero_heads_by_value_rows_also_passes():
    """Another correct way: zero the head's value rows (and their bias): its output is then zero too."""
    def by_values(model, keep):
        with torch.no_grad():
            for layer, block in enumerate(model.transformer.h):
                a, inner = block.attn, block.attn.n_head * block.attn.head_dim
                for h in torch.nonzero(~keep[layer]).flatten().tolist():
                    rows = slice(2 * inner + h * a.head_dim, 2 * inner + (h + 1) * a.head_dim)
                    a.c_attn.weight[rows] = 0
                    a.c_attn.bias[rows] = 0

    assert check("zero_heads", by_values)


def test_solution_is_source_and_names_are_checked():
    assert "topk" in solution("magnitude_mask") and "topk" in solution("head_mask")
    with pytest.raises(ValueError, match="magnitude_mask, global_masks, head_mask, zero_heads"):
        solution("nope")


@pytest.mark.parametrize("name", ["magnitude_mask", "global_masks", "head_mask", "zero_heads"])
def test_shown_solutions_run_where_the_notebook_pastes_them(name):
    space = {"torch": torch}  # what 07 has imported by then
    exec(solution(name), space)
    fn = next(v for k, v in space.items() if callable(v) and k != "torch" and not k.startswith("_"))
    assert check(name, fn)
