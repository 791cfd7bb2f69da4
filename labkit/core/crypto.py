"""Encryption at rest: token shards, checkpoints and exported models written as AES-256-GCM files.

An encrypted file is a 54-byte header, then the plaintext in chunks, each sealed on its own::

    b"LABKITENC1" | key id (16 ASCII hex digits) | chunk size (uint32, little-endian) | salt (16 random bytes)
    chunk 0 ciphertext (chunk size bytes) + 16-byte GCM tag
    ...
    last chunk: the rest of the plaintext (0 to chunk size - 1 bytes) + tag

Every file is sealed with its own key, derived by HKDF-SHA256 from the master key and the file's
random salt, so chunk ``i`` can take ``i`` as its nonce without a nonce ever repeating under a key.
Each chunk's associated data is the header, its index and whether it is the last one: a chunk
changed, swapped, dropped, or the file cut short at a chunk boundary fails its tag. Memory stays
bounded: a reader decrypts only the chunks it reads (random access), a writer holds one chunk.

The master key is 32 random bytes, base64 in a key file of mode 0600 (``labkit key new PATH``) or
in an environment variable (``LABKIT_DATA_KEY``). Its id, 16 hex digits of SHA-256 over a label and
the key, names it in headers and errors without revealing it. :class:`Encryption` says where the
key comes from and is what writers and readers take (``encryption=``); ``None`` writes plaintext,
and plaintext files read as before whether or not a key is given.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"LABKITENC1"
HEADER = struct.Struct("<10s16sI16s")  # magic, key id, chunk size, salt
TAG = 16
CHUNK = 1 << 16
KEY_BYTES = 32
KEY_FILE_ENV = "LABKIT_KEY_FILE"
KEY_ENV = "LABKIT_DATA_KEY"
HOW_TO_GIVE = (f"pass encryption=Encryption.from_file(PATH) in Python, --key-file PATH on the command line, or set "
               f"{KEY_FILE_ENV}=PATH (a key file of mode 0600) or {KEY_ENV} (the base64 key) for the labkit commands")


class EncryptionKeyError(RuntimeError):
    """No key, the wrong key, or an unsafe or unreadable key file; the message names the file and the fix.

    Not a ShardError or CheckpointError on purpose: a run that lacks the key must stop, not skip
    its encrypted checkpoints as broken ones and start again from scratch."""


class IntegrityError(ValueError):
    """An encrypted file whose bytes changed or that was cut short (a GCM tag failed); callers
    raise their own corruption error (ShardError, CheckpointError) from it."""


def key_id(key: bytes) -> str:
    """The 16-hex-digit id of a key: names it in headers and errors, reveals nothing of it."""
    return hashlib.sha256(b"labkit at-rest key id\0" + key).hexdigest()[:16]


def _decode_key(text: str | bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise EncryptionKeyError(f"{where} does not hold a key (base64 of {KEY_BYTES} bytes): make one with "
                                 "`labkit key new PATH`")
    return key


def read_key_file(path: str | os.PathLike) -> bytes:
    """The key in a key file, after checking that only its owner can read it (mode 0600 or stricter)."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError as exc:
        raise EncryptionKeyError(f"key file {path} cannot be read on {socket.gethostname()} ({exc.strerror}): "
                                 "give a path every process can read (shared storage, e.g. under $HOME), or make "
                                 "one with `labkit key new PATH`") from None
    if st.st_mode & 0o077:
        raise EncryptionKeyError(f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may read it, "
                                 f"so it is refused; run `chmod 600 {path}` (and make a new key if others read it)")
    return _decode_key(path.read_bytes(), f"key file {path}")


def new_key_file(path: str | os.PathLike) -> "Encryption":
    """Make a new random key in a new file of mode 0600 (never over an existing one); returns its Encryption."""
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise EncryptionKeyError(f"{path} exists already: keep it (what it encrypted needs it) or choose another "
                                 "path") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
    return Encryption.from_file(path)


@dataclass(frozen=True)
class Encryption:
    """Where the key comes from, one of: a key file of mode 0600 (``key_file``; on a cluster, a path
    on shared storage, so only the path travels to the workers), an environment variable (``env``,
    read in each process that uses it), or the key itself (``key``, base64; it travels with every
    task that gets this object). ``key_id`` is computed once, here, and checked wherever the key is read."""

    key_file: str | None = None
    env: str | None = None
    key: str | None = field(default=None, repr=False)
    chunk: int = CHUNK
    key_id: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if sum(s is not None for s in (self.key_file, self.env, self.key)) != 1:
            raise ValueError("Encryption needs exactly one of key_file=, env= or key=: e.g. "
                             "Encryption.from_file(PATH) with a file from `labkit key new PATH`")
        if not 1 <= self.chunk < 1 << 31:
            raise ValueError(f"chunk={self.chunk}: choose 1 <= chunk < 2**31 bytes (default {CHUNK})")
        if self.key_file is not None:
            object.__setattr__(self, "key_file", str(Path(self.key_file).expanduser().resolve()))
        object.__setattr__(self, "key_id", key_id(self.secret()))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Encryption":
        """The key in a key file (mode 0600; ``labkit key new PATH`` makes one)."""
        return cls(key_file=str(path))

    @classmethod
    def from_env(cls, name: str = KEY_ENV) -> "Encryption":
        """The key in environment variable ``name`` (base64 of 32 bytes), read where it is used."""
        return cls(env=name)

    @classmethod
    def from_key(cls, key: bytes) -> "Encryption":
        """The key itself (32 bytes), e.g. for a test; it is pickled into every task that takes it."""
        return cls(key=base64.b64encode(key).decode())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Encryption | None":
        """What the labkit commands use: ``$LABKIT_KEY_FILE`` (a key file), else ``$LABKIT_DATA_KEY``
        (the key), else None (plaintext)."""
        environ = os.environ if environ is None else environ
        if environ.get(KEY_FILE_ENV):
            return cls.from_file(environ[KEY_FILE_ENV])
        if environ.get(KEY_ENV):
            return cls.from_env(KEY_ENV)
        return None

    @property
    def source(self) -> str:
        """Where the key comes from, in words (never the key)."""
        return (f"key file {self.key_file}" if self.key_file is not None else
                f"${self.env}" if self.env is not None else "a key given in memory")

    def secret(self) -> bytes:
        """The 32-byte key, read now from its source; an error when it is not the key this object was made with."""
        if self.key_file is not None:
            raw = read_key_file(self.key_file)
        elif self.env is not None:
            text = os.environ.get(self.env)
            if not text:
                raise EncryptionKeyError(f"${self.env} is not set on {socket.gethostname()}: set it in every process "
                                         "that reads or writes (workers too), or use a key file on shared storage "
                                         "(Encryption.from_file)")
            raw = _decode_key(text, f"${self.env}")
        else:
            raw = _decode_key(self.key or "", "the key given to Encryption")
        if self.key_id and key_id(raw) != self.key_id:
            raise EncryptionKeyError(f"{self.source} on {socket.gethostname()} holds key {key_id(raw)}, not {self.key_id} "
                                     "that this run was given: every process must read the same key (one key file "
                                     "on shared storage)")
        return raw

    def describe(self) -> dict[str, Any]:
        """What ``meta.json`` records of the encryption: cipher, key id, chunk size (no key material)."""
        return {"cipher": "AES-256-GCM", "key_id": self.key_id, "chunk_bytes": self.chunk}


def _file_cipher(key: bytes, salt: bytes) -> AESGCM:
    """The file's own AES-256-GCM key: HKDF-SHA256 of the master key and the file's salt."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=b"labkit at-rest v1")
    return AESGCM(hkdf.derive(key))


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack("<QB", index, last)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


class _Over(io.RawIOBase):
    """A write-only stream over ``raw``: ``close`` runs ``_finish`` once, then closes ``raw`` (unless
    ``close_raw=False``)."""

    def __init__(self, raw: BinaryIO, close_raw: bool = True):
        super().__init__()
        self._raw, self._close_raw = raw, close_raw

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def _finish(self) -> None:
        """What to write last (nothing here)."""

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._finish()
            self._raw.flush()
            if self._close_raw:
                self._raw.close()
        finally:
            super().close()


class EncryptedWriter(_Over):
    """A write-only stream that seals what it is given into ``raw`` chunk by chunk; ``close`` seals the
    last chunk (``raw`` is closed too unless ``close_raw=False``). ``tell`` counts plaintext bytes."""

    def __init__(self, raw: BinaryIO, encryption: Encryption, *, close_raw: bool = True):
        super().__init__(raw, close_raw)
        self._chunk = encryption.chunk
        salt = os.urandom(16)
        self._header = HEADER.pack(MAGIC, encryption.key_id.encode(), encryption.chunk, salt)
        self._aead = _file_cipher(encryption.secret(), salt)
        self._buf = bytearray()
        self._index = self._pos = 0
        raw.write(self._header)

    def _seal(self, data: Any, last: bool) -> None:
        self._raw.write(self._aead.encrypt(_nonce(self._index), bytes(data), _aad(self._header, self._index, last)))
        self._index += 1

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n, start, size = len(mv), 0, self._chunk
        if self._buf:
            start = min(size - len(self._buf), n)
            self._buf += mv[:start]
            if len(self._buf) == size:
                self._seal(self._buf, last=False)
                self._buf.clear()
        while n - start >= size:
            self._seal(mv[start:start + size], last=False)
            start += size
        self._buf += mv[start:]
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def _finish(self) -> None:
        self._seal(self._buf, last=True)


def _parse_header(head: bytes, name: str) -> tuple[str, int, bytes]:
    if len(head) < HEADER.size:
        raise IntegrityError(f"{name} is truncated (its encryption header is cut short)")
    _, kid, chunk, salt = HEADER.unpack(head[:HEADER.size])
    if not chunk:
        raise IntegrityError(f"{name} is corrupt (its encryption header says chunks of 0 bytes)")
    return kid.decode("ascii", "replace"), chunk, salt


def _length(size: int, chunk: int, name: str) -> tuple[int, int]:
    """(plaintext bytes, chunks) of an encrypted file of ``size`` bytes; IntegrityError if no file has that size."""
    full, rem = divmod(size - HEADER.size, chunk + TAG)
    if size < HEADER.size or rem < TAG:
        raise IntegrityError(f"{name} is truncated ({size} bytes do not end in a whole last chunk)")
    return full * chunk + rem - TAG, full + 1


def check_key(kid: str, encryption: Encryption | None, name: str) -> None:
    """The error for reading a file sealed with key ``kid`` given ``encryption`` (None when it fits)."""
    if encryption is None:
        raise EncryptionKeyError(f"{name} is encrypted (AES-256-GCM, key id {kid}) and no key was given: {HOW_TO_GIVE}")
    if encryption.key_id != kid:
        raise EncryptionKeyError(f"{name} was encrypted with key {kid}, but the key given ({encryption.source}) is "
                                 f"{encryption.key_id}: give the key it was written with")


class EncryptedReader(io.RawIOBase):
    """A read-only, seekable view of the plaintext of an encrypted file: each read decrypts (and checks)
    only the chunks it touches, the last one kept. A failed check raises :class:`IntegrityError`."""

    def __init__(self, raw: BinaryIO, encryption: Encryption | None, name: str = ""):
        super().__init__()
        self._raw, self.name = raw, name or getattr(raw, "name", "<stream>")
        self._header = raw.read(HEADER.size)
        kid, self._chunk, salt = _parse_header(self._header, self.name)
        check_key(kid, encryption, self.name)
        self._aead = _file_cipher(encryption.secret(), salt)
        self.length, self._chunks = _length(raw.seek(0, io.SEEK_END), self._chunk, self.name)
        self._pos = 0
        self._cached: tuple[int, bytes] = (-1, b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _plain(self, i: int) -> bytes:
        if self._cached[0] != i:
            self._raw.seek(HEADER.size + i * (self._chunk + TAG))
            sealed = self._raw.read(self._chunk + TAG)
            last = i == self._chunks - 1
            try:
                plain = self._aead.decrypt(_nonce(i), sealed, _aad(self._header, i, last))
            except InvalidTag:
                raise IntegrityError(f"{self.name} is corrupt or was altered: chunk {i} of {self._chunks} fails its "
                                     "AES-GCM check") from None
            self._cached = (i, plain)
        return self._cached[1]

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), self.length - self._pos))
        done = 0
        while done < n:
            i, off = divmod(self._pos, self._chunk)
            plain = self._plain(i)
            take = min(n - done, len(plain) - off)
            out[done:done + take] = plain[off:off + take]
            done += take
            self._pos += take
        return done

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def header_key_id(path: str | os.PathLike) -> str | None:
    """The key id an encrypted file names in its header; None for a plaintext file."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    return _parse_header(head, str(path))[0] if head.startswith(MAGIC) else None


def is_encrypted(path: str | os.PathLike) -> bool:
    """Whether a file starts with the encryption header."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def plaintext_size(path: str | os.PathLike) -> int:
    """The size of a file's content: its size on disk, or for an encrypted file the plaintext's
    (no key needed); IntegrityError when an encrypted file's size cannot be a whole file."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        size = f.seek(0, io.SEEK_END)
    if not head.startswith(MAGIC):
        return size
    return _length(size, _parse_header(head, str(path))[1], str(path))[0]


def open_read(path: str | os.PathLike, encryption: Encryption | None = None) -> BinaryIO:
    """A binary file to read: the file itself when it is plaintext, else a buffered, seekable view of
    its plaintext (EncryptionKeyError now when the key is missing or another)."""
    f = open(path, "rb")
    try:
        if f.read(len(MAGIC)) != MAGIC:
            f.seek(0)
            return f
        f.seek(0)
        reader = EncryptedReader(f, encryption, str(path))
    except BaseException:
        f.close()
        raise
    return io.BufferedReader(reader, buffer_size=reader._chunk)


def open_write(path: str | os.PathLike, encryption: Encryption | None = None) -> BinaryIO:
    """A binary file to write: plaintext when ``encryption`` is None, else sealed as it is written."""
    f = open(path, "wb")
    if encryption is None:
        return f
    try:
        return EncryptedWriter(f, encryption)  # type: ignore[return-value]
    except BaseException:
        f.close()
        raise


def read_bytes(path: str | os.PathLike, encryption: Encryption | None = None) -> bytes:
    """The whole content of a file, decrypted and checked when it is encrypted."""
    with open_read(path, encryption) as f:
        return f.read()


class HashingWriter(_Over):
    """Passes writes to ``raw`` and hashes them: the SHA-256 of the bytes that land on disk."""

    def __init__(self, raw: BinaryIO):
        super().__init__(raw)
        self.sha256 = hashlib.sha256()

    def write(self, b: Any) -> int:
        self.sha256.update(b)
        return self._raw.write(b)


# ----------------------------------------------------------------------------- labkit key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``labkit key new PATH`` | ``labkit key id PATH``."""
    parser.add_argument("action", choices=["new", "id"], help="new: make a key file (mode 0600); id: print a key's id")
    parser.add_argument("path", help="the key file")


def cli(args: argparse.Namespace) -> int:
    """Make a key file or print a key file's id; non-zero exit with the reason when it cannot."""
    try:
        enc = new_key_file(args.path) if args.action == "new" else Encryption.from_file(args.path)
    except EncryptionKeyError as exc:
        print(f"labkit key: {exc}")
        return 2
    if args.action == "new":
        print(f"made key {enc.key_id} in {enc.key_file} (mode 0600); keep a copy somewhere safe: what it "
              "encrypts cannot be read without it")
    else:
        print(enc.key_id)
    return 0
