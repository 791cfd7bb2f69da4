"""Checkers for the serving notebook: latency percentiles and a reproducible request.

A checker never raises, so a notebook with an unfinished exercise still runs top to bottom; it
returns a ``Feedback`` that prints what to fix.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

from labkit.check import Result, defined_function, solution_book
from labkit.serve.metrics import percentile as _reference


Feedback = Result  # the shared verdict type of labkit.check


def _nearest_rank(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def percentile(fn: Callable[[list[float], float], float]) -> Feedback:
    """Check ``fn(values, q) -> the q-th percentile (q in 0..100), linear interpolation`` on fresh data."""
    rng = random.Random()
    cases = [([3.0, 1.0, 2.0, 4.0], 50), ([10.0], 95), ([1.0, 2.0], 0), ([5.0, 1.0, 9.0, 7.0, 3.0], 100)]
    cases += [([rng.uniform(1, 200) for _ in range(rng.randint(2, 40))], rng.choice([50, 90, 95, 99]))
              for _ in range(6)]
    for values, q in cases:
        want = _reference(values, q)
        try:
            have = fn(list(values), q)
        except Exception as exc:  # the learner's code raised
            return Feedback(False, f"your function raised {type(exc).__name__}: {exc} (values={values[:5]}..., q={q})")
        if have is None:
            return Feedback(False, "your function returned None: return the percentile as a number")
        try:
            have = float(have)
        except (TypeError, ValueError):
            return Feedback(False, f"your function must return a number, it returned {have!r}")
        if math.isclose(have, want, rel_tol=1e-9, abs_tol=1e-9):
            continue
        if values != sorted(values) and math.isclose(have, _reference_unsorted(values, q), rel_tol=1e-9):
            return Feedback(False, "sort the values first: a percentile reads positions in sorted order")
        if 0 < q < 100 and math.isclose(have, _reference(values, q / 100), rel_tol=1e-9):
            return Feedback(False, "q is in percent (0..100): use q / 100 of the way through the sorted values")
        pos = (len(values) - 1) * q / 100
        if pos != int(pos) and any(math.isclose(have, sorted(values)[i], rel_tol=1e-9)
                                   for i in (math.floor(pos), math.ceil(pos))):
            return Feedback(False, f"you picked one of the two neighbours; at position {pos:g} interpolate: "
                                   "xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)")
        if math.isclose(have, _nearest_rank(values, q), rel_tol=1e-9):
            return Feedback(False, "that is the nearest-rank percentile; interpolate linearly between the two "
                                   "neighbours at position (n - 1) * q / 100")
        return Feedback(False, f"for values={[round(v, 2) for v in values[:6]]}{'...' if len(values) > 6 else ''} "
                               f"and q={q} the percentile is {want:.6g}, yours is {have:.6g}")
    return Feedback(True, f"your percentile matches labkit's on {len(cases)} cases, including random latencies")


def _reference_unsorted(values: list[float], q: float) -> float:
    pos = (len(values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def reproducible(texts: list[Any], seeds: list[Any]) -> Feedback:
    """Check two answers to the same request: the same seed must give the same text."""
    if len(texts) != 2 or len(seeds) != 2:
        return Feedback(False, "send the same request twice and pass both texts and both seeds")
    if seeds[0] is None or seeds[0] != seeds[1]:
        return Feedback(False, f"the seeds differ ({seeds}); put the same \"seed\" in both request bodies")
    if texts[0] != texts[1]:
        return Feedback(False, "same seed, different text: were temperature, top_k and max_new_tokens the same too?")
    return Feedback(True, "same request, same seed, same text: answers can be reproduced")


_SOLUTIONS = {
    "percentile": '''\
def my_percentile(values, q):
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100          # where the percentile falls between two sorted values
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
''',
}


solution = solution_book("serving", _SOLUTIONS)


def solved(name: str) -> Any:
    """The reference solution as a function (what ``solution(name)`` defines)."""
    return defined_function(solution(name))
