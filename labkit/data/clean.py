"""Cleaning: normalise, scrub, filter, deduplicate. Every step counts what goes in and out.

Per-document steps (run on workers) are plain ``str -> str`` functions or predicates; the
global steps (exact and near-duplicate removal) only need small per-document summaries: a
SHA-256 of the text and a MinHash signature, computed on the workers too.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

# ------------------------------------------------------------------ normalisers (str -> str)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")


def nfkc(text: str) -> str:
    """Unicode NFKC: one code point sequence per look-alike (ligatures, full-width, superscripts)."""
    return unicodedata.normalize("NFKC", text)


def strip_control(text: str) -> str:
    """Drop control and invisible format characters; keep tab and newline (CR is handled by whitespace)."""
    return _CONTROL.sub("", text)


def normalise_whitespace(text: str) -> str:
    """CRLF/CR -> LF, no trailing spaces, at most two blank lines in a row, no blank start or end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("", text)
    return _BLANKS.sub("\n\n\n", text).strip("\n")


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses with ``<EMAIL>`` and IPv4/IPv6 addresses with ``<IP>``."""
    text = _EMAIL.sub("<EMAIL>", text)
    text = _IPV4.sub("<IP>", text)
    return _IPV6.sub("<IP>", text)


NORMALISERS: dict[str, Callable[[str], str]] = {
    "nfkc": nfkc, "control": strip_control, "whitespace": normalise_whitespace, "scrub_pii": scrub_pii,
}


def apply_normalisers(text: str, names: Sequence[str]) -> str:
    """Run the named normalisers (keys of :data:`NORMALISERS`) on ``text``, in the given order."""
    unknown = [n for n in names if n not in NORMALISERS]
    if unknown:
        raise ValueError(f"unknown normaliser {unknown[0]!r}; valid: {', '.join(NORMALISERS)}")
    for name in names:
        text = NORMALISERS[name](text)
    return text

# ------------------------------------------------------------------ quality measures

_TEXTLIKE = re.compile(r"[\w\s.,;:!?'\"()\[\]{}<>=+\-*/\\#%&|^~`@$]")


def nontext_fraction(text: str) -> float:
    """Fraction of characters that are neither letters/digits, whitespace nor ASCII punctuation."""
    if not text:
        return 1.0
    return 1.0 - len(_TEXTLIKE.findall(text)) / len(text)


# ------------------------------------------------------------------ step bookkeeping

@dataclass
class StepStats:
    """Documents and bytes in and out of one cleaning step, with a few examples of what it did."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    changed: int = 0
    examples: list[dict] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (doc id, reason) of every doc removed

    @property
    def removed(self) -> int:
        return self.docs_in - self.docs_out

    def merge(self, other: "StepStats", max_examples: int = 5) -> None:
        """Add another partition's counts (examples kept in order, up to ``max_examples``)."""
        for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "changed"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.examples.extend(other.examples[: max(0, max_examples - len(self.examples))])
        self.dropped.extend(other.dropped)

    def row(self) -> dict:
        return {"step": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "removed": self.removed,
                "changed": self.changed, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _snippet(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _first_diff(a: str, b: str, n: int = 60) -> tuple[str, str]:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 20)
    return a[lo:lo + n], b[lo:lo + n]


def apply_map(name: str, fn: Callable[[str], str], docs: list, stats_out: list, max_examples: int = 5) -> list:
    """Apply a normaliser to every document (``.id``, ``.text``); empty results are removed."""
    st = StepStats(name)
    kept = []
    for d in docs:
        before = d.text
        after = fn(before)
        st.docs_in += 1
        st.bytes_in += _nbytes(before)
        if after != before:
            st.changed += 1
            if len(st.examples) < max_examples:
                a, b = _first_diff(before, after)
                st.examples.append({"id": d.id, "before": a, "after": b})
        if after.strip():
            d.text = after
            kept.append(d)
            st.docs_out += 1
            st.bytes_out += _nbytes(after)
        else:
            st.dropped.append((d.id, f"empty after {name}"))
    stats_out.append(st)
    return kept


def apply_filter(name: str, why: Callable[[str], str | None], docs: list, stats_out: list,
                 max_examples: int = 5) -> list:
    """Keep documents for which ``why(text)`` is None; else it returns the reason for removal."""
    st = StepStats(name)
    kept = []
    for d in docs:
        st.docs_in += 1
        n = _nbytes(d.text)
        st.bytes_in += n
        reason = why(d.text)
        if reason is None:
            kept.append(d)
            st.docs_out += 1
            st.bytes_out += n
        else:
            st.dropped.append((d.id, reason))
            if len(st.examples) < max_examples:
                st.examples.append({"id": d.id, "reason": reason, "text": _snippet(d.text)})
    stats_out.append(st)
    return kept


def length_filter(min_chars: int, max_chars: int) -> Callable[[str], str | None]:
    """A filter: too short (< min_chars) or too long (> max_chars) documents go."""
    def why(text: str) -> str | None:
        if len(text) < min_chars:
            return f"{len(text)} chars < min_chars={min_chars}"
        if len(text) > max_chars:
            return f"{len(text):,} chars > max_chars={max_chars:,}"
        return None
    return why


def quality_filter(max_nontext: float, max_replacement: float = 0.01) -> Callable[[str], str | None]:
    """A filter: too many non-text characters, or too many U+FFFD left by invalid UTF-8."""
    def why(text: str) -> str | None:
        bad = text.count("\ufffd") / max(len(text), 1)
        if bad > max_replacement:
            return f"{bad:.1%} undecodable characters (U+FFFD) > {max_replacement:.0%}"
        frac = nontext_fraction(text)
        if frac > max_nontext:
            return f"non-text fraction {frac:.0%} > max_nontext={max_nontext:.0%}"
        return None
    return why


# ------------------------------------------------------------------ exact duplicates

def content_hash(text: str) -> str:
    """SHA-256 of the UTF-8 text: equal hashes mean equal documents."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def exact_duplicates(hashes: Sequence[str]) -> dict[int, int]:
    """``{index: index of its first copy}`` for every document that repeats an earlier one."""
    first: dict[str, int] = {}
    dups = {}
    for i, h in enumerate(hashes):
        if h in first:
            dups[i] = first[h]
        else:
            first[h] = i
    return dups


# ------------------------------------------------------------------ MinHash + LSH (near duplicates)

_PRIME = (1 << 31) - 1
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 5) -> np.ndarray:
    """The set of word ``n``-grams (lower-cased), hashed to uint64 with CRC32 (stable across processes)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        grams = {" ".join(words)}
    else:
        grams = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
    return np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams))


@dataclass(frozen=True)
class MinHasher:
    """``num_perm`` hash functions ``(a*x + b) mod p``; a signature keeps each one's minimum.

    Two documents' signatures agree at each position with probability equal to the Jaccard
    similarity of their shingle sets, so the fraction of equal positions estimates it.
    """

    num_perm: int = 128
    ngram: int = 5
    seed: int = 0

    def _params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, _PRIME, self.num_perm, dtype=np.uint64)
        b = rng.integers(0, _PRIME, self.num_perm, dtype=np.uint64)
        return a, b

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of ``text`` (uint32, length ``num_perm``)."""
        return self.signatures([text])[0]

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """Signatures of many texts, one row each."""
        a, b = self._params()
        rows = []
        for t in texts:
            x = shingles(t, self.ngram) % np.uint64(_PRIME)
            sig = np.full(self.num_perm, _PRIME, dtype=np.uint64)
            for lo in range(0, len(x), 4096):  # bound memory on long documents
                chunk = x[lo:lo + 4096]
                h = (a[:, None] * chunk[None, :] + b[:, None]) % np.uint64(_PRIME)
                np.minimum(sig, h.min(axis=1), out=sig)
            rows.append(sig.astype(np.uint32))
        return np.stack(rows) if rows else np.zeros((0, self.num_perm), dtype=np.uint32)


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (to check the estimate)."""
    sa, sb = set(shingles(a, n).tolist()), set(shingles(b, n).tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Area under ``y(x)`` by the trapezoid rule (NumPy's own trapezoid needs NumPy 2; the floor is 1.26)."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising false positives + false negatives.

    A pair with similarity s becomes a candidate with probability 1 - (1 - s^rows)^bands,
    an S-curve whose steepest point sits near (1/bands)^(1/rows).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"near-duplicate threshold must be between 0 and 1 (exclusive), not {threshold}")
    s = np.linspace(0, 1, 201)
    best, best_err = (1, num_perm), float("inf")
    for r in range(1, num_perm + 1):
        b = num_perm // r
        p = 1 - (1 - s**r) ** b
        err = _area(np.where(s < threshold, p, 0), s) + _area(np.where(s >= threshold, 1 - p, 0), s)
        if err < best_err:
            best, best_err = (b, r), err
    return best


@dataclass
class NearDuplicates:
    """What ``find_near_duplicates`` found, and what it cost."""

    dropped: dict[int, tuple[int, float]]  # index -> (index of the kept document it repeats, estimated Jaccard)
    comparisons: int = 0                   # signature pairs compared
    capped_buckets: int = 0                # buckets that reached max_representatives (later kept ones not added)


def find_near_duplicates(signatures: np.ndarray, threshold: float = 0.8,
                         max_representatives: int = 32) -> NearDuplicates:
    """Near-duplicates by MinHash + LSH; each dropped document names a kept one it is like.

    Signatures are cut into bands; documents sharing a whole band share that band's bucket.
    Documents are visited in order: each is compared with the *kept* documents that stand in
    its buckets and dropped when the most similar of them reaches ``threshold`` (that one, and
    their estimated Jaccard, is its partner; ties go to the earliest); else it is kept. Either
    way the kept document (itself, or its partner) then stands in its buckets, so a document
    that shares a band only with a dropped copy is still compared with the original. The
    earliest document of a group stays, no partner is itself dropped, and a chain (A ~ B, B ~ C,
    A !~ C) drops only B. A bucket holds at most ``max_representatives`` kept documents, which
    bounds the work at ``bands * max_representatives`` comparisons per document (a cluster of
    near-copies costs about one comparison each, not all pairs); a document like only a kept
    one left out of full buckets may stay (such buckets are counted in ``capped_buckets``).
    """
    if max_representatives < 1:
        raise ValueError(f"max_representatives must be at least 1, not {max_representatives}")
    n, num_perm = signatures.shape
    out = NearDuplicates({})
    if n < 2:
        return out
    bands, rows = lsh_params(threshold, num_perm)
    keys = [[row.tobytes() for row in np.ascontiguousarray(signatures[:, b * rows:(b + 1) * rows])]
            for b in range(bands)]
    reps: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]  # band -> bucket -> kept documents
    full: set[tuple[int, bytes]] = set()
    for j in range(n):
        candidates = set()
        for b in range(bands):
            candidates.update(reps[b].get(keys[b][j], ()))
        rep = j
        if candidates:
            idx = np.array(sorted(candidates))
            sims = np.mean(signatures[idx] == signatures[j], axis=1)
            out.comparisons += len(idx)
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                rep = int(idx[best])
                out.dropped[j] = (rep, float(sims[best]))
        for b in range(bands):  # the kept document (j, or its partner) now stands in j's buckets too
            members = reps[b].setdefault(keys[b][j], [])
            if rep in members:
                continue
            if len(members) < max_representatives:
                members.append(rep)
            else:
                full.add((b, keys[b][j]))
    out.capped_buckets = len(full)
    return out


def near_duplicates(signatures: np.ndarray, threshold: float = 0.8,
                    max_representatives: int = 32) -> dict[int, tuple[int, float]]:
    """``{index: (kept index it duplicates, estimated Jaccard)}``; see ``find_near_duplicates``."""
    return find_near_duplicates(signatures, threshold, max_representatives).dropped
