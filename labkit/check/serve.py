"""Checkers for the serving notebook: latency percentiles, a reproducible request, and the proof that
batching does not change answers.

``check("percentile", fn, seed=None)``, ``check("reproducible", [first, second])`` (two JSON answers
of ``/generate``) and ``check("batched", send_together, client=client, seed=None)`` (your function
that sends several requests at the same time) never raise for a wrong answer, so a notebook with an
unfinished exercise still runs top to bottom; they return a :class:`~labkit.check.Result` that says
what to fix. Random inputs are fresh on every call; the message names the seed to reproduce them.
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


def _fresh(seed: int | None) -> tuple[random.Random, int]:
    seed = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
    return random.Random(seed), seed


def _check_percentile(fn: Callable[[list[float], float], float], seed: int | None = None) -> Result:
    """Check ``fn(values, q) -> the q-th percentile (q in 0..100), linear interpolation`` on fresh data."""
    rng, seed = _fresh(seed)
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
            return mistake("neighbour", f"you picked one of the two neighbours of position {pos:g}; the percentile "
                                        f"lies between them, as far along as pos is past the lower one (seed {seed})")
        if math.isclose(have, _nearest_rank(values, q), rel_tol=1e-9):
            return mistake("nearest_rank", "that is the nearest-rank percentile; this one interpolates linearly "
                                           f"between the two neighbours of position (n - 1) * q / 100 (seed {seed})")
        return mistake("values", f"for values={[round(v, 2) for v in values[:6]]}{'...' if len(values) > 6 else ''} "
                                 f"and q={q} the percentile is {want:.6g}, yours is {have:.6g} (seed {seed})")
    return correct(f"your percentile matches labkit's on {len(cases)} cases, including random latencies (seed {seed})",
                   seed=seed)


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


# prompts from the lab GPT's own domain: it learned from the Python standard library's source
PROMPTS = ("def ", "import ", "class ", "return ", "for i in ", "self.", "if __name__", "raise ValueError(")


def _body(rng: random.Random, new_tokens: int) -> dict[str, Any]:
    return {"prompt": rng.choice(PROMPTS), "max_new_tokens": new_tokens, "temperature": 1.0,
            "seed": rng.randrange(1, 10**6)}


def _check_batched(fn: Callable[[Any, list[dict]], list[Any]], client: Any, seed: int | None = None,
                   companions: int = 7, tries: int = 3) -> Result:
    """Check ``fn(client, bodies) -> answers``, which must send all ``/generate`` bodies at once: the server
    must batch some of them, and the seeded request must get the text it gets alone."""
    rng, seed = _fresh(seed)
    on = f"(seed {seed})"
    target = _body(rng, 16)
    alone = client.post("/generate", json=target).json()
    for _ in range(tries):
        bodies = [_body(rng, 16) for _ in range(companions)]
        pos = rng.randrange(companions + 1)
        bodies.insert(pos, dict(target))
        before = client.get("/metrics.json").json()
        answers = attempt(fn, client, [dict(b) for b in bodies], on=f"{len(bodies)} request bodies, seed {seed}")
        after = client.get("/metrics.json").json()
        if not isinstance(answers, (list, tuple)) or len(answers) != len(bodies):
            return mistake("count", f"return one answer per body ({len(bodies)}, in the order of the bodies), got "
                                    f"{len(answers) if isinstance(answers, (list, tuple)) else type(answers).__name__} {on}")
        if not all(isinstance(a, Mapping) and "text" in a and "seed" in a for a in answers):
            return mistake("not_json", f"return the JSON bodies the server answered (each has \"text\" and \"seed\"), "
                                       f"not the responses themselves {on}")
        seeds, sent = [a["seed"] for a in answers], [b["seed"] for b in bodies]
        if seeds != sent:
            if sorted(seeds) == sorted(sent):
                return mistake("order", f"the answers are not in the order of the bodies (they came back in the "
                                        f"order they finished?); answer i must belong to body i {on}")
            return mistake("bodies_changed", f"the seeds in the answers are not the ones in the bodies: send each "
                                             f"body as it is {on}")
        batches = after["batches"] - before["batches"]
        if "batched_requests" in after:  # rows summed over the passes: > passes when one held two rows
            if after["batched_requests"] - before["batched_requests"] <= batches:
                continue  # every pass (batch, or engine step) ran one request: nothing was batched
        elif batches >= len(bodies):
            continue  # one batch per request: nothing was batched (this time)
        batched = answers[pos]["text"]
        if batched != alone["text"]:
            return mistake("text_differs", f"the seeded request gave other text inside a batch than alone: "
                                           f"{alone['text']!r} vs {batched!r} {on}", alone=alone["text"],
                           batched=batched, seed=seed)
        rows = after.get("batched_requests", len(bodies)) - before.get("batched_requests", 0)
        return correct(f"{len(bodies)} requests ran in {batches} batches or engine steps (mean {rows / batches:.1f} "
                       f"requests each); the seeded request {target['prompt']!r} gave the same text alone and inside "
                       f"a batch: {batched!r} ({on[1:-1]})", alone=alone["text"], batched=batched,
                       batches=batches, requests=len(bodies), seed=seed)
    return mistake("not_concurrent", f"the server ran your {len(bodies)} requests as {len(bodies)} batches of one, "
                                     f"{tries} times: each arrived after the previous one was answered. Send them so "
                                     f"that all are in flight at the same time {on}")


check = checker_book("serving", {"percentile": _check_percentile, "reproducible": _check_reproducible,
                                 "batched": _check_batched})


_SOLUTIONS = {
    "percentile": '''\
def my_percentile(values, q):
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100          # where the percentile falls between two sorted values
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
''',
    "batched": '''\
def send_together(client, bodies):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:   # one thread per request: all in flight at once
        futures = [pool.submit(client.post, "/generate", json=body) for body in bodies]
        return [f.result().json() for f in futures]              # in the order of the bodies, not of arrival
''',
}


solution = solution_book("serving", _SOLUTIONS)


def solved(name: str) -> Any:
    """The reference solution as a function (what ``solution(name)`` defines)."""
    return defined_function(solution(name))
