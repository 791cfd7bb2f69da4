"""The data notebook's checkers: the reference passes, the starter is not attempted, plausible mistakes get their tag."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import pytest

from labkit.check import data as K
from labkit.data import bpe_by_hand as B

SEEDS = range(12)


def _todo(*args):
    raise NotImplementedError


def _problems(name: str, fn) -> set:
    return {K.check(name, fn, seed=s).problem for s in SEEDS}


@pytest.mark.parametrize("name", K.check.names)
def test_reference_passes_and_a_stub_is_not_attempted(name):
    source = K.solution(name)
    space = {"unicodedata": unicodedata, "re": re}  # what the notebook's exercise cells have imported
    exec(source, space)  # the shown solution, run as a learner would paste it
    answer = space[re.match(r"def (\w+)", source).group(1)]
    for seed in SEEDS:
        r = K.check(name, answer, seed=seed)
        assert r.passed is True, r.message
        assert f"seed {seed}" in r.message
    assert K.check(name, _todo).passed is None


def test_fresh_inputs_unless_a_seed_is_given():
    a, b = K.check("dedup_key", K.reference_dedup_key), K.check("dedup_key", K.reference_dedup_key)
    assert a.details["seed"] != b.details["seed"]
    wrong = lambda t: t  # noqa: E731
    assert K.check("bpe_step", lambda w: (("x", "y"), w), seed=5).message == \
        K.check("bpe_step", lambda w: (("x", "y"), w), seed=5).message
    assert K.check("normaliser", wrong, seed=3).message == K.check("normaliser", wrong, seed=3).message


# --------------------------------------------------------------------------------------- normaliser
def test_normaliser_mistakes_get_their_tag():
    nfkc = lambda t: unicodedata.normalize("NFKC", t)  # noqa: E731 (the notebook's starter)
    assert _problems("normaliser", nfkc) == {"control"}
    def strips_indent(t):
        return "\n".join(line.strip() for line in K.reference_normaliser(t).split("\n"))
    assert _problems("normaliser", strips_indent) == {"indent"}
    def only_crlf(t):
        return K.reference_normaliser(t.replace("\r\n", "\n").replace("\r", "\x00"))
    assert _problems("normaliser", only_crlf) == {"line_ends"}


# ---------------------------------------------------------------------------------------- dedup_key
def _cf_free(t):
    return "".join(c for c in unicodedata.normalize("NFKC", t) if unicodedata.category(c) != "Cf")


@pytest.mark.parametrize("wrong,problem", [
    (lambda t: unicodedata.normalize("NFKC", t).strip(), "split_copies"),  # what passed the old exercise
    (lambda t: " ".join(_cf_free(t).lower().split()), "split_copies"),  # lower() keeps ß, casefold makes it ss
    (lambda t: " ".join(unicodedata.normalize("NFKC", t).casefold().split()), "split_copies"),  # zero-width kept
    (lambda t: re.sub(r"\W+", "", K.reference_dedup_key(t)), "merged_distinct"),  # deletes spaces and punctuation
    (lambda t: re.sub(r"[^a-z ]", "", K.reference_dedup_key(t)), "merged_distinct"),  # deletes non-letters
    (lambda t: K.reference_dedup_key(t).encode("ascii", "ignore").decode(), "merged_distinct"),  # drops accents
])
def test_dedup_key_mistakes_get_their_tag(wrong, problem):
    assert _problems("dedup_key", wrong) == {problem}


def test_dedup_key_names_the_variation_and_accepts_another_order():
    r = K.check("dedup_key", lambda t: " ".join(_cf_free(t).casefold().split(" ")), seed=1)  # split(" ") only
    assert r.problem == "split_copies" and "whitespace" in r.message and "seed 1" in r.message
    other_order = lambda t: re.sub(r"\s+", " ", _cf_free(t.casefold())).strip()  # noqa: E731
    assert _problems("dedup_key", other_order) == {None}
    assert K.check("dedup_key", lambda t: 1).problem == "not_text"


# ----------------------------------------------------------------------------------------- bpe_step
def _best(pairs):
    return min(pairs, key=lambda p: (-pairs[p], p))


def _step(count=B.pair_counts, pick=_best, merge=B.merge_pair):
    def bpe_step(word_counts):
        pair = pick(count(word_counts))
        return pair, merge(word_counts, pair)
    return bpe_step


def _unweighted(wc):
    return Counter(p for w in wc for p in zip(w, w[1:]))


def _across_words(wc):
    seq = [s for w, n in wc.items() for _ in range(n) for s in w]
    return Counter(zip(seq, seq[1:]))


def _once_per_word(wc):
    return Counter({p: n for w, n in wc.items() for p in set(zip(w, w[1:]))}) + Counter(
        p for w, n in wc.items() for p in set(zip(w, w[1:])) for _ in range(n - 1))


def _merge_overlapping(wc, pair):
    out = {}
    for w, n in wc.items():
        for i in reversed([i for i in range(len(w) - 1) if (w[i], w[i + 1]) == pair]):
            w = w[:i] + (w[i] + w[i + 1],) + w[i + 2:]
        out[w] = n
    return out


def _merge_by_replace(wc, pair):
    return {tuple(" ".join(w).replace(" ".join(pair), "".join(pair)).split(" ")): n for w, n in wc.items()}


def _merge_first(wc, pair):
    out = {}
    for w, n in wc.items():
        i = next((i for i in range(len(w) - 1) if (w[i], w[i + 1]) == pair), None)
        out[w if i is None else w[:i] + (w[i] + w[i + 1],) + w[i + 2:]] = n
    return out


def _merge_no_skip(wc, pair):
    return {tuple(w[i] + w[i + 1] if (w[i], w[i + 1]) == pair else w[i] for i in range(len(w) - 1)) + w[-1:]: n
            for w, n in wc.items()}


@pytest.mark.parametrize("wrong,problem", [
    (_step(count=_unweighted), "not_weighted"),
    (_step(count=_across_words), "across_words"),
    (_step(count=_once_per_word), "counted_once_per_word"),
    (_step(pick=lambda p: Counter(p).most_common(1)[0][0]), "tie_break"),
    (_step(pick=lambda p: max(p, key=p.get)), "tie_break"),
    (_step(merge=_merge_overlapping), "overlapping_merge"),
    (_step(merge=_merge_no_skip), "overlapping_merge"),
    (_step(merge=_merge_by_replace), "merged_across_symbols"),
    (_step(merge=_merge_first), "missed_occurrences"),
    (_step(merge=lambda wc, pair: {w: 1 for w in B.merge_pair(wc, pair)}), "lost_counts"),
    (lambda wc: _best(B.pair_counts(wc)), "not_a_step"),
])
def test_bpe_step_mistakes_get_their_tag(wrong, problem):
    assert _problems("bpe_step", wrong) == {problem}


# ------------------------------------------------------------------------------------- bpe_by_hand
def test_bpe_by_hand_on_the_five_word_corpus_matches_hugging_face():
    corpus = " ".join(["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3 + ["new"] * 2)
    words = B.word_counts(corpus)
    assert words[tuple("newest")] == 6 and len(words) == 5
    steps = B.bpe_trace(corpus, 12)
    assert steps[0].pair == ("e", "s") and steps[0].count == 9 and steps[0].pairs[("s", "t")] == 9  # a tie, e<s
    assert steps[1].pair == ("es", "t") and steps[-1].vocab[-1] == "lower"
    assert [s.pair for s in steps] == B.hf_merges(corpus, 12)
    assert "merge 1:" in B.format_step(steps[0]) and "n e w es t ×6" in B.format_step(steps[0])


def test_merge_pair_goes_left_to_right_and_stops_when_nothing_is_left():
    assert B.merge_pair({("a", "a", "a"): 2, ("a", "b"): 1}, ("a", "a")) == {("aa", "a"): 2, ("a", "b"): 1}
    assert B.pair_counts({("a", "a", "a"): 2}) == {("a", "a"): 4}
    assert len(B.bpe_trace("ab ab", 5)) == 1  # after one merge every word is one symbol
