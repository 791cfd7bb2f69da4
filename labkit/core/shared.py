"""Is a folder the same folder on every worker? Checked before work starts, not found out by a late crash.

On a cluster only some filesystems are shared: ``$HOME`` and project storage are, a node's ``/tmp``
is not. A run folder under the login node's ``/tmp`` exists there only (or, worse, a folder of
the same name exists on a compute node and is another one). ``check_shared`` leaves a marker file
with a fresh token in each folder and asks every worker whether it sees that very token; for a
folder this process cannot write to, the workers compare its listing (names, sizes, mtimes) instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

MARKER = ".labkit-shared-check-"


class SharedFolderError(RuntimeError):
    """A folder the work needs is not the same folder on every worker; the message names path and node."""


def _fingerprint(path: str) -> list[tuple[str, int, int]] | None:
    """Names, sizes and mtimes of a folder's entries (the first 256, sorted), None if it is not there."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)[:256]
            return [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries]
    except OSError:
        return None


def _what_worker_sees(checks: list[tuple[str, str, Any]], dask_worker=None) -> dict[str, Any]:
    """Runs on a worker: for each (path, kind, expected) whether it sees the same thing, and its hostname."""
    seen = {}
    for path, kind, expected in checks:
        if kind == "token":
            try:
                seen[path] = Path(path).read_text() == expected
            except OSError:
                seen[path] = False
        else:
            got = _fingerprint(path)
            seen[path] = got is not None and [tuple(e) for e in got] == [tuple(e) for e in expected]
    return {"host": socket.gethostname(), "seen": seen}


def check_shared(client: Any, folders: Mapping[str, str | os.PathLike | None], *,
                 workers: Sequence[str] | None = None, create: Collection[str] = ()) -> None:
    """Raise :class:`SharedFolderError` unless every worker sees each of ``folders`` as this process does.

    ``folders`` maps a label (``"data_dir"``, ``"checkpoint_dir"``) to a path; None entries are skipped.
    ``create``: labels of folders to make here first if missing (a checkpoint folder not made yet)."""
    checks: list[tuple[str, str, Any]] = []
    labels: dict[str, str] = {}
    markers: list[Path] = []
    try:
        for label, folder in folders.items():
            if folder is None:
                continue
            path = Path(folder).expanduser().resolve()
            if label in create:
                path.mkdir(parents=True, exist_ok=True)
            if not path.is_dir():
                raise SharedFolderError(f"{label} {path} is not a folder on this host ({socket.gethostname()}): "
                                        "fix the path, or make the folder on shared storage first")
            labels[str(path)] = label
            token = uuid.uuid4().hex
            marker = path / f"{MARKER}{token[:12]}"
            try:
                marker.write_text(token)
                markers.append(marker)
                checks.append((str(marker), "token", token))
            except OSError:  # read-only here (a shared dataset): compare what is in it instead
                checks.append((str(path), "listing", _fingerprint(str(path))))
        if not checks:
            return
        answers = client.run(_what_worker_sees, checks, workers=list(workers) if workers else None)
    finally:
        for m in markers:
            try:
                m.unlink()
            except OSError:
                pass
    problems = []
    for addr, answer in sorted(answers.items()):
        for checked, ok in answer["seen"].items():
            if not ok:
                folder = checked if checked in labels else str(Path(checked).parent)
                problems.append((labels[folder], folder, answer["host"], addr))
    if problems:
        label, folder, host, addr = problems[0]
        nodes = sorted({p[2] for p in problems if p[1] == folder})
        raise SharedFolderError(
            f"{label} {folder} is not shared with the workers: on node {host} (worker {addr}"
            + (f", and on {', '.join(n for n in nodes if n != host)}" if len(nodes) > 1 else "")
            + f") it is missing or another folder, though this host ({socket.gethostname()}) has it. "
            "Put it on a filesystem every node mounts (under $HOME or project storage), not a node-local "
            "path such as /tmp"
        )
