"""Checkers for the data notebook: a normaliser, a key for duplicates, one step of BPE.

``check("normaliser", fn)``, ``check("dedup_key", fn)`` and ``check("bpe_step", fn)`` run the learner's
function on fresh random inputs (``seed=`` repeats a run; the message names the seed) and return a
:class:`~labkit.check.Result` that names the first mistake with a hint; they never raise for a wrong answer.
"""

from __future__ import annotations

import copy
import inspect
import random
import re
import unicodedata
from typing import Any, Callable

from labkit.check import Result, attempt, checker_book, correct, mistake, solution_book
from labkit.data import bpe_by_hand as B
from labkit.data import clean as C

_WORDS = "data token shard merge worker corpus python lexer parser cluster batch queue node cache".split()


def _rng(seed: int | None) -> tuple[random.Random, int]:
    seed = random.randrange(2**31) if seed is None else int(seed)
    return random.Random(seed), seed


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _insert(rng: random.Random, text: str, piece: str) -> str:
    """``piece`` put inside ``text``, never at either end."""
    i = rng.randrange(1, len(text))
    return text[:i] + piece + text[i:]


def _full_width(text: str) -> str:
    """ASCII letters, digits and punctuation as their full-width look-alikes (Ａ for A)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


# ------------------------------------------------------------------------------------- normaliser
def reference_normaliser(text: str) -> str:
    """The pipeline's normalisers: NFKC, then drop control/format characters, then tidy whitespace."""
    return C.normalise_whitespace(C.strip_control(C.nfkc(text)))


def _solution_normaliser(text: str) -> str:
    """NFKC, one kind of line end, no control or format characters, tidy whitespace (what the pipeline does)."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # before dropping controls: \r is one
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf"))
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # trailing spaces and tabs on every line
    return re.sub(r"\n{3,}", "\n\n\n", text).strip("\n")  # at most two blank lines; none at the ends


def _normaliser_cases(rng: random.Random) -> list[tuple[str, str, str]]:
    """(problem tag, input, hint): one fresh case per rule, then a random mix."""
    w = lambda: _word(rng)  # noqa: E731
    mix = "".join(rng.choice(["x", " ", "\t", "\n", "ﬂ", "\r\n", "\x00", "é", "  \n"]) for _ in range(60))
    return [
        ("nfkc", f"{w()} {rng.choice('ﬁﬂﬀ')}{w()}", "NFKC folds ligatures such as 'ﬁ' into plain letters"),
        ("nfkc", f"{w()} {_full_width(w().upper() + str(rng.randint(10, 999)))}",
         "NFKC maps full-width letters and digits to ASCII"),
        ("control", _insert(rng, f"{w()} {w()}", rng.choice(["\x07", "\x1b", "\x00", "\x7f"])),
         "remove control characters (Unicode category Cc), keep \\n and \\t"),
        ("zero_width", _insert(rng, w() + w(), rng.choice(["\u200b", "\u200d", "\u2060", "\ufeff"])),
         "remove invisible format characters such as U+200B ZERO WIDTH SPACE"),
        ("line_ends", f"{w()}\r\n{w()}\r{w()}", "turn Windows (\\r\\n) and old Mac (\\r) line ends into \\n"),
        ("trailing", f"{w()}{' ' * rng.randint(1, 4)}\n{w()}\t\n{' ' * rng.randint(0, 3)}\n",
         "strip spaces and tabs at the end of every line, and blank lines at the ends"),
        ("blank_lines", w() + "\n" * rng.randint(4, 8) + w(), "keep at most two blank lines in a row"),
        ("indent", rng.choice(["\t", "    "]) + f"{w()} = {w()}\n", "leading indentation matters in code: keep it"),
        ("mismatch", mix, "a random mix of everything above"),
    ]


def _check_normaliser(fn: Callable[[str], str], seed: int | None = None) -> Result:
    """Run ``fn`` on one fresh case per rule and a random mix; name the first mismatch with a hint."""
    rng, seed = _rng(seed)
    cases = _normaliser_cases(rng)
    for problem, given, hint in cases:
        want = reference_normaliser(given)
        got = attempt(fn, given, on=repr(given))
        if got != want:
            return mistake(problem, f"on {given!r}\n   expected {want!r}\n   got      {got!r}\n   hint: {hint} "
                                    f"(seed {seed})", given=given, expected=want, got=got, seed=seed)
    return correct(f"all {len(cases)} fresh cases pass: your normaliser matches the pipeline's (seed {seed})",
                   seed=seed)


# -------------------------------------------------------------------------------------- dedup_key
def reference_dedup_key(text: str) -> str:
    """What two copies of one document share: NFKC, no zero-width characters, case folded, one space per gap."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")  # U+200B, U+2060, U+FEFF, ...
    text = text.casefold()  # like lower(), and also ß -> ss
    return " ".join(text.split())  # every run of whitespace (tabs, newlines, no-break spaces) -> one space


_SHARP_S = ["straße", "fuß", "groß", "maß"]
_ACCENTED = ["café", "naïve", "résumé", "über", "déjà"]
_OTHER_ACCENT = str.maketrans("éèïîüûàá", "èéîïûüáà")
_ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060"]
_SPACES = ["  ", "   ", "\t", "\n", " \n ", "\u00a0", "\u2009", "\u3000", " \t "]


def _document(rng: random.Random) -> list[str]:
    """A short random document as its words: plain words, a ß word, an accented word, a number, punctuation."""
    words = [_word(rng) for _ in range(rng.randint(5, 8))] + [rng.choice(_SHARP_S), rng.choice(_ACCENTED)]
    rng.shuffle(words)
    words.insert(rng.randrange(1, len(words)), f"v{rng.randint(1, 8)}")
    k = rng.randrange(len(words) - 1)
    words[k] += rng.choice([",", ";", ":"])
    words[-1] += rng.choice([".", "!", "?"])
    return words


def _copies(rng: random.Random, words: list[str]) -> list[tuple[str, str]]:
    """(what differs, a copy of the document that must get the same key)."""
    text = " ".join(words)
    spaced = rng.choice(["", " ", "\n", "\t "]) + "".join(
        w + (rng.choice(_SPACES) if i < len(words) - 1 else "") for i, w in enumerate(words)
    ) + rng.choice([" ", "\n", "  \n", "\t"])
    zw, full = list(words), list(words)
    for i in {rng.randrange(len(words))} | {i for i in range(len(words)) if rng.random() < 0.3}:
        zw[i] = _insert(rng, words[i], rng.choice(_ZERO_WIDTH))
    for i in {rng.randrange(len(words))} | {i for i in range(len(words)) if rng.random() < 0.4}:
        full[i] = _full_width(words[i])
    return [
        ("letter case (ß in capitals is SS)", text.upper()),
        ("letter case", " ".join(w.title() if rng.random() < 0.5 else w for w in words)),
        ("the kind and amount of whitespace between words and at the ends (tabs, newlines, no-break spaces)",
         spaced),
        ("invisible zero-width characters inside words", " ".join(zw)),
        ("full-width look-alike letters, digits and punctuation (Ａ for A)", " ".join(full)),
        ("accents stored as a letter plus a combining mark (Unicode NFD)", unicodedata.normalize("NFD", text)),
        ("all of the above at once", _full_width(spaced.upper()).replace("Ｖ", "\u200bv")),
    ]


def _distinct(rng: random.Random, words: list[str]) -> list[tuple[str, str]]:
    """(what differs, another document that must get a different key)."""
    text = " ".join(words)
    num = next(i for i, w in enumerate(words) if re.fullmatch(r"v\d\W?", w))
    digit = words[:num] + [re.sub(r"\d", lambda m: str(int(m.group()) + 1), words[num])] + words[num + 1:]
    i = rng.randrange(len(words) - 1)
    joined = words[:i] + [words[i] + words[i + 1]] + words[i + 2:]
    accent = next(w for w in words if any(a in w for a in _ACCENTED))
    bare = "".join(c for c in unicodedata.normalize("NFD", accent) if not unicodedata.combining(c))
    punct = [re.sub(r"[,;:.!?]", "", w) for w in words]
    swap = list(words)
    j = next(k for k, w in enumerate(words) if w in _WORDS)
    swap[j] = rng.choice([w for w in _WORDS if w != words[j]])
    return [
        ("one number (v1 vs v2)", " ".join(digit)),
        ("where a word break is (two words written as one)", " ".join(joined)),
        ("an accent (é is not e)", text.replace(accent, bare)),
        ("which accent (é is not è)", text.replace(accent, accent.translate(_OTHER_ACCENT))),
        ("punctuation", " ".join(punct)),
        ("one word", " ".join(swap)),
    ]


def _check_dedup_key(fn: Callable[[str], str], seed: int | None = None) -> Result:
    """Copies varied in case, spacing, zero-width and look-alike characters must share a key; other documents must not."""
    rng, seed = _rng(seed)
    docs = [_document(rng) for _ in range(3)]
    for words in docs:
        text = " ".join(words)
        key = attempt(fn, text, on=repr(text))
        if not isinstance(key, str):
            return mistake("not_text", f"return the key as a str, got {type(key).__name__} (seed {seed})", seed=seed)
        for what, copy_ in _copies(rng, words):
            other = attempt(fn, copy_, on=repr(copy_))
            if other != key:
                return mistake("split_copies", f"two copies that differ only in {what} got different keys:\n"
                                               f"   {text!r} -> {key!r}\n   {copy_!r} -> {other!r}\n"
                                               f"   hint: your key must not depend on {what.split(' (')[0]} "
                                               f"(seed {seed})", given=[text, copy_], got=[key, other], seed=seed)
        for what, doc in _distinct(rng, words):
            other = attempt(fn, doc, on=repr(doc))
            if other == key:
                return mistake("merged_distinct", f"two different documents got the same key {key!r}; they differ "
                                                  f"in {what}:\n   {text!r}\n   {doc!r}\n   hint: you normalise "
                                                  f"too much: keep what makes them different (seed {seed})",
                               given=[text, doc], got=[key, other], seed=seed)
    collection = [" ".join(w) for w in docs] + [rng.choice(_copies(rng, w))[1] for w in docs for _ in range(2)]
    rng.shuffle(collection)
    yours = len(collection) - len({attempt(fn, d) for d in collection})
    exact = len(collection) - len({C.content_hash(reference_normaliser(d)) for d in collection})
    return correct(f"copies share a key, different documents do not (3 fresh documents, seed {seed}). On "
                   f"{len(collection)} documents your key finds {yours} copies; the pipeline's hash of the "
                   f"cleaned text finds {exact}", seed=seed)


# --------------------------------------------------------------------------------------- bpe_step
def _bpe_cases(rng: random.Random) -> list[tuple[str, B.Words]]:
    """(what the case tests, word counts): targeted cases with fresh letters and counts, then random ones."""
    a, b, c, d, e, f, g, h = rng.sample("abcdefghijklmnopqrstuvwxyz", 8)
    n = rng.randint(3, 7)
    tie_first, tie_second = sorted([(c, d), (e, f)])
    cases = [
        ("weighting", {(a, b): rng.randint(6, 9), (c, d, e): 1, (f, c, d): 1, (c, d, g): 1, (h, c, d): 1}),
        ("word boundaries", {(a,): rng.randint(7, 9), (b, c): 2, (c, a, d): 1}),
        ("repeated letters", {(a, a, a, a): 3, (a, a, a): 2, (b, c): 7, (a, a, b): 1}),
        ("symbols of several letters", {(b, c): 6, (a + b, c): 1, (b, c + d): 1, (d, b, c, e, b, c): 2}),
        ("a tie", {tie_second: n, tie_first: n}),
    ]
    for _ in range(3):
        letters = rng.sample("abcdefghijklmnopqrstuvwxyz", 4)
        words: B.Words = {}
        while len(words) < rng.randint(4, 7) or not B.pair_counts(words):
            w = tuple(rng.choice(letters) for _ in range(rng.randint(1, 6)))
            words.setdefault(w, rng.randint(1, 9))
        for _ in range(rng.randint(0, 2)):  # a few merges first, so some symbols are longer than one letter
            if max(len(w) for w in words) > 2:
                words = B.bpe_step(words)[1]
        cases.append(("random words", words))
    return cases


def _best(pairs: dict[B.Pair, int]) -> B.Pair | None:
    return B.most_frequent_pair(pairs) if pairs else None


def _why_pair(words: B.Words, got: Any) -> tuple[str, str]:
    """A tag and a hint for a wrong pair."""
    inside = B.pair_counts(words)
    if got not in inside:
        return "across_words", (f"{got} never occurs inside one word: count pairs within each word only, "
                                "a word's last symbol and the next word's first are not neighbours")
    unweighted: dict[B.Pair, int] = {}
    once: dict[B.Pair, int] = {}
    for word, n in words.items():
        for p in zip(word, word[1:]):
            unweighted[p] = unweighted.get(p, 0) + 1
        for p in set(zip(word, word[1:])):
            once[p] = once.get(p, 0) + n
    if got == _best(unweighted):
        return "not_weighted", (f"{got} occurs in the most distinct words, but a word that occurs n times "
                                "counts n times: weight each word's pairs by its count")
    if got == _best(once):
        return "counted_once_per_word", (f"you count {got} at most once per word; in a a a the pair a+a occurs "
                                         "twice, so it counts twice per occurrence of the word")
    if inside[got] == max(inside.values()):
        tied = sorted(p for p, k in inside.items() if k == inside[got])
        return "tie_break", f"{tied} all occur {inside[got]} times: on a tie take the pair that sorts first"
    return "wrong_pair", f"{got} occurs {inside[got]} times, but another pair occurs {max(inside.values())} times"


def _why_merge(word: tuple[str, ...], pair: B.Pair, got: tuple[str, ...], want: tuple[str, ...]) -> tuple[str, str]:
    """A tag and a hint for a word merged wrongly."""
    text, got_text = "".join(word), "".join(got)
    if got_text != text:
        if len(got_text) > len(text):
            return "overlapping_merge", (f"{word} became {got} ({got_text!r}): a symbol went into two merges; "
                                         "once a symbol is merged it is used up")
        return "wrong_merge", f"{word} became {got}: letters went missing ({text!r} -> {got_text!r})"
    offsets = [sum(len(s) for s in word[:i]) for i in range(len(word) + 1)]
    got_cuts = {sum(len(s) for s in got[:i]) for i in range(len(got) + 1)}
    joined = [i for i in range(1, len(word)) if offsets[i] not in got_cuts]  # the symbol boundaries you removed
    if not got_cuts <= set(offsets) or any((word[i - 1], word[i]) != pair for i in joined):
        return "merged_across_symbols", (f"{word} became {got}: a merge joins the two whole symbols of the pair "
                                         "and nothing else (beware of string replace on the joined text)")
    if len(got) > len(want):
        return "missed_occurrences", f"{word} became {got}: merge every occurrence of {pair}, not only the first"
    if pair[0] == pair[1] and any(word[i:i + 3] == (pair[0],) * 3 for i in range(len(word))):
        return "overlapping_merge", (f"{word} became {got}: occurrences of {pair} overlap here; scan left to "
                                     "right and do not pair a symbol that is already merged")
    return "wrong_merge", f"{word} should become {want}, you gave {got}"


def _check_bpe_step(fn: Callable[[B.Words], tuple[B.Pair, B.Words]], seed: int | None = None) -> Result:
    """Run ``fn`` on fresh word counts; compare the pair it merges and the words it returns with BPE's."""
    rng, seed = _rng(seed)
    cases = _bpe_cases(rng)
    for what, words in cases:
        want_pair, want_words = B.bpe_step(words)
        out = attempt(fn, copy.deepcopy(words), on=f"{what} {words}")
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
            return mistake("not_a_step", f"return (pair, new word counts), e.g. (('a', 'b'), {{('ab', 'c'): 2}}); "
                                         f"got {out!r:.200} (seed {seed})", seed=seed)
        got_pair, got_words = out
        got_pair = tuple(got_pair) if isinstance(got_pair, (tuple, list)) else got_pair
        where = f"on {what} {words} (seed {seed})"
        if got_pair != want_pair:
            problem, hint = _why_pair(words, got_pair)
            return mistake(problem, f"{where}: you merge {got_pair}; hint: {hint}", given=words, got=got_pair,
                           seed=seed)
        texts = sorted("".join(w) for w in words)
        got_items = [(w, k) for w, k in got_words.items()]
        if all(isinstance(w, tuple) for w, _ in got_items) and sorted("".join(w) for w, _ in got_items) == texts:
            by_word = {w: next(g for g in got_items if "".join(g[0]) == "".join(w)) for w in words}
        elif len(got_items) == len(words) and all(isinstance(w, tuple) for w, _ in got_items):
            by_word = dict(zip(words, got_items))  # the letters changed: compare word by word, in order
        else:
            return mistake("lost_words", f"{where}: after merging {want_pair} your words are {list(got_words)}; "
                                         "keep every word, as a tuple of symbols, with its count", seed=seed)
        for word, n in words.items():
            want = B.merge_pair({word: n}, want_pair)
            (want_w,) = want
            got_w, got_n = by_word[word]
            if got_w != want_w:
                problem, hint = _why_merge(word, want_pair, got_w, want_w)
                return mistake(problem, f"{where}: merging {want_pair}: {hint}", given=words, got=got_words,
                               seed=seed)
            if got_n != n:
                return mistake("lost_counts", f"{where}: {got_w} has count {got_n!r}, it had {n}; a merge changes "
                                              "the symbols of a word, never how often the word occurs", seed=seed)
        if len(got_words) != len(want_words):
            return mistake("lost_words", f"{where}: you return {len(got_words)} words, there are {len(want_words)}",
                           seed=seed)
    return correct(f"right pair and right words on {len(cases)} fresh word counts (seed {seed})", seed=seed)


_BPE_STEP_SOLUTION = "\n\n".join(inspect.getsource(f) for f in
                                 (B.bpe_step, B.pair_counts, B.most_frequent_pair, B.merge_pair))


check = checker_book("data", {"normaliser": _check_normaliser, "dedup_key": _check_dedup_key,
                              "bpe_step": _check_bpe_step})


SOLUTIONS = {"normaliser": _solution_normaliser, "dedup_key": reference_dedup_key, "bpe_step": _BPE_STEP_SOLUTION}


solution = solution_book("data", SOLUTIONS)
