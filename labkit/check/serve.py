"""Checkers for the serving notebook: latency percentiles and a reproducible request.

``check("percentile", fn)`` and ``check("reproducible", [first, second])`` (the two JSON answers of
``/generate``) never raise for a wrong answer, so a notebook with an unfinished exercise still runs top
to bottom; they return a :class:`~labkit.check.Result` that says what to fix.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Mapping

from labkit.check import Result, attempt, checker_book, correct, defined_function, mistake, solution_book
from labkit.serve.metrics import percentile as _reference


def _nearest_rank(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _check_percentile(fn: Callable[[list[float], float], float]) -> Result:
    """Check ``fn(values, q) -> the q-th percentile (q in 0..100), linear interpolation`` on fresh data."""
    rng = random.Random()
    cases = [([3.0, 1.0, 2.0, 4.0], 50), ([10.0], 95), ([1.0, 2.0], 0), ([5.0, 1.0, 9.0, 7.0, 3.0], 100)]
    cases += [([rng.uniform(1, 200) for _ in range(rng.randint(2, 40))], rng.choice([50, 90, 95, 99]))
              for _ in range(6)]
    for values, q in cases:
        want = _reference(values, q)
        have = attempt(fn, list(values), q, on=f"values={values[:5]}..., q={q}")
        if have is None:
            return mistake("none", "your function returned None: return the percentile as a number")
        try:
            have = float(have)
        except (TypeError, ValueError):
            return mistake("type", f"your function must return a number, it returned {have!r}")
        if math.isclose(have, want, rel_tol=1e-9, abs_tol=1e-9):
            continue
        if values != sorted(values) and math.isclose(have, _reference_unsorted(values, q), rel_tol=1e-9):
            return mistake("unsorted", "sort the values first: a percentile reads positions in sorted order")
        if 0 < q < 100 and math.isclose(have, _reference(values, q / 100), rel_tol=1e-9):
            return mistake("fraction", "q is in percent (0..100): use q / 100 of the way through the sorted values")
        pos = (len(values) - 1) * q / 100
        if pos != int(pos) and any(math.isclose(have, sorted(values)[i], rel_tol=1e-9)
                                   for i in (math.floor(pos), math.ceil(pos))):
            return mistake("neighbour", f"you picked one of the two neighbours; at position {pos:g} interpolate: "
                                        "xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)")
        if math.isclose(have, _nearest_rank(values, q), rel_tol=1e-9):
            return mistake("nearest_rank", "that is the nearest-rank percentile; interpolate linearly between "
                                           "the two neighbours at position (n - 1) * q / 100")
        return mistake("values", f"for values={[round(v, 2) for v in values[:6]]}{'...' if len(values) > 6 else ''} "
                                 f"and q={q} the percentile is {want:.6g}, yours is {have:.6g}")
    return correct(f"your percentile matches labkit's on {len(cases)} cases, including random latencies")


def _reference_unsorted(values: list[float], q: float) -> float:
    pos = (len(values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _check_reproducible(answers: list[Any]) -> Result:
    """Check two answers to the same request (the JSON bodies ``/generate`` returned): same seed, same text."""
    if not isinstance(answers, (list, tuple)) or len(answers) != 2:
        return mistake("two_answers", "send the same request twice and pass both answers: "
                                      "check(\"reproducible\", [first, second])")
    if not all(isinstance(a, Mapping) and "text" in a and "seed" in a for a in answers):
        return mistake("not_json", "pass the JSON bodies /generate returned (each has \"text\" and \"seed\"): "
                                   "client.post(\"/generate\", json=body).json()")
    texts, seeds = [a["text"] for a in answers], [a["seed"] for a in answers]
    if seeds[0] is None or seeds[0] != seeds[1]:
        return mistake("seeds_differ", f"the seeds differ ({seeds}); put the same \"seed\" in both request bodies")
    if texts[0] != texts[1]:
        return mistake("text_differs", "same seed, different text: were temperature, top_k and max_new_tokens "
                                       "the same too?")
    return correct("same request, same seed, same text: answers can be reproduced")


check = checker_book("serving", {"percentile": _check_percentile, "reproducible": _check_reproducible})


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
