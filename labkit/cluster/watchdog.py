"""A small detached process that cancels a session's Slurm jobs when the notebook owning them dies.

Running workers end by themselves when their scheduler (inside the notebook's kernel) is gone:
``--death-timeout``. A job still *queued* when the kernel is killed has no worker yet, so nothing
inside it can notice; it would wait in the queue, start much later and only then give up. The
watchdog closes that gap: it checks the owner every few seconds and, once the owner is gone,
cancels every job with the session's name and deletes the session's keys. When the cluster is
closed normally the session directory disappears and the watchdog exits quietly.

    python -m labkit.cluster.watchdog PID CREATE_TIME JOB_NAME SESSION_DIR [INTERVAL]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from . import slurmcli
from .session import Session


def owner_running(pid: int, create_time: float) -> bool:
    """Whether process ``pid`` still runs and is the same process (not a reused pid)."""
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def cancel_session_jobs(job_name: str) -> None:
    """scancel every job of this user named ``job_name`` (queued or running)."""
    try:
        slurmcli.cancel_by_name(job_name)
    except slurmcli.ClusterError:  # no scancel here: nothing this process can cancel
        pass


def watch(pid: int, create_time: float, job_name: str, session_dir: Path, interval: float = 2.0) -> bool:
    """Wait until the session is closed (returns False) or its owner died (cancels, cleans, returns True)."""
    while session_dir.exists():
        if not owner_running(pid, create_time):
            cancel_session_jobs(job_name)
            shutil.rmtree(session_dir, ignore_errors=True)
            return True
        time.sleep(interval)
    return False


def spawn(session: Session, interval: float = 2.0) -> subprocess.Popen:
    """Start the watchdog for ``session``, owned by this process, detached from its process group."""
    me = psutil.Process(os.getpid())
    log = open(session.log_dir / "watchdog.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "labkit.cluster.watchdog", str(me.pid), repr(me.create_time()),
             session.job_name, str(session.path), str(interval)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )
    finally:
        log.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (4, 5):
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    interval = float(args[4]) if len(args) == 5 else 2.0
    watch(int(args[0]), float(args[1]), args[2], Path(args[3]), interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
