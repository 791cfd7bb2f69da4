"""The serving notebook's checkers accept right answers and name the mistake in wrong ones."""

import math

from labkit.check.serve import check, solved


def test_reference_solution_passes():
    assert check("percentile", solved("percentile"))


def test_common_mistakes_are_named():
    def unsorted(values, q):
        pos = (len(values) - 1) * q / 100
        lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    def fraction(values, q):
        return solved("percentile")(values, q / 100)

    def nearest(values, q):
        s = sorted(values)
        return s[max(0, math.ceil(q / 100 * len(s)) - 1)]

    assert "sort" in check("percentile", unsorted).message
    assert "percent" in check("percentile", fraction).message
    assert "nearest-rank" in check("percentile", nearest).message or "neighbours" in check("percentile", nearest).message
    assert "interpolate" in check("percentile", lambda v, q: sorted(v)[round((len(v) - 1) * q / 100)]).message
    assert "raised" in check("percentile", lambda v, q: 1 / 0).message
    assert "None" in check("percentile", lambda v, q: None).message
    assert not check("percentile", lambda v, q: 0.0)


def test_reproducible():
    def answers(texts, seeds):
        return [{"text": t, "seed": s} for t, s in zip(texts, seeds)]

    assert check("reproducible", answers(["ab", "ab"], [3, 3]))
    assert "seeds differ" in check("reproducible", answers(["ab", "ab"], [3, 4])).message
    assert "different text" in check("reproducible", answers(["ab", "ac"], [3, 3])).message
    assert "both answers" in check("reproducible", answers(["ab"], [3])).message
    assert "JSON bodies" in check("reproducible", ["ab", "ab"]).message
