"""Byte-level BPE tokenizers (HF ``tokenizers``): train, save, load, inspect, compare.

Byte-level means every string is first mapped to its UTF-8 bytes, so nothing is ever out of
vocabulary; BPE then merges frequent byte pairs until the vocabulary reaches ``vocab_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
MIN_VOCAB = 256 + 1 + 1  # every byte, the end-of-text token, and at least one merge


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; ``<|endoftext|>`` gets id 0 (the document separator)."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB} (256 bytes + end-of-text + merges), not {vocab_size!r}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eot_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token; raises if the tokenizer has none."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise ValueError(f"tokenizer has no {EOT!r} token; train it with labkit.data.train_bpe")
    return i


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Save in the HF ``tokenizer.json`` format (loadable by ``Tokenizer.from_file`` and transformers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; the error says what to do when it is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; train one with labkit.data.train_bpe and save_tokenizer")
    return Tokenizer.from_file(str(path))


def show_split(tok: Tokenizer, text: str) -> list[tuple[int, str]]:
    """How ``text`` gets split: (id, readable piece) per token, bytes shown as decoded text."""
    enc = tok.encode(text)
    return [(i, tok.decode([i])) for i in enc.ids]


def bytes_per_token(tok: Tokenizer, texts: Sequence[str]) -> float:
    """Average UTF-8 bytes per token over ``texts``: higher means a more compact encoding."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tok = sum(len(e.ids) for e in tok.encode_batch(list(texts)))
    return n_bytes / max(n_tok, 1)


def compare_vocab_sizes(
    train_texts: Sequence[str], eval_texts: Sequence[str], vocab_sizes: Sequence[int] = (512, 1024, 4096)
) -> list[dict]:
    """Train one BPE per vocab size and measure bytes/token on held-out texts."""
    rows = []
    for v in vocab_sizes:
        tok = train_bpe(train_texts, v)
        rows.append({"vocab_size": v, "actual_vocab": tok.get_vocab_size(),
                     "bytes_per_token": bytes_per_token(tok, eval_texts)})
    return rows
