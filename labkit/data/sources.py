"""Where text comes from: the stdlib corpus, files, directories, JSONL, HF datasets.

Listing (on the driver) turns source specs into a sorted list of readable regular files;
reading (on a worker) turns one file into documents. Neither ever raises for bad input: a
dangling symlink, a loop, a FIFO, an unreadable, empty, binary or oversized file is skipped,
and invalid UTF-8 or stray NUL bytes are repaired, each recorded as an :class:`Issue`.

The default corpus, ``"stdlib"``, is the Python standard library's own ``*.py`` files, found
with ``sysconfig.get_paths()["stdlib"]``; ``site-packages``/``dist-packages`` (third-party
code) and ``__pycache__`` are left out, and so are the test suites (``test``, ``tests``,
``idle_test`` folders: they hold deliberately malformed files and would dominate the corpus)
unless ``include_tests=True``. ``"stdlib-docs"`` is the same files' docstrings only.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import stat
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
TEST_DIRS = ("test", "tests", "idle_test")
SOURCE_KINDS = "'stdlib', 'stdlib-docs', a file (.txt, .py, .md, ... or .jsonl), a directory, 'hf:NAME[:SPLIT]'"


class SourceError(ValueError):
    """A source spec cannot be used at all (typo, missing package, offline); says what to do."""


@dataclass(frozen=True)
class Issue:
    """One bad input: what it was, why, and whether it was ``skipped`` or ``repaired``."""

    path: str
    reason: str
    action: str = "skipped"


@dataclass(frozen=True)
class StdlibSource:
    """The Python standard library's sources (or their docstrings) as a corpus."""

    docstrings: bool = False
    include_tests: bool = False
    max_bytes: int | None = None  # a deterministic sample of files up to this many bytes

    @property
    def spec(self) -> str:
        return ("stdlib-docs" if self.docstrings else "stdlib") + ("+tests" if self.include_tests else "") + (
            f"[{self.max_bytes}]" if self.max_bytes else "")


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset; needs ``datasets`` and the network (or a pre-staged cache)."""

    name: str
    split: str = "train"
    config: str | None = None
    text_field: str = "text"

    @property
    def spec(self) -> str:
        return f"hf:{self.name}:{self.split}"


@dataclass(frozen=True)
class FileItem:
    """One file to read; ``kind`` is ``text``, ``jsonl`` or ``pydoc`` (docstrings of Python code)."""

    path: str
    kind: str
    source: str
    size: int


@dataclass
class Listing:
    """The files to read, in a fixed order, and what was skipped while listing."""

    files: list[FileItem] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)


def stdlib_root() -> Path:
    """The standard library folder of this Python (``sysconfig.get_paths()['stdlib']``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def parse_source(spec: Any) -> Any:
    """Turn a spec (string, Path, or a source object) into a source object or a Path."""
    if isinstance(spec, (StdlibSource, HFSource)):
        return spec
    if isinstance(spec, os.PathLike):
        return Path(spec)
    if not isinstance(spec, str) or not spec:
        raise SourceError(f"cannot use {spec!r} as a source; valid sources: {SOURCE_KINDS}")
    if spec in ("stdlib", "stdlib-docs"):
        return StdlibSource(docstrings=spec == "stdlib-docs")
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        return HFSource(parts[0], parts[1] if len(parts) > 1 and parts[1] else "train")
    return Path(spec)


def _kind_for(path: str) -> str:
    return "jsonl" if path.endswith((".jsonl", ".ndjson")) else "text"


def list_sources(sources: Sequence[Any] | Any, *, stage_dir: str | Path | None = None) -> Listing:
    """List every file of every source, sorted within each source; bad paths become issues."""
    if isinstance(sources, (str, os.PathLike, StdlibSource, HFSource)):
        sources = [sources]
    listing = Listing()
    for spec in sources:
        src = parse_source(spec)
        before = len(listing.files)
        if isinstance(src, StdlibSource):
            _list_stdlib(src, listing)
            name = src.spec
        elif isinstance(src, HFSource):
            path = stage_hf(src, stage_dir)
            listing.files.append(FileItem(str(path), "jsonl", src.spec, path.stat().st_size))
            name = src.spec
        else:
            name = str(src)
            if not os.path.lexists(src):
                raise SourceError(f"source {name!r} does not exist; valid sources: {SOURCE_KINDS}")
            _walk(src, name, listing, visited=set())
        listing.sources.append({"source": name, "files": len(listing.files) - before})
    return listing


def _list_stdlib(src: StdlibSource, listing: Listing) -> None:
    root = stdlib_root()
    found: list[tuple[str, int]] = []
    for d, dirs, files in os.walk(root):
        rel = Path(d).relative_to(root).parts
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDED_DIRS and not x.startswith(".")
                         and (src.include_tests or x not in TEST_DIRS))
        if not src.include_tests and any(p in TEST_DIRS for p in rel):
            continue
        for f in sorted(files):
            p = os.path.join(d, f)
            if f.endswith(".py") and os.path.isfile(p):
                found.append((p, os.path.getsize(p)))
    if src.max_bytes:  # a spread of modules, not the alphabet's first ones: order by a hash of the name
        found.sort(key=lambda t: hashlib.sha1(os.path.relpath(t[0], root).encode()).hexdigest())
        picked, total = [], 0
        for p, size in found:
            if total + size <= src.max_bytes or not picked:
                picked.append((p, size))
                total += size
        found = sorted(picked)
    kind = "pydoc" if src.docstrings else "text"
    listing.files.extend(FileItem(p, kind, src.spec, s) for p, s in sorted(found))


def _walk(path: Path, source: str, listing: Listing, visited: set) -> None:
    """Add regular files under ``path``; symlinks are followed once, loops and oddities skipped."""
    p = str(path)
    try:
        st = os.stat(p)  # follows symlinks
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            listing.issues.append(Issue(p, "symlink loop (the link points back to itself)"))
        elif os.path.islink(p):
            listing.issues.append(Issue(p, f"dangling symlink -> {os.readlink(p)}"))
        else:
            listing.issues.append(Issue(p, f"cannot stat: {exc.strerror}"))
        return
    if stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in visited:
            listing.issues.append(Issue(p, "symlink loop: directory already visited, not read twice"))
            return
        visited.add(key)
        try:
            entries = sorted(os.scandir(p), key=lambda e: e.name)
        except OSError as exc:
            listing.issues.append(Issue(p, f"cannot list directory: {exc.strerror}"))
            return
        for e in entries:
            if e.name.startswith(".") or e.name == "__pycache__":
                listing.issues.append(Issue(e.path, "hidden or cache entry, not read"))
                continue
            _walk(Path(e.path), source, listing, visited)
    elif stat.S_ISREG(st.st_mode):
        listing.files.append(FileItem(p, _kind_for(p), source, st.st_size))
    else:
        what = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file")
        listing.issues.append(Issue(p, f"not a regular file ({what}); cannot be read as text"))


def stage_hf(src: HFSource, stage_dir: str | Path | None) -> Path:
    """Export a HF dataset split to JSONL (needs ``datasets``; offline, a cache staged beforehand)."""
    how = (
        "Pre-stage it on a login node with internet access:\n"
        "    pip install datasets\n"
        f"    python -c \"from datasets import load_dataset; load_dataset('{src.name}'"
        f"{', ' + repr(src.config) if src.config else ''}, split='{src.split}')"
        f".to_json('/shared/data/{src.name.replace('/', '_')}.jsonl')\"\n"
        "then pass that .jsonl file as the source here (or keep the HF cache on a shared disk, "
        "set HF_DATASETS_CACHE to it and HF_DATASETS_OFFLINE=1 on the compute nodes)."
    )
    try:
        # lazy: datasets is optional (not a labkit dependency), needed only by hf: sources
        import datasets  # noqa: F401
    except ImportError as exc:
        raise SourceError(f"source {src.spec!r} needs the package 'datasets', which is not installed. {how}") from exc
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split)
    except Exception as exc:  # offline, unknown name, no cache: all end the same way
        raise SourceError(f"cannot load {src.spec!r} ({type(exc).__name__}: {exc}). {how}") from exc
    if src.text_field not in ds.column_names:
        raise SourceError(f"{src.spec!r} has no column {src.text_field!r}; columns: {', '.join(ds.column_names)}")
    out = Path(stage_dir or ".") / f"hf_{src.name.replace('/', '_')}_{src.split}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds = ds.select_columns([src.text_field])
        if src.text_field != "text":  # datasets refuses a rename onto the same name
            ds = ds.rename_column(src.text_field, "text")
        ds.to_json(str(out))
    except Exception as exc:
        raise SourceError(f"cannot export {src.spec!r} to {out} ({type(exc).__name__}: {exc}); "
                          "check free disk space there, or pre-stage it as shown below. " + how) from exc
    return out


# ----------------------------------------------------------------------------- reading (workers)

@dataclass
class Document:
    """One document: a stable id (path, or path:line for JSONL) and its text."""

    id: str
    text: str


def read_file(item: FileItem, *, max_file_bytes: int, max_line_bytes: int, max_control: float = 0.10,
              text_field: str = "text") -> tuple[list[Document], list[Issue], str]:
    """Read one file into documents; never raises. Returns (docs, issues, sha256 of the raw bytes)."""
    p = item.path
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):  # changed since listing
            return [], [Issue(p, "no longer a regular file; not read")], ""
        if st.st_size > max_file_bytes:
            return [], [Issue(p, f"file of {st.st_size:,} bytes exceeds max_file_bytes={max_file_bytes:,}; "
                                 "raise max_file_bytes or split the file")], ""
        with open(p, "rb") as f:
            data = f.read(max_file_bytes + 1)
    except OSError as exc:
        return [], [Issue(p, f"unreadable: {exc.strerror or exc}")], ""
    digest = hashlib.sha256(data).hexdigest()
    if not data.strip():
        return [], [Issue(p, "empty file" if not data else "only whitespace")], digest
    issues: list[Issue] = []
    sample = data[:65536]
    ctrl = sum(sample.count(bytes([b])) for b in range(32) if b not in (9, 10, 12, 13)) + sample.count(b"\x7f")
    if ctrl / len(sample) > max_control:
        return [], [Issue(p, f"binary file ({ctrl / len(sample):.0%} NUL/control bytes in the first "
                             f"{len(sample):,}); not text")], digest
    undecodable = sample[:-4].decode("utf-8", errors="replace").count("\ufffd") / len(sample)
    if undecodable > 0.3:
        return [], [Issue(p, f"binary file ({undecodable:.0%} of the first {len(sample):,} bytes are not "
                             "UTF-8); not text")], digest
    if b"\x00" in data:
        nuls = data.count(b"\x00")
        issues.append(Issue(p, f"removed {nuls:,} NUL bytes", "repaired"))
        data = data.replace(b"\x00", b"")
    longest = max(map(len, data.split(b"\n")))
    if item.kind != "jsonl" and longest > max_line_bytes:
        return [], [Issue(p, f"a line of {longest:,} bytes exceeds max_line_bytes={max_line_bytes:,} "
                             "(minified or generated data?); raise max_line_bytes to keep it")], digest
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        issues.append(Issue(p, f"invalid UTF-8 (first at byte {exc.start:,}); undecodable bytes replaced "
                               "by U+FFFD", "repaired"))
    text = text.removeprefix("\ufeff")
    if item.kind == "jsonl":
        docs, more = _jsonl_docs(p, text, text_field, max_line_bytes)
        return docs, issues + more, digest
    if item.kind == "pydoc":
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            return [], issues + [Issue(p, f"not parseable as Python ({type(exc).__name__}); no docstrings")], digest
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        if not text:
            return [], issues + [Issue(p, "no docstrings in this file")], digest
    return [Document(p, text)], issues, digest


def _jsonl_docs(path: str, text: str, field_name: str, max_line_bytes: int) -> tuple[list[Document], list[Issue]]:
    docs, issues = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            issues.append(Issue(where, f"invalid JSON ({exc.msg}); line skipped"))
            continue
        value = obj.get(field_name) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            issues.append(Issue(where, f"no string field {field_name!r} (has: {keys}); line skipped"))
            continue
        if max(map(len, value.split("\n"))) > max_line_bytes:
            issues.append(Issue(where, f"a line longer than max_line_bytes={max_line_bytes:,}; line skipped"))
            continue
        docs.append(Document(where, value))
    if not docs and not issues:
        issues.append(Issue(path, "no documents in this JSONL file"))
    return docs, issues
