"""Cleaning steps: normalisers, filters, exact and near-duplicate detection (own MinHash + LSH)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from labkit.data import clean as C
from labkit.data.sources import Document


def test_nfkc_control_and_whitespace():
    assert C.nfkc("ﬁne ＡＢＣ x²") == "fine ABC x2"
    assert C.strip_control("a\x00b\x1bc\u200bd\te\nf") == "abcd\te\nf"
    assert C.normalise_whitespace("\n\na  \r\nb\t\r\n\n\n\n\nc  \n\n") == "a\nb\n\n\nc"


def test_apply_normalisers_runs_them_in_order_and_names_valid_ones():
    text = "ﬁne\x07  \r\nmail a@b.org\n"
    assert C.apply_normalisers(text, []) == text
    assert C.apply_normalisers(text, ["nfkc", "control", "whitespace"]) == "fine\nmail a@b.org"
    assert C.apply_normalisers(text, ["nfkc", "control", "whitespace", "scrub_pii"]) == "fine\nmail <EMAIL>"
    assert C.apply_normalisers("a\x07b", ["control"]) == "ab" and C.apply_normalisers("ﬁ", ["nfkc"]) == "fi"
    with pytest.raises(ValueError, match="unknown normaliser 'lowercase'; valid: nfkc, control, whitespace, scrub_pii"):
        C.apply_normalisers("x", ["nfkc", "lowercase"])


def test_scrub_pii_keeps_version_numbers():
    out = C.scrub_pii("Mail guido@python.org, host 10.0.0.255, v3.11.7, addr fe80:0:0:0:202:b3ff:fe1e:8329.")
    assert out == "Mail <EMAIL>, host <IP>, v3.11.7, addr <IP>."
    assert C.scrub_pii("999.1.1.1 is no IP") == "999.1.1.1 is no IP"


def test_nontext_fraction_and_filters():
    assert C.nontext_fraction("def f(x): return x + 1") == 0.0
    assert C.nontext_fraction("█▓▒░" * 10 + "ok") > 0.9
    q = C.quality_filter(0.3)
    assert q("plain text, fine.") is None
    assert "non-text" in q("▒" * 50 + "abc")
    assert "U+FFFD" in q("\ufffd" * 5 + "a" * 100)
    ln = C.length_filter(5, 10)
    assert ln("abcdef") is None and "min_chars" in ln("abc") and "max_chars" in ln("a" * 11)


def test_steps_count_docs_and_bytes_and_keep_examples():
    docs = [Document(f"d{i}", t) for i, t in enumerate(["  a  ", "b", "\x00\x01", "c\r\n"])]
    stats: list = []
    out = C.apply_map("control", C.strip_control, docs, stats)
    st = stats[0]
    assert (st.docs_in, st.docs_out, st.removed, st.changed) == (4, 3, 1, 1)  # "\x00\x01" became empty; CR is kept here
    assert st.bytes_in == 5 + 1 + 2 + 3 and st.bytes_out == 5 + 1 + 3
    assert [d.id for d in out] == ["d0", "d1", "d3"] and st.examples[0]["id"] == "d2"
    out = C.apply_filter("len", C.length_filter(2, 100), out, stats)
    assert [d.id for d in out] == ["d0", "d3"] and stats[1].examples[0]["id"] == "d1"
    assert st.dropped == [("d2", "empty after control")] and stats[1].dropped[0][0] == "d1"
    assert "min_chars" in stats[1].examples[0]["reason"]


def test_exact_duplicates_keep_the_first_copy():
    hs = [C.content_hash(t) for t in ["x", "y", "x", "z", "y", "x"]]
    assert C.exact_duplicates(hs) == {2: 0, 4: 1, 5: 0}


def _words(rng, n):
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota",
                                "kappa", "lambda", "mu", "nu", "xi", "pi", "rho", "sigma", "tau"])
                    + str(rng.randrange(50)) for _ in range(n))


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    a = _words(rng, 400)
    words = a.split()
    for k in (20, 80, 200):
        b = " ".join(words[:-k] + _words(rng, k).split())
        true = C.jaccard(a, b)
        m = C.MinHasher(num_perm=256)
        est = float(np.mean(m.signature(a) == m.signature(b)))
        assert abs(est - true) < 0.1, (k, est, true)
    # stable across calls and processes: CRC32 shingles + seeded parameters
    assert np.array_equal(C.MinHasher(seed=3).signature(a), C.MinHasher(seed=3).signature(a))


def test_lsh_params_and_threshold_validation():
    b, r = C.lsh_params(0.8, 128)
    assert b * r <= 128 and 0.6 < (1 / b) ** (1 / r) < 0.9
    b2, r2 = C.lsh_params(0.3, 128)
    assert (1 / b2) ** (1 / r2) < (1 / b) ** (1 / r)
    with pytest.raises(ValueError, match="between 0 and 1"):
        C.lsh_params(1.5, 128)


def test_near_duplicates_found_and_threshold_matters():
    rng = random.Random(1)
    base = [_words(rng, 300) for _ in range(6)]
    docs = list(base)
    w = base[2].split()
    docs.append(" ".join(w[:-15] + _words(rng, 15).split()))  # ~90% similar to doc 2
    w = base[4].split()
    docs.append(" ".join(w[:-100] + _words(rng, 100).split()))  # ~50% similar to doc 4
    sigs = C.MinHasher(num_perm=128).signatures(docs)
    hi = C.near_duplicates(sigs, 0.8)
    assert set(hi) == {6} and hi[6][0] == 2 and hi[6][1] > 0.8
    lo = C.near_duplicates(sigs, 0.3)
    assert set(lo) == {6, 7} and lo[7][0] == 4


def _assert_honest(sigs, found, threshold):
    """Every dropped document names a kept one, with their real estimated similarity >= threshold."""
    for j, (k, sim) in found.items():
        assert sim == sim, f"{j} is a duplicate of {k} with similarity nan"
        assert k not in found, f"{j} names {k} as its partner, but {k} was dropped too"
        assert k < j and sim == float(np.mean(sigs[j] == sigs[k])) and sim >= threshold, (j, k, sim)


def _chain(order):
    """Signatures A ~ B (0.84), B ~ C (0.84), A !~ C (0.69), all in one LSH bucket of band 0."""
    b, r = C.lsh_params(0.8, 128)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    bb, c = a.copy(), a.copy()
    bb[r:r + 20] += 1        # B differs from A at 20 positions outside band 0
    c[r:r + 20] += 1
    c[r + 20:r + 40] += 1    # C differs from B at 20 others, from A at 40
    docs = {"A": a, "B": bb, "C": c}
    return np.stack([docs[x] for x in order])


@pytest.mark.parametrize("order,want", [("ABC", {1: (0, 108 / 128)}),   # B goes (like A); C is not like A
                                        ("ACB", {2: (0, 108 / 128)})])  # middle last: once "of 0 (similarity nan)"
def test_near_duplicates_chain_names_a_kept_partner_with_its_similarity(order, want):
    sigs = _chain(order)
    found = C.near_duplicates(sigs, 0.8)
    _assert_honest(sigs, found, 0.8)
    assert found == want


def test_near_duplicates_corpus_with_injected_copies_and_chains():
    rng = random.Random(7)
    docs = [_words(rng, 200) for _ in range(60)]
    bases = list(range(0, 60, 3))
    for i in bases:                         # chains: each copy edits its predecessor a little more
        w = docs[i].split()
        for _ in range(4):
            for p in rng.sample(range(len(w)), 2):
                w[p] = _words(rng, 1)
            docs.append(" ".join(w))
    for i in bases[:5]:                     # and a few plain near-copies
        docs.append(docs[i] + " " + _words(rng, 3))
    sigs = C.MinHasher(num_perm=128).signatures(docs)
    found = C.near_duplicates(sigs, 0.8)
    _assert_honest(sigs, found, 0.8)
    assert not any(j < 60 for j in found)   # the originals all stay
    assert set(range(len(docs) - 5, len(docs))) <= set(found)
    assert all(found[60 + 4 * n][0] == i for n, i in enumerate(bases))  # each chain's first copy: its base
    assert len(found) > 40


def test_near_duplicates_of_one_big_cluster_are_linear():
    rng = random.Random(3)
    base = _words(rng, 400).split()
    docs = [" ".join(base)]
    for _ in range(1200):                   # one document and 1,200 near-copies of it
        w = list(base)
        for p in rng.sample(range(len(w)), 3):
            w[p] = _words(rng, 1)
        docs.append(" ".join(w))
    sigs = C.MinHasher(num_perm=128).signatures(docs)
    res = C.find_near_duplicates(sigs, 0.8)
    _assert_honest(sigs, res.dropped, 0.8)
    assert sum(k == 0 for k, _ in res.dropped.values()) >= 1190
    assert res.comparisons <= 2 * len(docs), res.comparisons   # all pairs: ~720,000


def test_near_duplicates_caps_representatives_per_bucket():
    b, r = C.lsh_params(0.8, 128)
    rng = np.random.default_rng(1)
    sigs = rng.integers(0, 2**32, (1000, 128), dtype=np.uint64).astype(np.uint32)
    sigs[:, :r] = sigs[0, :r]               # all share band 0's bucket, yet none is alike
    res = C.find_near_duplicates(sigs, 0.8, max_representatives=16)
    assert res.dropped == {}
    assert res.comparisons <= 16 * len(sigs) and res.capped_buckets == 1
    with pytest.raises(ValueError, match="max_representatives"):
        C.find_near_duplicates(sigs, 0.8, max_representatives=0)
