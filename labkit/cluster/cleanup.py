"""`labkit cleanup`: cancel this user's stale labkit jobs and delete stale session keys.

A labkit job is named ``labkit-<session>`` and carries the comment ``labkit:<host>:<pid>`` of
the notebook process that owns it; it is stale when that process is gone.
"""

from __future__ import annotations

import re

from . import slurmcli
from .errors import ClusterError
from .session import TAG, owner_alive, stale_sessions

_NAME = re.compile(rf"^{TAG}-[0-9a-f]{{8}}$")


def labkit_jobs(user: str | None = None) -> list[slurmcli.JobInfo]:
    """This user's jobs that labkit submitted (name tag and owner comment)."""
    user = user or slurmcli.current_user()
    return [j for j in slurmcli.jobs(user=user) if _NAME.match(j.name) and j.comment.startswith(f"{TAG}:")]


def stale_jobs(everything: bool = False, user: str | None = None) -> list[slurmcli.JobInfo]:
    """Labkit jobs whose owner process is gone (or every labkit job with ``everything``)."""
    jobs = labkit_jobs(user)
    return jobs if everything else [j for j in jobs if owner_alive(j.comment) is False]


def cleanup(everything: bool = False, dry_run: bool = False) -> tuple[list[slurmcli.JobInfo], list[str]]:
    """Cancel stale labkit jobs and remove stale session directories; returns what was (or would be) done."""
    jobs = stale_jobs(everything)
    sessions = stale_sessions()
    if not dry_run:
        slurmcli.cancel(j.job_id for j in jobs)
        for s in sessions:
            s.remove()
    return jobs, [str(s.path) for s in sessions]


def add_arguments(parser) -> None:
    """`labkit cleanup [--all] [--dry-run]`."""
    parser.add_argument("--all", action="store_true", help="cancel every labkit job of yours, even of live notebooks")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be cancelled")


def cli(args) -> int:
    """Print and cancel stale jobs; exit 0 (1 when Slurm cannot be asked)."""
    try:
        jobs, sessions = cleanup(everything=args.all, dry_run=args.dry_run)
    except ClusterError as exc:
        print(f"labkit cleanup: {exc}")
        return 1
    verb = "would cancel" if args.dry_run else "cancelled"
    for j in jobs:
        print(f"{verb} job {j.describe()} {j.name} (owner {j.comment})")
    for s in sessions:
        print(f"{'would remove' if args.dry_run else 'removed'} stale session keys {s}")
    if not jobs and not sessions:
        print("labkit cleanup: nothing stale")
    return 0
