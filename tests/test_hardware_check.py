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


# ---------------------------------------------------------------- fresh inputs, delegation, wrong answers

def test_inputs_are_fresh_and_the_seed_is_quoted():
    seeds = {chk.check("training_days", chk.SOLUTIONS["training_days"]).details["seed"] for _ in range(4)}
    assert len(seeds) > 1                                      # no fixed seed: each run draws new inputs
    r = chk.check("allreduce_seconds", lambda *a: 0.0, seed=1234)
    assert "seed 1234" in r.message and r == chk.check("allreduce_seconds", lambda *a: 0.0, seed=1234)


def _stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize("name", list(chk.SOLUTIONS))
def test_untouched_starter_is_not_attempted(name):
    r = chk.check(name, _stub)
    assert r.passed is None and r.problem == "not_implemented"


def test_calling_the_reference_does_not_pass():
    from labkit.hardware import GPTConfig, count_params, training_memory

    def param_count(n_layer, n_head, n_embd, vocab_size, block_size):
        return count_params(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                      block_size=block_size)).total

    def training_memory_gb(n_params, zero_stage, dp):
        return training_memory(n_params, zero_stage=zero_stage, dp=dp).model_states_bytes / 1e9

    import labkit.hardware as hw

    def days(n, d, peak, g, mfu):
        return hw.estimate_training(n, d, "A100-80GB", g, mfu).days * 0 + chk.SOLUTIONS["training_days"](n, d, peak, g, mfu)

    for name, fn in [("param_count", param_count), ("training_memory", training_memory_gb), ("training_days", days)]:
        r = chk.check(name, fn)
        assert r.passed is False and r.problem == "used_reference", (name, r)


S = chk.SOLUTIONS


@pytest.mark.parametrize("name, wrong, problem", [
    ("param_count", lambda L, h, d, V, T: S["param_count"](L, h, d, V, T) + V * d, "untied_head"),
    ("param_count", lambda L, h, d, V, T: S["param_count"](L, h, d, V, T) - T * d, "no_positions"),
    ("param_count", lambda L, h, d, V, T: 12 * L * d * d, "approximation"),
    ("training_memory", lambda n, s, dp: 16 * n / 1e9, "unsharded"),
    ("training_memory", lambda n, s, dp: S["training_memory"](n, s, dp) * 1e9 / 2**30, "gib"),
    ("training_memory", lambda n, s, dp: 16 * n / 1e9 if s == 0 else 16 * n / dp / 1e9, "all_sharded"),
    ("training_days", lambda n, d, p, g, m: S["training_days"](n, d, p, g, m) * 24, "hours"),
    ("training_days", lambda n, d, p, g, m: 2 * n * d / (g * p * m) / 86400, "forward_only"),
    ("training_days", lambda n, d, p, g, m: 6 * n * d * m / (g * p) / 86400, "mfu_inverted"),
    ("allreduce_seconds", lambda n, g, bw, lat: 2 * (g - 1) / g * n / bw, "no_latency"),
    ("allreduce_seconds", lambda n, g, bw, lat: n / bw + 2 * (g - 1) * lat, "no_ring_factor"),
])
def test_plausible_wrong_answers_fail_with_their_tag(name, wrong, problem):
    for _ in range(200):  # on any fresh draw (a wrong answer that a rare draw lets pass would make the suite flaky)
        r = chk.check(name, wrong)
        assert r.passed is False and r.problem == problem, r
