"""The data notebook's views, checkers and demo corpus."""

from __future__ import annotations

import numpy as np
import pytest

from labkit.check import data as K
from labkit.data import make_tiny_shards, preprocess, DataConfig
from labkit.data.demo import make_messy_corpus
from labkit.widgets import data as V


@pytest.fixture(scope="module")
def messy_report(tmp_path_factory):
    d = make_messy_corpus(tmp_path_factory.mktemp("m") / "messy")
    return preprocess([d], tmp_path_factory.mktemp("o") / "out", progress=False,
                      config=DataConfig.for_scale("tiny", scrub_pii=True))


def test_messy_corpus_shows_every_kind_of_trouble(messy_report):
    rep = messy_report
    why = " | ".join(r for _, r in rep.skipped + rep.repaired)
    for needle in ("dangling symlink", "symlink loop", "binary file", "empty file", "invalid UTF-8", "NUL bytes"):
        assert needle in why
    kinds = sorted((d["kind"], d["id"].rsplit("/", 1)[1]) for d in rep.duplicates)
    assert kinds == [("exact_dedup", "z_exact_copy_of_01.txt"), ("exact_dedup", "z_fullwidth_crlf_copy_of_02.txt"),
                     ("near_dedup", "z_near_copy_of_03.txt")]
    assert rep.step("quality_filter").removed == 1 and rep.step("scrub_pii").changed >= 1


def test_checkers_accept_the_reference_and_explain_mistakes():
    assert K.check("normaliser", K.reference_normaliser)
    r = K.check("normaliser", lambda t: t)
    assert not r and "NFKC" in r.message
    r = K.check("normaliser", lambda t: 1 / 0)
    assert not r and "ZeroDivisionError" in r.message
    assert "def normaliser" in K.solution("normaliser")  # the rest: tests/test_check_data.py
    with pytest.raises(KeyError, match="valid names: normaliser, dedup_key, bpe_step"):
        K.solution("nope")


def test_plots_and_playground(messy_report, tmp_path):
    r = make_tiny_shards(tmp_path, vocab_size=300)
    ids = r.read(0, r.num_tokens)
    rank, freq = V.zipf_data(ids, r.vocab_size)
    assert freq[0] == np.bincount(ids).max() and np.all(np.diff(freq) <= 0) and rank[0] == 1
    fig = V.zipf_plot(ids, r.vocab_size, r.tokenizer())
    assert len(fig.data) == 3
    fig = V.length_histogram(messy_report.doc_lengths)
    assert sum(fig.data[0].y) == len(messy_report.doc_lengths)
    assert len(V.steps_funnel(messy_report).data) == 2
    assert "z_near_copy_of_03.txt" in V.duplicates_table(messy_report)
    assert V.duplicates_plot(messy_report).data[0].y == (2, 1)
    out = V.try_text("ﬁne\x07  \r\n", ["nfkc", "control", "whitespace"], r.tokenizer())
    assert out["text"] == "fine" and "".join(p for _, p in out["pieces"]) == "fine"
    with pytest.raises(ValueError, match="valid: nfkc"):
        V.try_text("x", ["lowercase"])
    box = V.playground({"t": r.tokenizer()})
    box.children[0].value = "hello world"
    assert "hello" in box.children[2].value.replace("␣", " ")
