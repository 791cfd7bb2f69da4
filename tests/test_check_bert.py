"""The BERT head-recompute checker: the reference passes against the real model, plausible wrong answers
are named, and the inputs are fresh each time."""

import math

import pytest
import torch

from labkit import pretrained as P
from labkit.check import bert as C

torch.set_num_threads(2)
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def bert():
    return P.default_bert()


def check(fn, bert, seed=None):
    model, tok = bert
    return C.check("head_attention", fn, model=model, tokenizer=tok, seed=seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_solution_passes_and_reports_the_measured_difference(bert, seed):
    res = check(C.solution_function("head_attention"), bert, seed)
    assert res.passed, res.message
    assert f"seed {seed}" in res.message and res.details["max_abs_diff"] < C.TOL


def test_solution_source_is_runnable_and_hidden_by_default(bert):
    src = C.solution("head_attention")
    assert src.startswith("def head_attention(model, hidden, mask, layer, head):")
    ns = {"torch": torch, "math": math}
    exec(src, ns)
    res = check(ns["head_attention"], bert, 5)
    assert res.passed and src not in repr(res)


def test_fresh_inputs_each_time(bert):
    seen = []

    def spy(model, hidden, mask, layer, head):
        seen.append((layer, head, tuple(mask.shape), int(mask.sum())))
        return C.solution_function("head_attention")(model, hidden, mask, layer, head)

    results = [check(spy, bert) for _ in range(4)]
    assert all(r.passed for r in results)
    assert len({r.details["seed"] for r in results}) > 1
    assert len(set(seen)) > 2  # layers, heads or sentences differ between runs
    assert all(shape[0] == 3 and real < shape[0] * shape[1] for _, _, shape, real in seen)  # with padding


def test_unattempted_and_errors(bert):
    def todo(model, hidden, mask, layer, head):
        raise NotImplementedError

    assert check(todo, bert).passed is None
    assert check(None, bert).passed is None
    assert check(lambda *a: a[1].nope(), bert).problem == "error"
    assert check(lambda *a: "weights", bert).problem == "type"


def _head(*, shift=0, strided=False, scale="ok", mask="keys", axis=-1, use_bias=True, transpose=True,
          all_heads=False, softmax=True):
    """A learner's head_attention with the given mistakes."""
    def fn(model, hidden, m, layer, head):
        sa = model.encoder.layer[layer].attention.self
        n, c = model.config.num_attention_heads, model.config.hidden_size
        d = c // n
        x = hidden[layer + shift]

        def proj(lin):
            y = x @ (lin.weight.T if transpose else lin.weight)
            if use_bias:
                y = y + lin.bias
            if all_heads:
                return y.view(*y.shape[:2], n, d).transpose(1, 2)
            return y[..., head::n] if strided else y[..., head * d:(head + 1) * d]

        s = proj(sa.query) @ proj(sa.key).transpose(-2, -1)
        s = s * {"ok": d ** -0.5, "none": 1.0, "hidden": c ** -0.5}[scale]
        keep = m.bool()
        key_mask = keep[:, None, None, :] if all_heads else keep[:, None, :]
        if mask == "keys":
            s = s.masked_fill(~key_mask, float("-inf"))
        elif mask == "inverted":
            s = s.masked_fill(key_mask, float("-inf"))
        elif mask == "queries":
            s = s.masked_fill(~keep[:, :, None], float("-inf"))
        return torch.softmax(s, axis) if softmax else s
    return fn


WRONG = {
    "layer_output": _head(shift=1),
    "strided_heads": _head(strided=True),
    "missing_scale": _head(scale="none"),
    "wrong_scale": _head(scale="hidden"),
    "mask_ignored": _head(mask="none"),
    "mask_inverted": _head(mask="inverted"),
    "mask_on_queries": _head(mask="queries"),
    "wrong_axis": _head(axis=-2),
    "missing_bias": _head(use_bias=False),
    "not_transposed": _head(transpose=False),
    "all_heads": _head(all_heads=True),
    "not_normalised": _head(softmax=False),
}


@pytest.mark.parametrize("problem", WRONG)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_plausible_mistakes_are_named(bert, problem, seed):
    res = check(WRONG[problem], bert, seed)
    assert res.passed is False and res.problem == problem, res.message
    assert f"seed {seed}" in res.message or problem == "all_heads"


def test_the_notebook_starter_is_diagnosed_one_mistake_at_a_time(bert):
    """The first attempt in 05 reads the layer's output and slices heads strided: named in that order."""
    res = check(_head(shift=1, strided=True), bert, 3)
    assert res.problem == "layer_output" and "1 more thing to fix" in res.message, res.message
    res = check(_head(strided=True, scale="none"), bert, 3)
    assert res.problem == "strided_heads" and res.details["mistakes"] == ["strided_heads", "missing_scale"]


def test_a_hard_coded_head_fails(bert):
    """Layer 0 head 3 is the notebook's example; the checker asks for other heads too."""
    ref = C.solution_function("head_attention")
    res = check(lambda model, hidden, mask, layer, head: ref(model, hidden, mask, 0, 3), bert, 0)
    assert res.passed is False


def test_a_model_without_attention_probabilities_is_named():
    model, tok = P.load_bert(attn_implementation="sdpa")
    res = C.check("head_attention", C.solution_function("head_attention"), model=model, tokenizer=tok, seed=0)
    assert res.passed is False and res.problem == "sdpa_model" and "eager" in res.message
