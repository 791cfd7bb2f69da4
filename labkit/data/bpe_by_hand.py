"""BPE by hand: the merge loop of a BPE trainer in plain Python, small enough to read and print.

A corpus becomes ``{word as a tuple of symbols: how often the word occurs}``. One step counts the
adjacent symbol pairs *inside* each word, weighted by the word's count, takes the most frequent
pair (on a tie, the pair that sorts first) and merges it into one symbol everywhere, left to right.
The learned merges, in order, are the tokenizer. :func:`hf_merges` asks Hugging Face's
``tokenizers`` trainer for its merges on the same words, to compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

Pair = tuple[str, str]
Words = dict[tuple[str, ...], int]


def word_counts(corpus: str) -> Words:
    """Each whitespace-separated word of ``corpus`` as a tuple of characters, with its count."""
    out: Words = {}
    for word in corpus.split():
        out[tuple(word)] = out.get(tuple(word), 0) + 1
    return out


def bpe_step(word_counts: dict[tuple[str, ...], int]) -> tuple[tuple[str, str], dict[tuple[str, ...], int]]:
    """One BPE merge: the most frequent adjacent pair, and the words with that pair merged."""
    pairs = pair_counts(word_counts)
    best = most_frequent_pair(pairs)
    return best, merge_pair(word_counts, best)


def pair_counts(word_counts: dict[tuple[str, ...], int]) -> dict[tuple[str, str], int]:
    """How often each adjacent pair occurs inside the words, each word weighted by its count."""
    pairs = {}
    for word, n in word_counts.items():
        for pair in zip(word, word[1:]):
            pairs[pair] = pairs.get(pair, 0) + n
    return pairs


def most_frequent_pair(pairs: dict[tuple[str, str], int]) -> tuple[str, str]:
    """The pair with the highest count; among equal counts, the one that sorts first."""
    return min(pairs, key=lambda p: (-pairs[p], p))


def merge_pair(word_counts: dict[tuple[str, ...], int], pair: tuple[str, str]) -> dict[tuple[str, ...], int]:
    """Every occurrence of ``pair`` made one symbol, scanning each word left to right."""
    merged = {}
    for word, n in word_counts.items():
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                out.append(word[i] + word[i + 1])
                i += 2  # both symbols are used up: in a a a only the first two merge
            else:
                out.append(word[i])
                i += 1
        merged[tuple(out)] = n
    return merged


@dataclass(frozen=True)
class BPEStep:
    """One merge of :func:`bpe_trace`: the pair counts it chose from, the pair, the words after it."""

    number: int
    pairs: dict[Pair, int]
    pair: Pair
    words: Words
    vocab: tuple[str, ...]

    @property
    def count(self) -> int:
        """How often the merged pair occurred."""
        return self.pairs[self.pair]


def vocabulary(word_counts: Words) -> tuple[str, ...]:
    """The distinct symbols the words are made of, sorted (short first)."""
    return tuple(sorted({s for w in word_counts for s in w}, key=lambda s: (len(s), s)))


def bpe_trace(corpus: str, n_merges: int) -> list[BPEStep]:
    """Train BPE on ``corpus`` for up to ``n_merges`` merges, keeping every intermediate."""
    words = word_counts(corpus)
    vocab = list(vocabulary(words))
    steps = []
    for number in range(1, n_merges + 1):
        pairs = pair_counts(words)
        if not pairs:  # every word is one symbol: nothing left to merge
            break
        pair = most_frequent_pair(pairs)
        words = merge_pair(words, pair)
        vocab.append(pair[0] + pair[1])
        steps.append(BPEStep(number, pairs, pair, words, tuple(vocab)))
    return steps


def format_words(word_counts: Words) -> str:
    """``l o w ×5   n e w ×2 ...``: each word's symbols separated by spaces, with its count."""
    return "   ".join(f"{' '.join(w)} ×{n}" for w, n in word_counts.items())


def format_step(step: BPEStep, top: int = 6) -> str:
    """A few lines for one step: the top pair counts, the merge, the vocabulary and the words."""
    ranked = sorted(step.pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    counts = "  ".join(f"{a}+{b}:{n}" for (a, b), n in ranked)
    new = step.pair[0] + step.pair[1]
    return (f"merge {step.number}: pair counts (top {len(ranked)} of {len(step.pairs)}): {counts}\n"
            f"   -> merge {step.pair[0]!r} + {step.pair[1]!r} = {new!r} (occurs {step.count} times)\n"
            f"   vocabulary ({len(step.vocab)}): {' '.join(step.vocab)}\n"
            f"   words: {format_words(step.words)}")


def hf_merges(corpus: str, n_merges: int) -> list[Pair]:
    """The first ``n_merges`` merges Hugging Face's ``tokenizers`` BPE trainer learns on ``corpus``,
    split into words at whitespace as here (no byte-level mapping, every pair counts from 1)."""
    # lazy: tokenizers only for the comparison with the library; the by-hand BPE needs nothing
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = {c for c in corpus if not c.isspace()}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n_merges, min_frequency=1, show_progress=False)
    tok.train_from_iterator([corpus], trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers >= 0.20 stores [a, b]; older versions stored "a b"
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges][:n_merges]
