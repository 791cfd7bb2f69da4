"""A session directory per cluster: private (0700), holding TLS files and worker logs; removed on close."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from . import slurmcli
from .errors import ClusterError

TAG = "labkit"  # every job name starts with this; `labkit cleanup` finds jobs by it


def state_root() -> Path:
    """Where sessions live: ``$LABKIT_STATE_DIR`` or ``~/.cache/labkit`` (home is shared with compute nodes)."""
    return Path(os.environ.get("LABKIT_STATE_DIR") or "~/.cache/labkit").expanduser() / "sessions"


@dataclass
class Session:
    """Identity of one cluster: id, job-name tag, owner comment and private directory."""

    sid: str
    path: Path

    @classmethod
    def create(cls) -> "Session":
        """A new session with a fresh 0700 directory."""
        root = state_root()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        sid = secrets.token_hex(4)
        path = root / sid
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)
        session = cls(sid, path)
        (path / "owner").write_text(session.owner_comment)
        return session

    @property
    def job_name(self) -> str:
        """``labkit-<sid>``: the Slurm job name of every worker of this session."""
        return f"{TAG}-{self.sid}"

    @property
    def owner_comment(self) -> str:
        """``labkit:<host>:<pid>``: lets `labkit cleanup` tell a live owner from a dead one."""
        return f"{TAG}:{socket.gethostname().split('.')[0]}:{os.getpid()}"

    @property
    def log_dir(self) -> Path:
        d = self.path / "logs"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def owner_alive(self) -> bool | None:
        """True/False when the owner ran on this host; None when it is unknown (other host)."""
        text = (self.path / "owner").read_text() if (self.path / "owner").exists() else ""
        return owner_alive(text)

    def remove(self) -> None:
        """Delete the directory and everything in it (keys, logs)."""
        shutil.rmtree(self.path, ignore_errors=True)


def owner_alive(comment: str) -> bool | None:
    """Whether the process named by a ``labkit:<host>:<pid>`` comment still runs (None: another host)."""
    parts = comment.strip().split(":")
    if len(parts) != 3 or parts[0] != TAG or not parts[2].isdigit():
        return False
    if parts[1] != socket.gethostname().split(".")[0]:
        return None
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_sessions() -> list[Session]:
    """Session directories on this host whose owner process is gone (e.g. a SIGKILLed kernel)."""
    root = state_root()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir():
            s = Session(path.name, path)
            if s.owner_alive() is False:
                found.append(s)
    return found


def end_session(session: Session, credentials: object | None, slurm: bool, job_ids: list[str] | tuple = ()) -> None:
    """Cancel every job of the session (by id and by name tag), delete its keys and its directory."""
    if slurm:
        try:
            slurmcli.cancel(job_ids)
            slurmcli.cancel_by_name(session.job_name)
        except ClusterError:
            pass
    delete = getattr(credentials, "delete", None)
    if delete is not None:
        delete()
    session.remove()
