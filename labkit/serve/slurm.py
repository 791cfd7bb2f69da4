"""Run the server as a Slurm job on a GPU node, with the cluster profile's partition, GRES and prologue.

The job runs ``python -m labkit serve ... --host 0.0.0.0 --port 0 --url-file F`` (``job_command``); the
server writes its URL to ``F`` (on the shared file system) once it answers, and ``ServeJob.wait_url()``
reads it.
The bearer token travels in the job's environment (``LABKIT_SERVE_TOKEN``), never in the script.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from labkit.cluster import slurmcli
from labkit.cluster.jobscript import job_directives
from labkit.cluster.preflight import check_slurm_profile
from labkit.config import ConfigError, Profile

from .server import TOKEN_ENV, resolve_token


@dataclass
class ServeJob:
    """A submitted serving job: ``wait_url()``, ``state()``, ``cancel()``; ``token`` authenticates."""

    job_id: str
    name: str
    directory: Path
    token: str
    tls: bool
    cert: Path | None = None  # the certificate the job serves, when it is not one it makes itself

    @property
    def url_file(self) -> Path:
        return self.directory / "url"

    @property
    def log_file(self) -> Path:
        return self.directory / "job.log"

    @property
    def certfile(self) -> Path | None:
        """The certificate to verify the job's TLS with (a self-signed one exists once the job wrote it)."""
        if self.cert is not None:
            return self.cert
        return self.directory / "tls" / "cert.pem" if self.tls else None

    def state(self) -> str:
        """Slurm's state of the job (PENDING, RUNNING, ...), or GONE once it left the queue."""
        found = slurmcli.jobs([self.job_id])
        return found[0].state if found else "GONE"

    def wait_url(self, timeout: float = 300.0) -> str:
        """Block until the server in the job answers and return its URL; raises with the job log if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.url_file.is_file() and self.url_file.read_text().strip():
                return self.url_file.read_text().strip()
            state = self.state()
            if state in slurmcli.TERMINAL_STATES:
                log = self.log_file.read_text()[-2000:] if self.log_file.is_file() else "(no log)"
                raise RuntimeError(f"serving job {self.job_id} ended ({state}) before it answered; log ({self.log_file}):\n"
                                   f"{log}\nFix: see the log above and sacct -j {self.job_id}; submit it again "
                                   "(a NODE_FAIL or PREEMPTED job may just be retried)")
            time.sleep(0.5)
        raise TimeoutError(
            f"serving job {self.job_id} gave no URL within {timeout:.0f} s (state {self.state()}); "
            f"see squeue -j {self.job_id} and {self.log_file}"
        )

    def cancel(self) -> None:
        """Cancel the job (only this one)."""
        slurmcli.cancel([self.job_id])


def job_script(profile: Profile, command: Sequence[str], *, job_name: str, directory: Path,
               workdir: str | os.PathLike | None = None) -> str:
    """The sbatch script: the profile's partition, account, GPUs, cores, memory, walltime, extra
    directives and prologue, then ``command``."""
    memory = profile.memory.bytes if profile.memory else None  # the job's total, as for a Dask worker
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --output={directory / 'job.log'}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={profile.cores}"]
    if workdir:
        lines.append(f"#SBATCH --chdir={workdir}")
    lines += [f"#SBATCH {d}" for d in job_directives(profile, profile.gpus_per_worker, memory)]
    lines += ["", "set -e", *profile.prologue, "", "exec " + shlex.join(command), ""]
    return "\n".join(lines)


def job_command(serve_args: Sequence[str], jobdir: Path, *, python: str = "python", port: int = 0,
                tls: bool = True, certfile: str | os.PathLike | None = None,
                keyfile: str | os.PathLike | None = None) -> list[str]:
    """The job's command line: ``labkit serve <serve_args>`` on all the node's interfaces at ``port``
    (0 = any free one), writing its URL into ``jobdir``; TLS with ``certfile``/``keyfile`` when
    given, else with a certificate the job makes for its own host name when ``tls``."""
    _check_listen(port, certfile, keyfile)
    command = [python, "-m", "labkit", "serve", *serve_args, "--host", "0.0.0.0", "--port", str(port),
               "--url-file", str(jobdir / "url")]
    if certfile is not None:
        command += ["--cert", str(Path(certfile).expanduser().resolve()),
                    "--key", str(Path(keyfile).expanduser().resolve())]
    elif tls:
        command += ["--self-signed", str(jobdir / "tls")]
    return command


def _check_listen(port: int, certfile: str | os.PathLike | None, keyfile: str | os.PathLike | None) -> None:
    if (certfile is None) != (keyfile is None):
        raise ValueError("TLS needs both a certificate and its key (--cert and --key), or neither")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range: give 1-65535, or 0 for any free port on the node")


def submit(profile: Profile, serve_args: Sequence[str] = ("--demo",), *, job_name: str = "labkit-serve",
           token: str | None = None, directory: str | os.PathLike | None = None, tls: bool | None = None,
           python: str | None = None, workdir: str | os.PathLike | None = None, port: int = 0,
           certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None) -> ServeJob:
    """Submit ``labkit serve <serve_args>`` as a Slurm job through ``profile``; returns at once.

    TLS uses ``certfile``/``keyfile`` when given (files the node can read: a shared file system);
    else a self-signed certificate made in the job for its own host name, following ``profile.tls``
    unless ``tls`` says otherwise."""
    _check_listen(port, certfile, keyfile)  # bad input fails before anything is written or submitted
    for f in (certfile, keyfile):
        if f is not None and not Path(f).expanduser().is_file():
            raise FileNotFoundError(f"TLS file {f} does not exist; give the PEM certificate and key the job should serve")
    if profile.kind != "slurm":
        raise ConfigError(f"profile {profile.name!r} is {profile.kind!r}; serving as a job needs a slurm profile")
    check_slurm_profile(profile, profile.gpus_per_worker)  # unknown partition, too many GPUs... fail now
    token, _ = resolve_token(token)
    tls = certfile is not None or (profile.tls if tls is None else tls)
    base = Path(directory or profile.log_directory or Path.home() / ".labkit" / "serve-jobs").expanduser()
    jobdir = (base / f"{job_name}-{uuid.uuid4().hex[:8]}").resolve()
    jobdir.mkdir(parents=True, mode=0o700)
    # with a prologue (module load / venv activate) the job's own python is the right one
    python = python or ("python" if profile.prologue else sys.executable)
    command = job_command(serve_args, jobdir, python=python, port=port, tls=tls, certfile=certfile, keyfile=keyfile)
    script = job_script(profile, command, job_name=job_name, directory=jobdir, workdir=workdir or os.getcwd())
    (jobdir / "job.sh").write_text(script)
    # the notebook may itself run inside a Slurm job: its SLURM_* variables must not leak into this one
    job_id = slurmcli.submit(jobdir / "job.sh", env=dict(slurmcli.submission_env(), **{TOKEN_ENV: token}))
    return ServeJob(job_id, job_name, jobdir, token, tls, Path(certfile).expanduser().resolve() if certfile else None)
