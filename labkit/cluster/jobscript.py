"""``#SBATCH`` directives from a profile, shared by the Dask worker jobs and ``labkit serve --slurm``."""

from __future__ import annotations

from ..config import Profile
from .errors import ClusterConfigError


def uses_mem_per_gpu(profile: Profile, gpus: int) -> bool:
    """Whether the job asks memory per GPU (``memory_mode: mem-per-gpu`` and GPUs asked) instead of ``--mem``."""
    return profile.memory_mode == "mem-per-gpu" and gpus > 0


def gpu_directives(profile: Profile, gpus: int, memory: int | None) -> list[str]:
    """``--gres`` for a job of ``gpus`` GPUs and, in mem-per-gpu mode, ``--mem-per-gpu`` for its ``memory`` bytes."""
    if gpus <= 0:
        return []
    out = [f"--gres=gpu:{gpus}"]
    if uses_mem_per_gpu(profile, gpus) and memory:
        out.append(f"--mem-per-gpu={max(1, memory // gpus // 2**20)}M")
    return out


def job_directives(profile: Profile, gpus: int, memory: int | None) -> list[str]:
    """Partition, account, GPUs, memory (the job's total, in bytes), walltime and the profile's extra directives."""
    if profile.require_account and not profile.account:
        raise ClusterConfigError(
            f"profile {profile.name!r} requires an account (require_account: true) but sets none; "
            f"add 'account: <project>' to it in {profile.source}"
        )
    out = [f"--partition={profile.partition}"] if profile.partition else []
    if profile.account:
        out.append(f"--account={profile.account}")
    out += gpu_directives(profile, gpus, memory)
    if memory and not uses_mem_per_gpu(profile, gpus):
        out.append(f"--mem={max(1, memory // 2**20)}M")
    if profile.walltime:
        out.append(f"--time={profile.walltime}")
    return out + list(profile.job_extra)


def signal_directives(profile: Profile) -> list[str]:
    """``--signal=B:USR1@90`` when the profile sets ``signal``: the warning before walltime, to the batch
    shell, whose trap passes it to the worker command (see :mod:`labkit.core.preempt`)."""
    return [profile.signal.directive] if profile.signal else []
