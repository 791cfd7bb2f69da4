"""Checkers for the exercises of notebook 02_hardware: they call the learner's function on fresh inputs,
compare with labkit.hardware's estimators, and say what is likely wrong.

``check(name, fn)`` returns a :class:`~labkit.check.Result` (truthy when right) and never raises for a
wrong answer, so a notebook with unfinished exercises still runs headless. ``solution(name)`` returns a reference solution.
"""

from __future__ import annotations

import math
import random
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


def _check_param_count(fn: Callable[[int, int, int, int, int], int], trials: int = 5) -> Result:
    """``fn(n_layer, n_head, n_embd, vocab_size, block_size)`` must return the exact parameter count of a
    nanoGPT-layout GPT (biases, LayerNorms, learned positions, LM head tied to the token embedding)."""
    rng = random.Random(2)
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
            want + v * d: "you counted the LM head separately: it shares its weights with the token embedding",
            want - t * d: "the learned position embeddings (block_size x n_embd) are missing",
            want - L * 13 * d - 2 * d: "biases and LayerNorm parameters are missing (13·d per layer + 2·d final)",
            want - 2 * d: "the final LayerNorm (2·d) is missing",
            L * 12 * d * d: "12·L·d² is the usual approximation; here the count must be exact (embeddings, biases, norms)",
        }
        hint = hints.get(got, "per layer: attention 4d²+4d, MLP 8d²+5d, two LayerNorms 4d; plus V·d + T·d + 2d")
        return mistake("wrong_value", f"for {cfg} you returned {got!r}, expected {want}: {hint}")
    return correct(f"exact on {trials} random configurations")


def _check_training_memory(fn: Callable[[float, int, int], float], trials: int = 6) -> Result:
    """``fn(n_params, zero_stage, dp)`` returns the GB (1e9 bytes) per GPU of the model states in
    mixed-precision AdamW: weights, gradients, optimizer states, sharded by the ZeRO stage over dp ranks."""
    rng = random.Random(3)
    cases = [(7.5e9, 0, 64), (7.5e9, 3, 64)] + [
        (rng.choice([1e8, 1.3e9, 13e9, 70e9]), rng.choice([0, 1, 2, 3]), rng.choice([2, 8, 64, 512]))
        for _ in range(trials - 2)]
    for n, stage, dp in cases:
        got = attempt(fn, n, stage, dp)
        want = training_memory(n, zero_stage=stage, dp=dp).model_states_bytes / 1e9
        if _close(got, want, 1e-3):
            continue
        if _close(got, 16 * n / 1e9, 1e-3):
            hint = "that is the unsharded 16 bytes/param: apply the ZeRO stage (1: optimizer, 2: +grads, 3: +weights)"
        elif _close(got, want * 2**30 / 1e9, 1e-3) or _close(got, want * 1e9 / 2**30, 1e-3):
            hint = "GB here means 1e9 bytes, not GiB"
        elif _close(got, 12 * n / dp / 1e9 if stage else 16 * n / 1e9, 1e-3):
            hint = "weights and gradients are still on every rank at stage 1 (2+2 bytes/param)"
        else:
            hint = "bytes/param: 2 (bf16 weights) + 2 (grads) + 12 (fp32 master, Adam m, v); stage s shards the last 1..3 of these over dp"
        return mistake("wrong_value", f"n_params={n:g}, zero_stage={stage}, dp={dp}: you returned {got!r}, expected {want:.4g} GB; {hint}")
    return correct("model-state memory right for ZeRO stages 0-3, including the ZeRO paper's 7.5B example")


def _check_training_days(fn: Callable[[float, float, float, int, float], float]) -> Result:
    """``fn(n_params, n_tokens, peak_flops, n_gpus, mfu)`` returns the wall-clock days of training (6·N·D FLOPs)."""
    for n, d, peak, g, mfu in [(175e9, 300e9, 312e12, 1024, 0.4), (7e9, 2e12, 989.4e12, 512, 0.35), (1e8, 1e10, 1e14, 1, 0.5)]:
        got = attempt(fn, n, d, peak, g, mfu)
        # the library's estimate is the reference, so checker and labkit.hardware cannot drift apart
        want = TrainingEstimate(training_flops(n, d).flops, "exercise", "any", g, mfu, peak).days
        if _close(got, want, 1e-3):
            continue
        if _close(got, want * 24, 1e-3):
            hint = "that is hours: divide by 24"
        elif _close(got, want * g, 1e-3):
            hint = "that is GPU-days: the GPUs work at the same time, divide by n_gpus"
        elif _close(got, want / 3, 1e-3):
            hint = "2·N·D is the forward pass only; training is 6·N·D (the backward costs twice the forward)"
        else:
            hint = "days = 6·N·D / (n_gpus · peak · MFU) / 86400"
        return mistake("wrong_value", f"N={n:g}, D={d:g}, {g} GPUs at MFU {mfu}: you returned {got!r}, expected {want:.4g} days; {hint}")
    return correct("days right for three runs")


def _check_allreduce_seconds(fn: Callable[[float, int, float, float], float]) -> Result:
    """``fn(n_bytes, n_ranks, bandwidth, latency)``: ring all-reduce time, 2(G−1)/G·bytes/bw + 2(G−1)·latency."""
    for args in [(1e9, 8, 50e9, 2e-6), (4e3, 64, 25e9, 1.5e-6), (1e8, 2, 1e9, 1e-4)]:
        got = attempt(fn, *args)
        want = allreduce_time(*args).seconds
        if _close(got, want, 1e-6):
            continue
        n, g, bw, lat = args
        if _close(got, 2 * (g - 1) / g * n / bw, 1e-6):
            hint = "the latency term 2(G−1)·latency is missing: it dominates small messages"
        elif _close(got, n / bw + 2 * (g - 1) * lat, 1e-6):
            hint = "a ring moves 2(G−1)/G of the data through each link (reduce-scatter then all-gather)"
        else:
            hint = "t = 2(G−1)/G · bytes / bandwidth + 2(G−1) · latency"
        return mistake("wrong_value", f"bytes={n:g}, G={g}: you returned {got!r}, expected {want:.4g} s; {hint}")
    return correct("ring all-reduce time right, in the bandwidth- and the latency-bound regime")


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
