"""Byte-level BPE: vocab size as a parameter, save/load, splits, bytes per token."""

from __future__ import annotations

import pytest

from labkit.data.shards import tiny_text
from labkit.data.tokenizer import (
    EOT, bytes_per_token, compare_vocab_sizes, eot_id, load_tokenizer, save_tokenizer, show_split, train_bpe,
)


@pytest.fixture(scope="module")
def corpus():
    text = tiny_text(120_000)
    docs = [d for d in text.split("\n\n") if d.strip()]
    return docs[::2], docs[1::2]


def test_vocab_size_is_honoured_and_eot_is_zero(corpus):
    tok = train_bpe(corpus[0], 400)
    assert tok.get_vocab_size() == 400 and eot_id(tok) == 0 and tok.id_to_token(0) == EOT
    with pytest.raises(ValueError, match=">= 258"):
        train_bpe(corpus[0], 100)


def test_byte_level_round_trip_of_unseen_characters(corpus, tmp_path):
    tok = train_bpe(corpus[0], 400)
    s = "naïve café — 漢字 🙂 def f(x):\n\treturn x"
    assert tok.decode(tok.encode(s).ids) == s
    path = save_tokenizer(tok, tmp_path / "t" / "tokenizer.json")
    again = load_tokenizer(tmp_path / "t")
    assert again.encode(s).ids == tok.encode(s).ids
    with pytest.raises(FileNotFoundError, match="train one"):
        load_tokenizer(tmp_path / "missing.json")
    assert path.name == "tokenizer.json"


def test_show_split_pieces_rebuild_the_text(corpus):
    tok = train_bpe(corpus[0], 600)
    pieces = show_split(tok, "def __init__(self):\n    return None")
    assert "".join(p for _, p in pieces) == "def __init__(self):\n    return None"
    assert any(len(p) > 3 for _, p in pieces)  # merges learnt from Python code


def test_larger_vocab_gives_more_bytes_per_token(corpus):
    rows = compare_vocab_sizes(corpus[0], corpus[1], (300, 1000))
    assert [r["vocab_size"] for r in rows] == [300, 1000]
    assert 1.0 < rows[0]["bytes_per_token"] < rows[1]["bytes_per_token"]
    assert bytes_per_token(train_bpe(corpus[0], 1000), corpus[1]) == pytest.approx(rows[1]["bytes_per_token"])
