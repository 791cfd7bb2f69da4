"""The pruning checkers accept right answers and name the typical mistakes."""

import pytest
import torch

from labkit.check.prune import check, reference_layer_sparsity, reference_magnitude_mask, solution


def test_reference_solutions_pass():
    assert check("magnitude_mask", reference_magnitude_mask)
    assert check("layer_sparsity", reference_layer_sparsity)


def test_a_different_correct_mask_passes():
    def by_threshold(w, amount):
        k = round(amount * w.numel())
        if k == 0:
            return torch.ones_like(w, dtype=torch.bool)
        t = w.abs().flatten().kthvalue(k).values
        return w.abs() > t

    assert check("magnitude_mask", by_threshold)


@pytest.mark.parametrize("fn,problem", [
    (lambda w, a: ~reference_magnitude_mask(w, a), "inverted"),
    (lambda w, a: reference_magnitude_mask(w, a / 2), "count"),
    (lambda w, a: reference_magnitude_mask(w, a).float(), None),  # a 0/1 float mask is accepted
    (lambda w, a: torch.ones(3), "shape"),
    (lambda w, a: w.mul_(0).bool(), "modified_input"),
])
def test_mask_mistakes_are_named(fn, problem):
    r = check("magnitude_mask", fn)
    if problem is None:
        assert r.passed
    else:
        assert not r.passed and r.problem == problem, r.message


def test_signed_ranking_is_caught():
    def signed(w, amount):
        k = round(amount * w.numel())
        m = torch.ones(w.numel(), dtype=torch.bool)
        m[torch.topk(w.flatten(), k, largest=False).indices] = False
        return m.view_as(w)

    r = check("magnitude_mask", signed)
    assert not r.passed and r.problem == "no_abs" and "|w|" in r.message


def not_yet():
    raise NotImplementedError


@pytest.mark.parametrize("fn,problem", [
    (lambda m: 100 * reference_layer_sparsity(m), "percent"),
    (lambda m: int((m.weight == 0).sum()), "count"),
    (lambda m: 1 - reference_layer_sparsity(m), "density"),
    (lambda m: float(sum((p == 0).sum() for p in m.parameters())) / sum(p.numel() for p in m.parameters()), "bias"),
    (lambda m: not_yet(), "not_implemented"),
])
def test_sparsity_mistakes_are_named(fn, problem):
    r = check("layer_sparsity", fn)
    assert not r.passed and r.problem == problem, r.message


def test_solution_is_source_and_names_are_checked():
    assert "topk" in solution("magnitude_mask")
    with pytest.raises(ValueError, match="magnitude_mask, layer_sparsity"):
        solution("nope")
