"""Packed token shards on disk: the writer the pipeline uses and the reader training uses.

An output folder holds::

    meta.json        format version, tokenizer file, vocab_size, dtype, eot_id, shards per split
                     ({"file", "tokens", "bytes", "sha256"}), counts, source hashes, config
    tokenizer.json   the HF ``tokenizers`` file the ids come from
    train_00000.bin  raw little-endian token ids (uint16 when vocab_size < 65536, else uint32)
    val_00000.bin    ...

Every document is followed by the end-of-text id ``meta["eot_id"]``, so the stream of a split is
``doc0 EOT doc1 EOT ...`` cut into shards of at most ``shard_tokens`` tokens (a shard boundary
may fall inside a document; the reader reads across it). ``meta.json`` is written last, so a
folder without it is an unfinished write. Every shard is written under a temporary name and renamed
when complete, so a writer killed half way never leaves a half shard under a shard's name.

The pipeline's workers write the shards themselves (:func:`write_shard`, one call per shard) and
return only their entries; the driver writes ``tokenizer.json`` and ``meta.json``
(:func:`finish_folder`). :func:`verify_shards` checks every hash once (on Dask workers when given
a client), so training ranks can open the folder with ``verify=False``.

Encrypted at rest (``encryption=``, a :class:`labkit.core.crypto.Encryption`): the shards and
tokenizer.json are AES-256-GCM files (``labkit.core.crypto``); meta.json stays readable and records
the key id. ``bytes`` in meta.json counts the ids' bytes, ``sha256`` hashes the file as stored (so
``verify_shards`` needs no key), and a reader decrypts only the chunks it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from ..core.crypto import (Encryption, EncryptedReader, EncryptedWriter, HashingWriter, IntegrityError,
                           open_read, open_write, plaintext_size)
from .sources import stdlib_root
from .tokenizer import eot_id as _eot, train_bpe

FORMAT_VERSION = 1
META = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
REBUILD = "rebuild the folder: labkit.data.preprocess(sources, out_dir) or labkit.data.make_tiny_shards(out_dir)"


class ShardError(RuntimeError):
    """A shard folder is missing, corrupt or truncated; the message names the file and the fix."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size < 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def token_counts(ids: np.ndarray | Sequence[int], vocab_size: int) -> np.ndarray:
    """How often each token id occurs: an int64 array of length ``vocab_size`` (for Zipf plots)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}; "
                         "pass the tokenizer's vocab_size")
    return np.bincount(ids, minlength=vocab_size)


def rank_frequency(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank, frequency) from token counts: most frequent first, ranks from 1, zero counts left out."""
    counts = np.asarray(counts)
    freq = np.sort(counts[counts > 0])[::-1]
    return np.arange(1, freq.size + 1), freq


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train_00000.bin``."""
    return f"{split}_{index:05d}.bin"


def _temp_name(name: str) -> str:
    """A hidden, unique name to write ``name`` under before it is renamed into place."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


def clear_folder(out_dir: str | Path) -> None:
    """Remove an earlier run's output that would mix with a new one: only files this format owns
    (the shards an old meta.json lists, train_/val_NNNNN.bin, unfinished temporary shards, meta.json)."""
    out_dir = Path(out_dir)
    old = out_dir / META
    stale = set(out_dir.glob("train_[0-9][0-9][0-9][0-9][0-9].bin"))
    stale |= set(out_dir.glob("val_[0-9][0-9][0-9][0-9][0-9].bin"))
    stale |= set(out_dir.glob(".train_[0-9][0-9][0-9][0-9][0-9].bin.*.tmp"))
    stale |= set(out_dir.glob(".val_[0-9][0-9][0-9][0-9][0-9].bin.*.tmp"))
    try:
        listed = json.loads(old.read_text()).get("splits", {}) if old.is_file() else {}
        stale |= {out_dir / Path(e["file"]).name for es in listed.values() for e in es}
    except (ValueError, OSError, KeyError, TypeError, AttributeError):
        pass
    for p in sorted(stale) + [old]:
        p.unlink(missing_ok=True)


def _check_ids(arr: np.ndarray, vocab_size: int) -> None:
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got {arr.min()}..{arr.max()}")


def _shard_file(path: Path, encryption: Encryption | None) -> tuple[Any, Any]:
    """A file to write a shard into (sealed when ``encryption`` is given) and the SHA-256 of what lands on disk."""
    raw = HashingWriter(open(path, "wb"))
    return (raw if encryption is None else EncryptedWriter(raw, encryption)), raw.sha256


def save_tokenizer(tokenizer: Tokenizer, path: str | Path, encryption: Encryption | None = None) -> Path:
    """Write ``tokenizer.json`` (encrypted with ``encryption``; it holds what BPE learned from the data)."""
    path = Path(path)
    if encryption is None:
        tokenizer.save(str(path))
        return path
    tmp = path.with_name(_temp_name(path.name))
    try:
        with open_write(tmp, encryption) as f:
            f.write(tokenizer.to_str(pretty=True).encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_shard(out_dir: str | Path, name: str, pieces: Sequence[np.ndarray], vocab_size: int,
                encryption: Encryption | None = None) -> dict:
    """Write one shard from consecutive pieces of ids, atomically (temp name, then rename), sealed with
    ``encryption`` when given; returns its meta.json entry ``{"file", "tokens", "bytes", "sha256"}``.
    Runs on the worker that holds the ids."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ShardError(f"{out_dir} does not exist on this worker: the output folder must be on a filesystem "
                         "the workers share with the driver (e.g. under $HOME or project storage, not /tmp)")
    dtype = dtype_for_vocab(vocab_size)
    tmp = out_dir / _temp_name(name)
    tokens, nbytes = 0, 0
    try:
        f, h = _shard_file(tmp, encryption)
        with f:
            for piece in pieces:
                arr = np.asarray(piece)
                _check_ids(arr, vocab_size)
                data = arr.astype(dtype, copy=False).ravel().tobytes()
                f.write(data)
                tokens += int(arr.size)
                nbytes += len(data)
        os.replace(tmp, out_dir / name)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": name, "tokens": tokens, "bytes": nbytes, "sha256": h.hexdigest()}


class ShardWriter:
    """Append token ids per split; rolls to a new shard every ``shard_tokens`` tokens.

    Output depends only on the sequence of ``write`` calls, so a deterministic caller gets
    byte-identical shards.
    """

    def __init__(self, out_dir: str | Path, vocab_size: int, *, shard_tokens: int = 1 << 24,
                 encryption: Encryption | None = None):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, not {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.shard_tokens = int(shard_tokens)
        self.encryption = encryption
        self.shards: dict[str, list[dict]] = {}
        self._open: dict[str, tuple[Any, Any, dict]] = {}  # split -> (file, hasher, entry)
        clear_folder(self.out_dir)

    def write(self, split: str, tokens: np.ndarray | Sequence[int]) -> None:
        """Append raw ids (already containing EOT separators) to ``split``."""
        arr = np.asarray(tokens)
        _check_ids(arr, self.vocab_size)
        arr = arr.astype(self.dtype, copy=False).ravel()
        while arr.size:
            f, h, entry = self._current(split)
            room = self.shard_tokens - entry["tokens"]
            part, arr = arr[:room], arr[room:]
            data = part.tobytes()
            f.write(data)
            entry["tokens"] += int(part.size)
            entry["bytes"] += len(data)
            if entry["tokens"] == self.shard_tokens:
                self._close(split)

    def write_documents(self, split: str, docs: Iterable[Sequence[int]], eot_id: int) -> None:
        """Append each document followed by ``eot_id``."""
        for doc in docs:
            self.write(split, np.append(np.asarray(doc, dtype=np.int64), eot_id))

    def _current(self, split: str):
        if split not in self._open:
            name = shard_name(split, len(self.shards.setdefault(split, [])))
            entry = {"file": name, "tokens": 0, "bytes": 0, "sha256": "", "tmp": self.out_dir / _temp_name(name)}
            self._open[split] = (*_shard_file(entry["tmp"], self.encryption), entry)
        return self._open[split]

    def _close(self, split: str) -> None:
        f, h, entry = self._open.pop(split)
        f.close()
        os.replace(entry.pop("tmp"), self.out_dir / entry["file"])  # complete: now under its own name
        entry["sha256"] = h.hexdigest()
        self.shards[split].append(entry)

    def close(self) -> dict[str, list[dict]]:
        """Finish open shards; returns ``{split: [shard entries]}``."""
        for split in list(self._open):
            self._close(split)
        return self.shards


def write_meta(out_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``meta.json`` atomically (tmp file + rename), sorted keys for byte-stable output."""
    out_dir = Path(out_dir)
    tmp = out_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / META)
    return out_dir / META


def write_shards(
    out_dir: str | Path,
    tokenizer,
    splits: Mapping[str, Iterable[np.ndarray | Sequence[int]]],
    *,
    eot_id: int,
    shard_tokens: int = 1 << 24,
    documents: bool = False,
    counts: Mapping[str, Any] | None = None,
    sources: Sequence[Mapping[str, Any]] = (),
    config: Mapping[str, Any] | None = None,
    encryption: Encryption | None = None,
) -> dict:
    """Write a whole shard folder: tokenizer.json, shards per split, then meta.json; returns meta.

    ``splits`` maps a split name to chunks of ids; with ``documents=True`` each chunk is one
    document and gets ``eot_id`` appended, else chunks are raw ids that already hold EOTs.
    With ``encryption`` the shards and tokenizer.json are written encrypted.
    """
    out_dir = Path(out_dir)
    vocab_size = tokenizer.get_vocab_size()
    writer = ShardWriter(out_dir, vocab_size, shard_tokens=shard_tokens, encryption=encryption)
    for split, chunks in splits.items():
        if documents:
            writer.write_documents(split, chunks, eot_id)
        else:
            for chunk in chunks:
                writer.write(split, chunk)
    save_tokenizer(tokenizer, out_dir / TOKENIZER_FILE, encryption)
    return finish(out_dir, writer, vocab_size=vocab_size, eot_id=eot_id, counts=counts, sources=sources, config=config)


def finish(
    out_dir: str | Path,
    writer: ShardWriter,
    *,
    vocab_size: int,
    eot_id: int,
    counts: Mapping[str, Any] | None = None,
    sources: Sequence[Mapping[str, Any]] = (),
    config: Mapping[str, Any] | None = None,
) -> dict:
    """Close ``writer`` and write meta.json (tokenizer.json must already be in ``out_dir``)."""
    return finish_folder(out_dir, writer.close(), vocab_size=vocab_size, eot_id=eot_id,
                         shard_tokens=writer.shard_tokens, counts=counts, sources=sources, config=config,
                         encryption=writer.encryption)


def finish_folder(
    out_dir: str | Path,
    shards: Mapping[str, list[dict]],
    *,
    vocab_size: int,
    eot_id: int,
    shard_tokens: int,
    counts: Mapping[str, Any] | None = None,
    sources: Sequence[Mapping[str, Any]] = (),
    config: Mapping[str, Any] | None = None,
    encryption: Encryption | None = None,
) -> dict:
    """Write meta.json for shards already in ``out_dir`` (``{split: [entries]}`` in stream order);
    tokenizer.json must be there too. ``encryption``: the key the files were sealed with (its id is
    recorded). Returns the meta."""
    shards = {split: list(entries) for split, entries in shards.items()}
    for split in SPLITS:
        shards.setdefault(split, [])
    counts = {k: dict(v) for k, v in (counts or {}).items()}
    for split, entries in shards.items():
        c = counts.setdefault(split, {})
        c["tokens"] = sum(e["tokens"] for e in entries)
        c.setdefault("docs", None)
        c.setdefault("bytes", None)
    meta = {
        "format": "labkit-token-shards",
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": sha256_file(Path(out_dir) / TOKENIZER_FILE),
        "vocab_size": int(vocab_size),
        "dtype": dtype_for_vocab(vocab_size).name,
        "byteorder": "little",
        "eot_id": int(eot_id),
        "shard_tokens": int(shard_tokens),
        "splits": shards,
        "counts": counts,
        "sources": list(sources),
        "config": dict(config or {}),
    }
    if encryption is not None:
        meta["encryption"] = encryption.describe()
    write_meta(out_dir, meta)
    return meta


class _SealedTokens:
    """The ids of an encrypted shard, sliced like an array: each slice decrypts only the chunks it covers."""

    def __init__(self, reader: EncryptedReader, dtype: np.dtype):
        self.reader, self.dtype = reader, dtype
        self._lock = threading.Lock()  # one file position: a seek and its read go together

    def __getitem__(self, part: slice) -> np.ndarray:
        size = self.dtype.itemsize
        try:
            with self._lock:
                self.reader.seek(part.start * size)
                data = self.reader.read((part.stop - part.start) * size)
        except IntegrityError as exc:
            raise ShardError(f"{exc}; {REBUILD}") from None
        return np.frombuffer(data, dtype=self.dtype)


@dataclass
class _Shard:
    path: Path
    tokens: int
    data: np.ndarray | _SealedTokens


def check_hash(path: str | Path, sha256: str) -> None:
    """Hash one shard and compare with its meta.json entry; a mismatch is a ShardError naming the file."""
    if sha256_file(path) != sha256:
        raise ShardError(
            f"shard {path} is corrupt: its sha256 does not match meta.json (the bytes changed after "
            f"writing); {REBUILD}"
        )


def read_meta(out_dir: str | Path) -> tuple[dict, np.dtype]:
    """A finished folder's meta.json and the dtype of its ids, checked; a ShardError says what is wrong."""
    meta_path = Path(out_dir) / META
    if not meta_path.is_file():
        raise ShardError(f"{meta_path} not found: {out_dir} is not a finished shard folder; {REBUILD}")
    try:
        meta: dict = json.loads(meta_path.read_text())
    except (ValueError, OSError) as exc:
        raise ShardError(f"{meta_path} is unreadable ({exc}); {REBUILD}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, this labkit reads "
            f"{FORMAT_VERSION}; {REBUILD}"
        )
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if dtype != dtype_for_vocab(int(meta["vocab_size"])):
        raise ShardError(f"{meta_path}: dtype {meta['dtype']} does not fit vocab_size {meta['vocab_size']}; {REBUILD}")
    return meta, dtype


def check_size(path: Path, entry: Mapping[str, Any], dtype: np.dtype) -> int:
    """The bytes of ids in a shard (of the plaintext, for an encrypted one; no key needed), after
    checking the file is there with the size meta.json records; a ShardError names it otherwise."""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing (listed in meta.json); {REBUILD}")
    try:
        size = plaintext_size(path)
    except IntegrityError as exc:  # an encrypted file cut short: no whole last chunk
        raise ShardError(f"shard {exc}; {REBUILD}") from None
    expected = int(entry["tokens"]) * dtype.itemsize
    if size != expected or size != int(entry["bytes"]):
        what = "truncated" if size < expected else "longer than recorded"
        raise ShardError(
            f"shard {path} is {what}: {size} bytes on disk, meta.json says {entry['bytes']} "
            f"({entry['tokens']} tokens x {dtype.itemsize} bytes); {REBUILD}"
        )
    return size


def verify_shards(out_dir: str | Path, client=None) -> int:
    """Check every shard of every split against meta.json once (sizes and sha256); returns how many.

    With a ``dask.distributed.Client`` the files are hashed on its workers (which must see the
    folder), each file once, so the driver reads no shard bytes. Call it once per training run and
    open the readers with ``verify=False``; a bad shard raises :class:`ShardError` naming the file."""
    meta, dtype = read_meta(out_dir)
    splits = meta.get("splits", {})
    for entries in splits.values():  # missing or truncated files: cheap, checked first (no key needed)
        for e in entries:
            check_size(Path(out_dir) / e["file"], e, dtype)
    paths = [(str(Path(out_dir) / e["file"]), e["sha256"]) for entries in splits.values() for e in entries]
    if client is None:
        for path, sha in paths:
            check_hash(path, sha)
    else:
        futures = [client.submit(check_hash, path, sha, pure=False) for path, sha in paths]
        for f in futures:
            f.result()  # re-raises the worker's ShardError
    return len(paths)


class ShardReader:
    """Memory-maps the shards of one split, checks them, and draws random training blocks.

    ``verify=True`` hashes every shard of the split on open; ``False`` checks only that each file is
    there with the recorded size (for ranks of a run whose shards :func:`verify_shards` checked).
    ``encryption``: the key of encrypted shards (plaintext ones read as before with or without it);
    an encrypted shard without it, or with another key, is an ``EncryptionKeyError`` naming the file."""

    def __init__(self, out_dir: str | Path, split: str = "train", verify: bool = True,
                 encryption: Encryption | None = None):
        self.out_dir = Path(out_dir)
        self.split = split
        self.encryption = encryption
        self.meta, self.dtype = read_meta(self.out_dir)
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise ShardError(f"{self.out_dir / META}: no split {split!r}; valid splits: {', '.join(sorted(splits))}")
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.eot_id: int = int(self.meta["eot_id"])
        self._shards: list[_Shard] = []
        for entry in splits[split]:
            path = self.out_dir / entry["file"]
            self._shards.append(_Shard(path, int(entry["tokens"]), self._open(path, entry, verify)))
        self.offsets = np.cumsum([0] + [s.tokens for s in self._shards])
        self.num_tokens: int = int(self.offsets[-1])

    def _open(self, path: Path, entry: Mapping[str, Any], verify: bool) -> np.ndarray | _SealedTokens:
        size = check_size(path, entry, self.dtype)
        if verify:
            check_hash(path, entry["sha256"])
        if size != path.stat().st_size:  # encrypted: the ids are read chunk by chunk, decrypted
            f = open(path, "rb")
            try:
                return _SealedTokens(EncryptedReader(f, self.encryption, f"shard {path}"), self.dtype)
            except BaseException:
                f.close()
                raise
        if size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return self.num_tokens

    def __reduce__(self) -> tuple:
        """Pickled (for a Dask task, say) as where to read, not as the tokens: the folder, the split and
        the key's source. Unpickled, it opens the same files again, their sizes checked but not hashed
        again; an encrypted shard's open file cannot travel, its path can."""
        return (type(self), (str(self.out_dir), self.split, False, self.encryption))

    def __repr__(self) -> str:
        return (f"ShardReader({str(self.out_dir)!r}, split={self.split!r}: {self.num_tokens:,} tokens in "
                f"{len(self._shards)} shards, vocab {self.vocab_size}, {self.dtype.name})")

    @property
    def files(self) -> list[Path]:
        """The shard files of this split, in stream order."""
        return [s.path for s in self._shards]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start+length)`` of the split's stream, across shard boundaries (int64)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens}): ask for "
                             "start >= 0 and start + length <= reader.num_tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            sh = self._shards[i]
            lo = pos - int(self.offsets[i])
            take = min(length - filled, sh.tokens - lo)
            out[filled:filled + take] = sh.data[lo:lo + take]
            filled += take
            pos += take
            i += 1
        return out

    def rank_range(self, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
        """The contiguous part ``[lo, hi)`` of the stream that ``rank`` of ``world_size`` draws from."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        lo = self.num_tokens * rank // world_size
        hi = self.num_tokens * (rank + 1) // world_size
        return lo, hi

    def get_batch(self, batch_size: int, block_size: int, generator=None, rank: int = 0, world_size: int = 1):
        """Random blocks ``(x, y)``, int64 tensors (B, T), ``y`` = ``x`` shifted by one.

        Start positions come from ``generator`` (a ``torch.Generator``; the global torch RNG when
        None); with ``world_size`` > 1 each rank draws only from its own disjoint part of the stream.
        """
        import torch  # lazy: torch (~2 s import): only training reads batches; the data pipeline writes shards without it

        lo, hi = self.rank_range(rank, world_size)
        if hi - lo < block_size + 1:
            raise ShardError(
                f"split {self.split!r} of {self.out_dir} has {hi - lo} tokens for rank {rank} of {world_size}, "
                f"need at least block_size + 1 = {block_size + 1}: use a smaller block_size, fewer ranks, "
                f"or more data (a larger scale)"
            )
        starts = torch.randint(lo, hi - block_size, (batch_size,), generator=generator)
        rows = np.stack([self.read(int(s), block_size + 1) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` these ids come from."""
        path = self.out_dir / self.meta.get("tokenizer", TOKENIZER_FILE)
        if not path.is_file():
            raise ShardError(f"{path} is missing; {REBUILD}")
        try:
            with open_read(path, self.encryption) as f:
                return Tokenizer.from_str(f.read().decode("utf-8"))
        except IntegrityError as exc:
            raise ShardError(f"{exc}; {REBUILD}") from None


def tiny_text(max_bytes: int = 300_000) -> str:
    """A few hundred KB of real text: some Python standard library modules, read offline."""
    root = stdlib_root()
    names = ["textwrap.py", "argparse.py", "difflib.py", "string.py", "fractions.py", "heapq.py",
             "shlex.py", "bisect.py", "calendar.py", "pprint.py", "statistics.py", "glob.py"]
    parts, total = [], 0
    for name in names:
        p = root / name
        if p.is_file() and total < max_bytes:
            t = p.read_text(encoding="utf-8", errors="replace")[: max_bytes - total]
            parts.append(t)
            total += len(t.encode("utf-8"))
    if not parts:
        raise FileNotFoundError(f"no standard library sources under {root}; pass text= to make_tiny_shards")
    return "\n\n\n".join(parts)


def make_tiny_shards(
    out_dir: str | Path,
    text: str | None = None,
    vocab_size: int = 512,
    *,
    val_every: int = 10,
    shard_tokens: int = 1 << 15,
    encryption: Encryption | None = None,
) -> ShardReader:
    """Train a small BPE on ``text`` (default: stdlib sources) and write shards in seconds
    (encrypted with ``encryption`` when given).

    Documents are the text's paragraphs (split at blank lines); every ``val_every``-th goes to
    ``val``. For tests and notebooks; the real pipeline is ``labkit.data.preprocess``.
    """
    given = text is not None
    text = text if given else tiny_text()
    if not text.strip():
        raise ValueError("make_tiny_shards needs non-empty text")
    docs = [d for d in re.split(r"\n\s*\n", text) if d.strip()]
    if len(docs) < 2:  # one paragraph: cut it so both splits get something
        cut = max(1, len(text) * 9 // 10)
        docs = [text[:cut], text[cut:]] if text[cut:].strip() else [text, text]
    val = [d for i, d in enumerate(docs) if i % val_every == val_every - 1] or [docs[-1]]
    train = [d for i, d in enumerate(docs) if i % val_every != val_every - 1] or [docs[0]]
    tok = train_bpe(docs, vocab_size)
    eot = _eot(tok)
    enc = {name: [e.ids for e in tok.encode_batch(split)] for name, split in (("train", train), ("val", val))}
    counts = {name: {"docs": len(split), "bytes": sum(len(d.encode("utf-8")) for d in split)}
              for name, split in (("train", train), ("val", val))}
    write_shards(
        out_dir, tok, enc, eot_id=eot, shard_tokens=shard_tokens, documents=True, counts=counts,
        sources=[{"source": "text" if given else "stdlib-tiny",
                  "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}],
        config={"maker": "make_tiny_shards", "vocab_size": vocab_size, "val_every": val_every},
        encryption=encryption,
    )
    return ShardReader(out_dir, "train", encryption=encryption)
