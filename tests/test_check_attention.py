"""The attention checkers accept right answers and diagnose deliberately wrong ones."""

import math

import pytest
import torch

from labkit.check import attention as C

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("name", C.EXERCISES)
@pytest.mark.parametrize("seed", SEEDS)
def test_solutions_pass(name, seed):
    res = C.check(name, C.solution_function(name), seed=seed)
    assert res.passed, res.message


@pytest.mark.parametrize("name", C.EXERCISES)
def test_solution_source_is_runnable_and_hidden_by_default(name):
    src = C.solution(name)
    assert src.startswith(f"def {name}(")
    ns = {"torch": torch, "math": math}
    exec(src, ns)
    assert C.check(name, ns[name], seed=5).passed
    assert src not in repr(C.check(name, ns[name], seed=5))


def test_not_implemented_and_errors_are_reported():
    def todo(x):
        raise NotImplementedError
    assert C.check("softmax", todo).problem == "not_implemented"
    assert C.check("softmax", lambda x: x.nope()).problem == "error"
    with pytest.raises(ValueError, match="valid names: softmax"):
        C.check("softmx", todo)


WRONG_SOFTMAX = {
    "overflow": lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True),
    "wrong_axis": lambda x: torch.softmax(x, 0),
    "shape": lambda x: torch.softmax(x, -1).reshape(-1, x.shape[-1]),  # flattened the batch
    "not_normalised": lambda x: torch.exp(x),
}


@pytest.mark.parametrize("problem", WRONG_SOFTMAX)
@pytest.mark.parametrize("seed", SEEDS)
def test_softmax_diagnoses(problem, seed):
    res = C.check("softmax", WRONG_SOFTMAX[problem], seed=seed)
    assert not res.passed and res.problem == problem, res.message


def _attn(scale=None, dim=-1, invert=False, ignore_mask=False, stable=True, weights_only=False):
    def fn(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
        if mask is not None and not ignore_mask:
            s = s.masked_fill(mask if invert else ~mask, float("-inf"))
        if stable:
            p = torch.softmax(s, dim)
        else:
            p = torch.exp(s) / torch.exp(s).sum(dim, keepdim=True)
        return p if weights_only else p @ v
    return fn


WRONG_ATTENTION = {
    "missing_scale": _attn(scale=1.0),
    "wrong_axis": _attn(dim=-2),
    "mask_inverted": _attn(invert=True),
    "mask_ignored": _attn(ignore_mask=True),
    "overflow": _attn(stable=False),
    "shape": _attn(weights_only=True),
}


@pytest.mark.parametrize("problem", WRONG_ATTENTION)
@pytest.mark.parametrize("seed", SEEDS)
def test_attention_diagnoses(problem, seed):
    res = C.check("attention", WRONG_ATTENTION[problem], seed=seed)
    assert not res.passed and res.problem == problem, res.message


def test_inverted_mask_is_named_whatever_the_random_inputs():
    """The notebook's starter bug (masked_fill(mask, -inf)) is diagnosed as such for any seed, not
    just for the fixed ones: a random mask must never leave a row all -inf once inverted."""
    problems = [C.check("attention", WRONG_ATTENTION["mask_inverted"], seed=seed).problem for seed in range(60)]
    assert problems == ["mask_inverted"] * 60, sorted(set(problems))


WRONG_CAUSAL = {
    "mask_inverted": lambda t: ~torch.ones(t, t, dtype=torch.bool).tril(),
    "transposed": lambda t: torch.ones(t, t, dtype=torch.bool).triu(),
    "diagonal": lambda t: torch.ones(t, t, dtype=torch.bool).tril(-1),
    "dtype": lambda t: torch.ones(t, t).tril(),
    "shape": lambda t: torch.ones(t, t + 1, dtype=torch.bool).tril(),
}


@pytest.mark.parametrize("problem", WRONG_CAUSAL)
def test_causal_mask_diagnoses(problem):
    res = C.check("causal_mask", WRONG_CAUSAL[problem], seed=3)
    assert not res.passed and res.problem == problem, res.message


WRONG_SPLIT = {
    "shape": lambda x, h: x.view(x.shape[0], x.shape[1], h, -1),
    "layout": lambda x, h: x.view(x.shape[0], h, x.shape[1], -1),
}


@pytest.mark.parametrize("problem", WRONG_SPLIT)
def test_split_heads_diagnoses(problem):
    res = C.check("split_heads", WRONG_SPLIT[problem], seed=4)
    assert not res.passed and res.problem == problem, res.message
    assert "transpose" in res.message or "view" in res.message
