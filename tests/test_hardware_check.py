"""Checkers of notebook 02_hardware: the reference solutions pass, typical mistakes get a useful hint."""

import pytest

from labkit.check import hardware as chk


@pytest.mark.parametrize("name", list(chk.SOLUTIONS))
def test_reference_solutions_pass(name):
    result = chk.check(name, chk.SOLUTIONS[name])
    assert result.passed, result.message
    ns = {}
    exec(chk.solution(name), ns)             # the shown source is runnable under the exercise's name
    assert chk.check(name, ns[name]).passed


def test_unfinished_and_broken_functions_do_not_raise():
    def stub(*args):
        raise NotImplementedError

    r = chk.check("param_count", stub)
    assert not r and r.passed is None and "NotImplementedError" in r.message and "not yet" in str(r)
    r = chk.check("training_days", lambda *a: 1 / 0)
    assert not r and "ZeroDivisionError" in r.message
    with pytest.raises(KeyError, match="valid names: param_count"):
        chk.solution("nope")


def test_typical_mistakes_get_hints():
    untied = lambda L, h, d, V, T: chk.SOLUTIONS["param_count"](L, h, d, V, T) + V * d
    assert "tied" in chk.check("param_count", untied).message or "shares its weights" in chk.check("param_count", untied).message
    no_pos = lambda L, h, d, V, T: chk.SOLUTIONS["param_count"](L, h, d, V, T) - T * d
    assert "position" in chk.check("param_count", no_pos).message
    unsharded = lambda n, s, dp: 16 * n / 1e9
    assert "ZeRO stage" in chk.check("training_memory", unsharded).message
    hours = lambda n, d, p, g, m: chk.SOLUTIONS["training_days"](n, d, p, g, m) * 24
    assert "hours" in chk.check("training_days", hours).message
    forward_only = lambda n, d, p, g, m: 2 * n * d / (g * p * m) / 86400
    assert "6·N·D" in chk.check("training_days", forward_only).message
    no_latency = lambda n, g, bw, lat: 2 * (g - 1) / g * n / bw
    assert "latency" in chk.check("allreduce_seconds", no_latency).message
