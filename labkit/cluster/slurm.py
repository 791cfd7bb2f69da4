"""Slurm workers through dask-jobqueue: jobs of one or more workers, each its own GPUs, TLS, a clean environment."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from ..config import Profile, runs_dir
from ..settings import Memory
from . import gpu_slice
from .container import exec_command
from .jobscript import gpu_directives, signal_directives, uses_mem_per_gpu
from .session import Session
from .tls import SessionCredentials
from .upstream import LabkitSLURMCluster, LabkitSLURMJob

__all__ = ["LabkitSLURMCluster", "LabkitSLURMJob", "build_slurm_cluster", "lifetime_args", "worker_python"]

# Worker processes must be allowed children (torch DataLoader workers inside a task).
NON_DAEMONIC = "export DASK_DISTRIBUTED__WORKER__DAEMON=False"
DEATH_TIMEOUT_S = 30  # a worker whose scheduler is gone (kernel killed) exits after this
PREEMPT = "labkit.core.preempt"  # preloaded into nannies (forward Slurm's warning) and workers (catch it)


def _seconds_text(seconds: int) -> str:
    return f"{max(1, int(seconds))}s"


def lifetime_args(profile: Profile) -> list[str]:
    """``--lifetime``/``--lifetime-stagger`` so workers retire before walltime (replaced by new jobs).

    Without an explicit ``lifetime`` a worker retires 5 minutes (or 10 %, for short walltimes)
    before its walltime, staggered so that not all leave at once; with a ``signal``, no earlier than a
    third of its lead before walltime, so the warning comes first and training can checkpoint.
    """
    lifetime = profile.lifetime
    stagger = profile.lifetime_stagger
    if lifetime is None and profile.walltime:
        wall = profile.walltime.seconds
        margin = min(300, max(10, wall // 10))
        if profile.signal:
            margin = min(margin, max(5, profile.signal.lead // 3))
        lifetime = _seconds_text(wall - margin)
        stagger_s = stagger.seconds if stagger else 0
        stagger = _seconds_text(min(stagger_s, margin // 2)) if stagger_s else None
    if lifetime is None:
        return []
    args = ["--lifetime", lifetime]
    if stagger:
        args += ["--lifetime-stagger", stagger]
    return args


def worker_python(profile: Profile, session: Session, job_gpus: int) -> str:
    """What runs ``-m distributed.cli.dask_worker`` in the job: this Python, or the image's through
    ``apptainer exec`` with the session folder (TLS keys) and the runs folder bound."""
    if profile.container is None:
        return sys.executable
    runs = runs_dir()
    runs.mkdir(parents=True, exist_ok=True)  # a bind's source must exist
    return exec_command(profile.container, job_gpus, [session.path, runs])


def build_slurm_cluster(profile: Profile, session: Session, creds: SessionCredentials | None,
                        gpus_per_worker: int, **extra: Any) -> LabkitSLURMCluster:
    """A not-yet-scaled SLURMCluster for this profile (scheduler running here, no jobs queued).

    Each job runs ``profile.workers_per_job`` worker processes with ``gpus_per_worker`` GPUs, the
    profile's ``cores`` and ``memory`` each; with more than one, each process keeps only its own
    slice of the job's ``CUDA_VISIBLE_DEVICES`` (see :mod:`labkit.cluster.gpu_slice`).
    """
    per_job = profile.workers_per_job
    job_gpus = gpus_per_worker * per_job
    memory = profile.memory or Memory("4GiB")
    # partition, account, --mem and walltime: dask-jobqueue's own directives; GPUs and extras: labkit's
    directives = [f"--comment={session.owner_comment}",
                  *gpu_directives(profile, job_gpus, memory.bytes * per_job), *signal_directives(profile),
                  *profile.job_extra]
    skip = ["--mem"] if uses_mem_per_gpu(profile, job_gpus) else []
    worker_args = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"] + lifetime_args(profile)  # /health, /metrics: local only
    if gpus_per_worker > 0:
        worker_args += ["--resources", f"GPU={gpus_per_worker}"]
    if profile.signal:
        worker_args += ["--preload-nanny", PREEMPT, "--preload", PREEMPT]
    prologue = list(profile.prologue) + [NON_DAEMONIC]
    if per_job > 1 and gpus_per_worker > 0:  # by file on the node; by module in an image (labkit is installed there)
        slicer = gpu_slice.__name__ if profile.container else shlex.quote(str(Path(gpu_slice.__file__).resolve()))
        worker_args += ["--preload-nanny", slicer]
        prologue.append(f"export {gpu_slice.WORKERS_PER_JOB}={per_job} {gpu_slice.GPUS_PER_WORKER}={gpus_per_worker}")
    if profile.interface:
        # torch.distributed's own sockets: without these gloo and nccl pick an interface from the
        # hostname, which on many clusters resolves to the management network (or not at all)
        iface = shlex.quote(profile.interface)
        prologue.append(f"export GLOO_SOCKET_IFNAME={iface} NCCL_SOCKET_IFNAME={iface}")
    scheduler_options = {"dashboard_address": profile.dashboard_address or "127.0.0.1:0"}
    if profile.scheduler_interface or profile.interface:
        scheduler_options["interface"] = profile.scheduler_interface or profile.interface
    kwargs: dict[str, Any] = dict(
        queue=profile.partition,
        account=profile.account,
        walltime=profile.walltime,
        cores=profile.cores * per_job,
        processes=per_job,
        memory=memory if per_job == 1 else memory.bytes * per_job,
        job_name=session.job_name,
        job_extra_directives=directives,
        job_directives_skip=skip,
        job_script_prologue=prologue,
        worker_extra_args=worker_args,
        python=worker_python(profile, session, job_gpus),
        death_timeout=DEATH_TIMEOUT_S,
        log_directory=str(session.log_dir if profile.log_directory is None else profile.log_directory),
        interface=profile.interface,
        scheduler_options=scheduler_options,
        shared_temp_directory=str(session.path),
        name=session.job_name,
    )
    if creds is not None:
        kwargs["security"] = creds.security()
        kwargs["protocol"] = "tls://"
    kwargs.update(extra)
    return LabkitSLURMCluster(**kwargs)
