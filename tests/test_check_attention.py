"""The attention checkers accept right answers, leave the notebook's starters "not attempted", refuse the
library's own functions and name each plausible wrong answer."""

import ast
import math
import re

import nbformat
import pytest
import torch
import torch.nn.functional as F

from labkit import attention as A
from labkit.check import attention as C
from labkit.lab.notebooks import NOTEBOOK_DIR

SEEDS = [0, 1, 2, None]  # None: a fresh seed, as in the notebook


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


def test_fresh_inputs_and_the_seed_is_reported():
    wrong = WRONG_ATTENTION["missing_scale"]
    seeds = {C.check("attention", wrong).details["seed"] for _ in range(4)}
    assert len(seeds) > 1, "seed=None must draw fresh inputs each call"
    torch.manual_seed(0)
    a = C.check("attention", wrong).details["seed"]
    torch.manual_seed(0)
    assert C.check("attention", wrong).details["seed"] != a, "a notebook's torch.manual_seed must not fix the inputs"
    res = C.check("attention", wrong, seed=123)
    assert "(seed 123)" in res.message and res.details["seed"] == 123
    assert C.check("attention", wrong, seed=123).message == res.message  # the seed repeats the case


def _exercise_cells() -> dict[str, tuple[str, str]]:
    """{exercise: (the notebook cell that checks it, the name of the function it checks)}."""
    nb = nbformat.read(NOTEBOOK_DIR / "04_attention_math.ipynb", as_version=4)
    return {exercise: (cell.source, fn) for cell in nb.cells if cell.cell_type == "code"
            for exercise, fn in re.findall(r'\bcheck\("(\w+)", (\w+)\)', cell.source)}


def test_the_notebook_has_every_exercise():
    assert sorted(_exercise_cells()) == sorted(C.EXERCISES)


@pytest.mark.parametrize("exercise", sorted(_exercise_cells()))
def test_the_notebooks_starters_are_not_attempted(exercise):
    """The stub in the notebook is "not attempted yet": no exercise passes (or fails) unchanged."""
    source, fn_name = _exercise_cells()[exercise]
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
    ns = {"torch": torch, "math": math}
    exec(compile(tree, "starter", "exec"), ns)
    res = C.check(exercise, ns[fn_name])
    assert res.passed is None and res.problem == "not_implemented", res.message


def test_errors_are_reported_with_the_seed():
    res = C.check("attention", lambda q, k, v, mask=None: q.nope(), seed=7)
    assert res.problem == "error" and "seed 7" in res.message
    with pytest.raises(ValueError, match="valid names: attention"):
        C.check("atention", lambda q: q)


# --- the library's own functions are refused, and nothing stays patched afterwards
LIBRARY_ANSWERS = {
    "attention": [lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                  lambda q, k, v, mask=None: A.scaled_dot_product_attention(q, k, v, mask=mask),
                  lambda q, k, v, mask=None: torch.softmax(_scores(q, k, mask), -1) @ v,
                  lambda q, k, v, mask=None: _scores(q, k, mask).softmax(-1) @ v,
                  lambda q, k, v, mask=None: F.softmax(_scores(q, k, mask), dim=-1) @ v],
    "causal_mask": [lambda t_q, t_k: A.causal_mask(t_q, t_k)],
    "split_heads": [A.split_heads],
    "merge_heads": [A.merge_heads],
}


def _scores(q, k, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("name,i", [(n, i) for n, fns in LIBRARY_ANSWERS.items() for i in range(len(fns))])
def test_library_versions_are_refused(name, i):
    before = (torch.softmax, F.softmax, F.scaled_dot_product_attention, A.causal_mask, "softmax" in vars(torch.Tensor))
    res = C.check(name, LIBRARY_ANSWERS[name][i], seed=1)
    assert res.passed is False and res.problem == "library", res.message
    assert (torch.softmax, F.softmax, F.scaled_dot_product_attention, A.causal_mask,
            "softmax" in vars(torch.Tensor)) == before
    x = torch.randn(2, 3)
    assert torch.allclose(x.softmax(-1), torch.softmax(x, -1))


# --- attention
def _attn(scale=None, dim=-1, invert=False, ignore_mask=False, stable=True, weights_only=False):
    def fn(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
        if mask is not None and not ignore_mask:
            s = s.masked_fill(mask if invert else ~mask, float("-inf"))
        if stable:
            s = s - s.amax(dim, keepdim=True)
        e = torch.exp(s)
        p = e / e.sum(dim, keepdim=True)
        return p if weights_only else p @ v
    return fn


WRONG_ATTENTION = {
    "missing_scale": _attn(scale=1.0),
    "wrong_axis": _attn(dim=-2),
    "mask_inverted": _attn(invert=True),
    "mask_ignored": _attn(ignore_mask=True),
    "overflow": _attn(stable=False),
    "shape": _attn(weights_only=True),
    "wrong_scale": lambda q, k, v, mask=None: _attn(scale=1 / q.shape[-1])(q, k, v, mask),
}


@pytest.mark.parametrize("problem", WRONG_ATTENTION)
@pytest.mark.parametrize("seed", SEEDS)
def test_attention_diagnoses(problem, seed):
    res = C.check("attention", WRONG_ATTENTION[problem], seed=seed)
    assert not res.passed and res.problem == problem, res.message


def test_inverted_mask_is_named_whatever_the_random_inputs():
    """An inverted mask is diagnosed as such for any seed: a random mask never leaves a row all -inf once
    inverted."""
    problems = [C.check("attention", WRONG_ATTENTION["mask_inverted"], seed=seed).problem for seed in range(40)]
    assert problems == ["mask_inverted"] * 40, sorted(set(problems))


def test_attention_messages_name_the_mistake_not_the_fix():
    for problem, fn in WRONG_ATTENTION.items():
        msg = C.check("attention", fn, seed=3).message
        assert "masked_fill" not in msg and "sqrt(q.shape" not in msg and "amax" not in msg, msg


# --- causal mask (the queries are the last t_q of t_k positions)
WRONG_CAUSAL = {
    "mask_inverted": lambda t_q, t_k: ~torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q),
    "future": lambda t_q, t_k: torch.ones(t_q, t_k, dtype=torch.bool).triu(t_k - t_q),
    "diagonal": lambda t_q, t_k: torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q - 1),
    "top_left": lambda t_q, t_k: torch.ones(t_q, t_k, dtype=torch.bool).tril(),
    "dtype": lambda t_q, t_k: torch.ones(t_q, t_k).tril(t_k - t_q),
    "shape": lambda t_q, t_k: torch.ones(t_k, t_k, dtype=torch.bool).tril(),
}


@pytest.mark.parametrize("problem", WRONG_CAUSAL)
@pytest.mark.parametrize("seed", SEEDS)
def test_causal_mask_diagnoses(problem, seed):
    res = C.check("causal_mask", WRONG_CAUSAL[problem], seed=seed)
    assert not res.passed and res.problem == problem, res.message
    assert ".tril" not in res.message and "diagonal=" not in res.message


def test_causal_mask_is_torchs_lower_right_mask_and_is_causal_is_top_left():
    """What the notebook says: the exercise's mask is torch's causal_lower_right; is_causal=True is top-left."""
    from torch.nn.attention.bias import causal_lower_right

    mask = C.solution_function("causal_mask")(3, 7)
    assert torch.equal(mask, causal_lower_right(3, 7)._materialize())
    q, k, v = torch.randn(3, 8), torch.randn(7, 8), torch.randn(7, 4)
    top_left = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 7, dtype=torch.bool).tril())
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True), top_left, atol=1e-6)


def test_mask_conventions_the_notebook_states():
    """F.scaled_dot_product_attention: True = may attend; nn.MultiheadAttention: True = masked out."""
    torch.manual_seed(0)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    mha = torch.nn.MultiheadAttention(embed_dim=4, num_heads=1, batch_first=True)
    x = torch.randn(1, 4, 4)
    _, w = mha(x, x, x, attn_mask=~allowed)
    assert torch.equal(w[0] > 0, allowed)
    _, w = mha(x, x, x, key_padding_mask=torch.tensor([[False, False, False, True]]))
    assert (w[0, :, 3] == 0).all() and (w[0, :, :3] > 0).all()
    q, k, v = torch.randn(4, 8), torch.randn(4, 8), torch.eye(4)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) > 0, allowed)


# --- online softmax block update
def _online(rescale_l=True, rescale_acc=True, subtract=True, block_max=False, keep_m=False, normalise=False,
            invert=False):
    def fn(m, l, acc, s, v):
        m_new = s.amax(-1, keepdim=True) if block_max else m if keep_m else torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = torch.exp(m_new - m) if invert else torch.exp(m - m_new)
        p = torch.exp(s - m_new) if subtract else torch.exp(s)
        l_new = (l * alpha if rescale_l else l) + p.sum(-1, keepdim=True)
        acc_new = (acc * alpha if rescale_acc else acc) + p @ v
        return m_new, l_new, acc_new / l_new if normalise else acc_new
    return fn


def _online_no_max(m, l, acc, s, v):
    """The overflow-prone version: running sums of exp(s) with no maximum at all."""
    e = torch.exp(s)
    return torch.maximum(m, s.amax(-1, keepdim=True)), l + e.sum(-1, keepdim=True), acc + e @ v


WRONG_ONLINE = {
    "acc_not_rescaled": _online(rescale_acc=False),
    "l_not_rescaled": _online(rescale_l=False),
    "no_max_subtracted": _online(subtract=False),
    "block_max": _online(block_max=True),
    "max_not_updated": _online(keep_m=True),
    "normalised": _online(normalise=True),
    "rescale_inverted": _online(invert=True),
    "shape": lambda m, l, acc, s, v: (lambda m, l, acc: (m.squeeze(-1), l, acc))(*_online()(m, l, acc, s, v)),
    "type": lambda m, l, acc, s, v: _online()(m, l, acc, s, v)[2],
}


@pytest.mark.parametrize("problem", WRONG_ONLINE)
@pytest.mark.parametrize("seed", SEEDS)
def test_online_softmax_diagnoses(problem, seed):
    res = C.check("online_softmax", WRONG_ONLINE[problem], seed=seed)
    assert not res.passed and res.problem == problem, res.message


def test_online_softmax_without_any_maximum_fails():
    res = C.check("online_softmax", _online_no_max, seed=4)
    assert not res.passed and res.problem in {"no_max_subtracted", "overflow"}, res.message


def test_online_softmax_in_place_updates_are_fine():
    def in_place(m, l, acc, s, v):
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = (m - m_new).exp_()
        p = (s - m_new).exp_()
        l.mul_(alpha).add_(p.sum(-1, keepdim=True))
        acc.mul_(alpha).add_(p @ v)
        return m_new, l, acc
    assert C.check("online_softmax", in_place).passed


# --- heads
WRONG_SPLIT = {
    "shape": lambda x, h: x.view(x.shape[0], x.shape[1], h, -1),
    "layout": lambda x, h: x.view(x.shape[0], h, x.shape[1], -1),
    "interleaved": lambda x, h: x.view(x.shape[0], x.shape[1], -1, h).permute(0, 3, 1, 2),
}


@pytest.mark.parametrize("problem", WRONG_SPLIT)
@pytest.mark.parametrize("seed", SEEDS)
def test_split_heads_diagnoses(problem, seed):
    res = C.check("split_heads", WRONG_SPLIT[problem], seed=seed)
    assert not res.passed and res.problem == problem, res.message


WRONG_MERGE = {
    "layout": lambda y: y.reshape(y.shape[0], y.shape[2], -1),
    "interleaved": lambda y: y.permute(0, 2, 3, 1).reshape(y.shape[0], y.shape[2], -1),
    "shape": lambda y: y.transpose(1, 2),
    "error": lambda y: y.transpose(1, 2).view(y.shape[0], y.shape[2], -1),  # view of a non-contiguous tensor
}


@pytest.mark.parametrize("problem", WRONG_MERGE)
@pytest.mark.parametrize("seed", SEEDS)
def test_merge_heads_diagnoses(problem, seed):
    res = C.check("merge_heads", WRONG_MERGE[problem], seed=seed)
    assert not res.passed and res.problem == problem, res.message
