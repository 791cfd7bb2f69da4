"""Checkers for the data notebook: write a normaliser, count duplicates. Fresh inputs, clear hints.

``check("normaliser", fn)`` and ``check("count_duplicates", fn)`` return a :class:`~labkit.check.Result`
that shows the first mismatch and a hint; they never raise for a wrong answer.
"""

from __future__ import annotations

import random
import unicodedata
from typing import Callable

from labkit.check import Result, attempt, checker_book, correct, mistake, solution_book
from labkit.data import clean as C

_NORMALISER_CASES = [
    ("ﬁne", "fine", "NFKC folds the ligature 'ﬁ' into 'f' + 'i' (unicodedata.normalize('NFKC', ...))"),
    ("ＡＢＣ１２３", "ABC123", "NFKC maps full-width letters and digits to ASCII"),
    ("bell\x07 and escape\x1b[0m", "bell and escape[0m", "remove control characters (categories Cc), keep \\n and \\t"),
    ("zero\u200bwidth", "zerowidth", "remove invisible format characters like U+200B ZERO WIDTH SPACE"),
    ("line one\r\nline two\rthree", "line one\nline two\nthree", "turn Windows (\\r\\n) and old Mac (\\r) line ends into \\n"),
    ("trailing   \nspaces\t\n", "trailing\nspaces", "strip spaces and tabs at the end of every line, and blank lines at the ends"),
    ("a\n\n\n\n\n\nb", "a\n\n\nb", "keep at most two blank lines in a row"),
    ("\tindent kept\n", "\tindent kept", "leading indentation matters in code: keep it"),
]


def reference_normaliser(text: str) -> str:
    """NFKC, then drop control/format characters, then tidy whitespace."""
    text = unicodedata.normalize("NFKC", text)
    text = C.strip_control(text)
    return C.normalise_whitespace(text)


def _check_normaliser(fn: Callable[[str], str]) -> Result:
    """Run ``fn`` on small cases and a stdlib-like random one; name the first mismatch with a hint."""
    rng = random.Random()
    extra = "".join(rng.choice(["x", " ", "\t", "\n", "ﬂ", "\r\n", "\x00", "é", "  \n"]) for _ in range(60))
    cases = _NORMALISER_CASES + [(extra, reference_normaliser(extra), "a random mix of everything above")]
    for given, want, hint in cases:
        got = attempt(fn, given, on=repr(given))
        if got != want:
            return mistake("mismatch", f"on {given!r}\n   expected {want!r}\n   got      {got!r}\n   hint: {hint}",
                           given=given, expected=want, got=got)
    return correct(f"all {len(cases)} cases pass: your normaliser matches the pipeline's")


def reference_count_duplicates(docs: list[str]) -> int:
    """How many documents repeat an earlier one after normalisation (exact duplicates only)."""
    seen, dups = set(), 0
    for d in docs:
        h = C.content_hash(reference_normaliser(d))
        dups += h in seen
        seen.add(h)
    return dups


def _check_count_duplicates(fn: Callable[[list[str]], int]) -> Result:
    """Run ``fn`` on fresh collections with planted duplicates (some only equal after normalising)."""
    rng = random.Random()
    for trial in range(3):
        base = [" ".join(rng.choice("lorem ipsum dolor sit amet consectetur".split()) for _ in range(8)) + f" {i}"
                for i in range(rng.randint(5, 12))]
        docs = list(base)
        for _ in range(rng.randint(1, 6)):
            d = rng.choice(base)
            docs.insert(rng.randrange(len(docs) + 1), rng.choice([d, d + "   \n", d.replace("o", "ｏ")]))
        want = reference_count_duplicates(docs)
        got = attempt(fn, list(docs))
        if got != want:
            if got == len(docs) - len(set(docs)):
                problem, hint = "not_normalised", ("that is the count before normalising: normalise first "
                                                   "(trailing spaces, full-width letters)")
            else:
                problem, hint = "wrong_count", ("count a document when an earlier one has the same normalised "
                                                "text; the first copy is not a duplicate")
            return mistake(problem, f"on {len(docs)} documents expected {want} duplicates, got {got!r}; hint: {hint}")
    return correct("right on 3 fresh collections")


check = checker_book("data", {"normaliser": _check_normaliser, "count_duplicates": _check_count_duplicates})


SOLUTIONS = {"normaliser": reference_normaliser, "count_duplicates": reference_count_duplicates}


solution = solution_book("data", SOLUTIONS)

