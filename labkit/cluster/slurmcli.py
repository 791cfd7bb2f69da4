"""Thin, time-limited calls to Slurm's command line tools (sbatch, squeue, sinfo, scontrol, scancel)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable, Mapping

from .errors import ClusterError

# Variables of an enclosing job (batchspawner runs the notebook inside one) that must not leak
# into the jobs we submit; SLURM_CONF says where Slurm's config is and is kept.
_KEEP = {"SLURM_CONF"}
_LEAKY_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")
_LEAKY_NAMES = {"CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES"}

# Job states after which a job never runs again (squeue's long names), plus GONE: no longer listed.
TERMINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "GONE"})


def submission_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for sbatch: ours, minus what an enclosing Slurm job set."""
    env = os.environ if env is None else env
    return {
        k: v for k, v in env.items()
        if k in _KEEP or not (k.startswith(_LEAKY_PREFIXES) or k in _LEAKY_NAMES)
    }


def which(tool: str) -> str | None:
    """Path of a Slurm tool, or None."""
    return shutil.which(tool)


def _call(args: list[str], timeout: float, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a Slurm command (``env``: default ours minus an enclosing job's) within ``timeout`` seconds."""
    exe = which(args[0])
    if exe is None:
        raise ClusterError(f"{args[0]} not found on PATH: load your site's Slurm module, or use profile='local'")
    try:
        return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout,
                              env=submission_env() if env is None else dict(env), check=False)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{args[0]} did not answer within {timeout:.0f} s: is slurmctld up? (try: sinfo)") from exc


def run(args: list[str], timeout: float = 10.0, check: bool = True) -> str:
    """Run a Slurm command with a clean env and a time limit; return stdout."""
    out = _call(args, timeout)
    if check and out.returncode != 0:
        raise ClusterError(f"{' '.join(args)} failed: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def submit(script_path: str | os.PathLike, env: Mapping[str, str] | None = None, timeout: float = 60.0,
           args: Iterable[str] = ()) -> str:
    """``sbatch --parsable [args] script``; return the job id.

    ``env`` is the environment sbatch (and so the job) gets, by default :func:`submission_env`.
    A refusal raises ClusterError with sbatch's reason and where to look.
    """
    out = _call(["sbatch", "--parsable", *args, str(script_path)], timeout, env)
    lines = out.stdout.strip().splitlines() or [""]
    job_id = lines[-1].split(";")[0].strip()  # --parsable: "<id>" or "<id>;<cluster>"
    if out.returncode != 0 or not job_id.isdigit():
        reason = (out.stderr or out.stdout).strip() or f"exit status {out.returncode}, no output"
        raise ClusterError(
            f"sbatch refused the job script {script_path}: {reason}. Fix: check the profile's partition, account, "
            "GPUs, memory and walltime against what this site offers (sinfo -s; sacctmgr show assoc user=$USER), "
            "or its job_extra lines"
        )
    return job_id


@dataclass(frozen=True)
class JobInfo:
    """One job as squeue reports it."""

    job_id: str
    name: str
    state: str
    reason: str
    comment: str = ""

    def describe(self) -> str:
        """``123 PENDING (Resources)``."""
        reason = "" if self.reason in ("", "None", "(null)") else f" ({self.reason})"
        return f"{self.job_id} {self.state}{reason}"


def jobs(job_ids: Iterable[str] | None = None, user: str | None = None, timeout: float = 10.0) -> list[JobInfo]:
    """Jobs known to squeue, by id or for a user."""
    args = ["squeue", "-h", "-o", "%i|%j|%T|%r|%k"]
    ids = [str(j) for j in (job_ids or []) if j]
    if job_ids is not None:
        if not ids:
            return []
        args += ["-j", ",".join(ids)]
    if user:
        args += ["-u", user]
    out = run(args, timeout=timeout, check=False)
    found = []
    for line in out.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5:
            found.append(JobInfo(*[p.strip() for p in parts]))
    return found


def current_user() -> str:
    """The user whose jobs labkit lists and cancels (this process's login name)."""
    return getpass.getuser()


def cancel_by_name(job_name: str, timeout: float = 30.0) -> None:
    """scancel every job of this user named ``job_name`` (queued or running); a missing scancel is an error."""
    run(["scancel", "--name", job_name, "-u", current_user()], timeout=timeout, check=False)


def cancel(job_ids: Iterable[str], timeout: float = 10.0) -> None:
    """scancel the given jobs; already-finished ones are ignored."""
    ids = [str(j) for j in job_ids if j]
    if ids and which("scancel"):
        run(["scancel", *ids], timeout=timeout, check=False)
