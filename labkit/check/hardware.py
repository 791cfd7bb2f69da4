"""Checkers for the exercises of notebook 02_hardware: they call the learner's function on fresh inputs,
compare with labkit.hardware's estimators, and say what is likely wrong. An answer that calls
labkit.hardware's own estimator instead of computing fails (``used_reference``).

``check(name, fn)`` returns a :class:`~labkit.check.Result` (truthy when right) and never raises for a
wrong answer, so a notebook with unfinished exercises still runs headless. ``solution(name)`` returns a reference solution.
"""

from __future__ import annotations

import math
import random
import types
from typing import Any, Callable

from labkit.check import Result, attempt, checker_book, correct, mistake, solution_book
from labkit.hardware.estimate import (
    GPTConfig,
    TrainingEstimate,
    allreduce_time,
    count_params,
    training_flops,
    training_memory,
)


def _close(a: Any, b: float, rel: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isclose(a, b, rel_tol=rel)


def _rng(seed: int | None) -> tuple[random.Random, int]:
    """A fresh generator (a new seed when None) and its seed, which messages quote so a run can be repeated."""
    seed = random.randrange(2**31) if seed is None else int(seed)
    return random.Random(seed), seed


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _names_used(fn: Callable[..., Any]) -> set[str]:
    """Global and attribute names the code of ``fn`` (and of the functions inside it) refers to."""
    code = getattr(fn, "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


def _reference_used(fn: Callable[..., Any]) -> str | None:
    """The labkit.hardware function or module ``fn`` calls, if any: the exercise is to write it, not to call it."""
    names = _names_used(fn)
    space = dict(getattr(fn, "__globals__", {}))
    code = getattr(fn, "__code__", None)
    for name, cell in zip(code.co_freevars if code else (), getattr(fn, "__closure__", None) or ()):
        try:
            space[name] = cell.cell_contents  # a name from the enclosing function (an import inside a def)
        except ValueError:  # an empty cell
            continue
        names.add(name)
    for name in sorted(names):
        obj = space.get(name)
        where = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", "") or ""
        if where.startswith("labkit.hardware") or (where == "labkit" and "hardware" in names):
            return name
    return None


def _delegated(fn: Callable[..., Any], verdict: Result) -> Result:
    """``verdict``, unless ``fn`` only called labkit.hardware's own estimator."""
    used = _reference_used(fn)
    if used is None:
        return verdict
    return mistake("used_reference", f"your function calls labkit.hardware ({used}): that is the reference this "
                                     "exercise asks you to write; compute it from the formula instead")


def _check_param_count(fn: Callable[[int, int, int, int, int], int], trials: int = 5,
                       seed: int | None = None) -> Result:
    """``fn(n_layer, n_head, n_embd, vocab_size, block_size)`` must return the exact parameter count of a
    nanoGPT-layout GPT (biases, LayerNorms, learned positions, LM head tied to the token embedding)."""
    rng, seed = _rng(seed)
    for _ in range(trials):
        h = rng.choice([2, 4, 8])
        cfg = GPTConfig(n_layer=rng.randint(1, 6), n_head=h, n_embd=h * rng.choice([8, 16, 32]),
                        vocab_size=rng.randint(50, 5000), block_size=rng.choice([16, 64, 256]))
        got = attempt(fn, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size)
        want = count_params(cfg).total
        if got == want:
            continue
        d, v, t, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
        hints = {
            want + v * d: ("untied_head", "you counted the LM head separately: it shares its weights with the token embedding"),
            want - t * d: ("no_positions", "the learned position embeddings (block_size x n_embd) are missing"),
            want - L * 13 * d - 2 * d: ("no_biases", "biases and LayerNorm parameters are missing (13·d per layer + 2·d final)"),
            want - 2 * d: ("no_final_norm", "the final LayerNorm (2·d) is missing"),
            L * 12 * d * d: ("approximation", "12·L·d² is the usual approximation; here the count must be exact "
                                              "(embeddings, biases, norms)"),
        }
        problem, hint = hints.get(got, ("wrong_value", "count part by part: the two embeddings; per layer the attention "
                                                       "(4 square matrices with biases), the MLP (d to 4d and back, with "
                                                       "biases) and two LayerNorms; then the final LayerNorm"))
        return mistake(problem, f"for {cfg} you returned {got!r}, expected {want}: {hint} (seed {seed})", seed=seed)
    return _delegated(fn, correct(f"exact on {trials} random configurations (seed {seed})", seed=seed))


def _check_training_memory(fn: Callable[[float, int, int], float], trials: int = 8,
                           seed: int | None = None) -> Result:
    """``fn(n_params, zero_stage, dp)`` returns the GB (1e9 bytes) per GPU of the model states in
    mixed-precision AdamW: weights, gradients, optimizer states, sharded by the ZeRO stage over dp ranks."""
    rng, seed = _rng(seed)
    # the ZeRO paper's 7.5B example at both ends, then every stage on fresh sizes and rank counts
    cases = [(7.5e9, 0, 64), (7.5e9, 3, 64)] + [
        (round(_log_uniform(rng, 1e8, 2e11), -6), stage, rng.choice([2, 4, 8, 16, 64, 128, 512]))
        for stage in rng.sample([0, 1, 2, 3, 1, 2, 3, 3], trials - 2)]
    for n, stage, dp in cases:
        got = attempt(fn, n, stage, dp)
        want = training_memory(n, zero_stage=stage, dp=dp).model_states_bytes / 1e9
        if _close(got, want, 1e-3):
            continue
        if _close(got, 16 * n / 1e9, 1e-3):
            problem, hint = "unsharded", ("that is the unsharded 16 bytes/param: apply the ZeRO stage "
                                          "(1: optimizer, 2: +grads, 3: +weights)")
        elif _close(got, want * 2**30 / 1e9, 1e-3) or _close(got, want * 1e9 / 2**30, 1e-3):
            problem, hint = "gib", "GB here means 1e9 bytes, not GiB"
        elif stage and _close(got, 16 * n / dp / 1e9, 1e-3):
            problem, hint = "all_sharded", f"at stage {stage} not everything is sharded: which of weights, grads, optimizer states stay whole?"
        elif stage and _close(got, 12 * n / dp / 1e9, 1e-3):
            problem, hint = "states_only", "weights and gradients are still on every rank at stage 1 (2+2 bytes/param)"
        else:
            problem, hint = "wrong_value", (f"check the bytes per parameter of each part (bf16 weights, bf16 grads, fp32 "
                                            f"master copy and two Adam moments) and which parts stage {stage} divides by dp")
        return mistake(problem, f"n_params={n:g}, zero_stage={stage}, dp={dp}: you returned {got!r}, expected "
                                f"{want:.4g} GB; {hint} (seed {seed})", seed=seed)
    return _delegated(fn, correct("model-state memory right for ZeRO stages 0-3, including the ZeRO paper's 7.5B "
                                  f"example (seed {seed})", seed=seed))


def _check_training_days(fn: Callable[[float, float, float, int, float], float], trials: int = 4,
                         seed: int | None = None) -> Result:
    """``fn(n_params, n_tokens, peak_flops, n_gpus, mfu)`` returns the wall-clock days of training (6·N·D FLOPs)."""
    rng, seed = _rng(seed)
    for _ in range(trials):
        n, d = round(_log_uniform(rng, 1e8, 5e11), -6), round(_log_uniform(rng, 1e10, 2e13), -9)
        peak = rng.choice([19.5e12, 312e12, 494.7e12, 989.4e12, 1307.4e12])
        g, mfu = rng.choice([1, 8, 64, 256, 1024, 4096]), round(rng.uniform(0.25, 0.55), 2)
        got = attempt(fn, n, d, peak, g, mfu)
        # the library's estimate is the reference, so checker and labkit.hardware cannot drift apart
        want = TrainingEstimate(training_flops(n, d).flops, "exercise", "any", g, mfu, peak).days
        if _close(got, want, 1e-3):
            continue
        if _close(got, want * 24, 1e-3):
            problem, hint = "hours", "that is hours: divide by 24"
        elif g > 1 and _close(got, want * g, 1e-3):
            problem, hint = "gpu_days", "that is GPU-days: the GPUs work at the same time, divide by n_gpus"
        elif _close(got, want / 3, 1e-3):
            problem, hint = "forward_only", "2·N·D is the forward pass only; training is 6·N·D (the backward costs twice the forward)"
        elif _close(got, want * mfu * mfu, 1e-3):
            problem, hint = "mfu_inverted", "a lower MFU must make the run longer: the GPUs sustain only MFU x peak"
        else:
            problem, hint = "wrong_value", ("check each factor: the training FLOPs, what all the GPUs together sustain "
                                            "per second, and seconds to days")
        return mistake(problem, f"N={n:g}, D={d:g}, {g} GPUs of {peak:g} FLOP/s at MFU {mfu}: you returned {got!r}, "
                                f"expected {want:.4g} days; {hint} (seed {seed})", seed=seed)
    return _delegated(fn, correct(f"days right for {trials} random runs (seed {seed})", seed=seed))


def _check_allreduce_seconds(fn: Callable[[float, int, float, float], float], seed: int | None = None) -> Result:
    """``fn(n_bytes, n_ranks, bandwidth, latency)``: ring all-reduce time, 2(G−1)/G·bytes/bw + 2(G−1)·latency."""
    rng, seed = _rng(seed)
    # latency bound, bandwidth bound, between; the bandwidth-bound case has G >= 4, where the ring's
    # 2(G-1)/G differs from 1 (at G = 2 it is 1, and an answer without it could not be told apart)
    cases = [(round(_log_uniform(rng, low, high)), rng.choice(ranks),
              rng.choice([12.5e9, 25e9, 50e9, 300e9]), rng.choice([1e-6, 2e-6, 5e-6, 2e-5]))
             for (low, high), ranks in [((1e3, 1e5), [2, 4, 8, 16, 64, 256]), ((1e8, 1e10), [4, 8, 16, 64, 256]),
                                        ((1e5, 1e8), [2, 4, 8, 16, 64, 256])]]
    for args in cases:
        got = attempt(fn, *args)
        want = allreduce_time(*args).seconds
        if _close(got, want, 1e-6):
            continue
        n, g, bw, lat = args
        if _close(got, 2 * (g - 1) / g * n / bw, 1e-6):
            problem, hint = "no_latency", "the latency term 2(G−1)·latency is missing: it dominates small messages"
        elif _close(got, n / bw + 2 * (g - 1) * lat, 1e-6):
            problem, hint = "no_ring_factor", "a ring moves 2(G−1)/G of the data through each link (reduce-scatter then all-gather)"
        elif _close(got, (g - 1) / g * n / bw + (g - 1) * lat, 1e-6):
            problem, hint = "half_ring", "that is one of the two phases: a ring all-reduce is a reduce-scatter and then an all-gather"
        else:
            problem, hint = "wrong_value", ("a ring all-reduce takes 2(G−1) steps; in each, every rank sends 1/G of "
                                            "the data over its link and pays the latency once")
        return mistake(problem, f"bytes={n:g}, G={g}, bw={bw:g} B/s, latency={lat:g} s: you returned {got!r}, expected "
                                f"{want:.4g} s; {hint} (seed {seed})", seed=seed)
    return _delegated(fn, correct(f"ring all-reduce time right, in the bandwidth- and the latency-bound regime "
                                  f"(seed {seed})", seed=seed))


# ---------------------------------------------------------------------------------------------- solutions

def _solution_param_count(n_layer, n_head, n_embd, vocab_size, block_size):
    d = n_embd
    per_layer = 12 * d * d + 13 * d
    return vocab_size * d + block_size * d + n_layer * per_layer + 2 * d


def _solution_training_memory(n_params, zero_stage, dp):
    weights, grads, optim = 2 * n_params, 2 * n_params, 12 * n_params
    if zero_stage >= 1:
        optim /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    return (weights + grads + optim) / 1e9


def _solution_training_days(n_params, n_tokens, peak_flops, n_gpus, mfu):
    return 6 * n_params * n_tokens / (n_gpus * peak_flops * mfu) / 86400


def _solution_allreduce_seconds(n_bytes, n_ranks, bandwidth, latency):
    g = n_ranks
    return 2 * (g - 1) / g * n_bytes / bandwidth + 2 * (g - 1) * latency


check = checker_book("hardware", {
    "param_count": _check_param_count,
    "training_memory": _check_training_memory,
    "training_days": _check_training_days,
    "allreduce_seconds": _check_allreduce_seconds,
})


SOLUTIONS = {
    "param_count": _solution_param_count,
    "training_memory": _solution_training_memory,
    "training_days": _solution_training_days,
    "allreduce_seconds": _solution_allreduce_seconds,
}


solution = solution_book("hardware", SOLUTIONS)
