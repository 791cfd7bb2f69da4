"""Each worker process of a multi-worker Slurm job sees only its own slice of the job's GPUs.

With ``workers_per_job: N`` one Slurm job gets ``--gres=gpu:N*G`` and runs N Dask worker processes,
named ``<job>-0`` ... ``<job>-{N-1}``. This module is loaded by each worker's nanny
(``--preload-nanny <this file>``) before it spawns the worker process: process ``i`` gets
``CUDA_VISIBLE_DEVICES`` = ids ``i*G .. i*G+G-1`` of the list Slurm set for the job, and
``LABKIT_JOB_GPUS`` = Slurm's whole list. It only narrows Slurm's list, never invents ids.

Standard library only: dask loads it by file path, so it works even where ``labkit`` is not importable.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

CUDA = "CUDA_VISIBLE_DEVICES"
JOB_GPUS = "LABKIT_JOB_GPUS"               # Slurm's list for the whole job, kept for transparency
WORKERS_PER_JOB = "LABKIT_WORKERS_PER_JOB"  # set by the job script (labkit.cluster.slurm)
GPUS_PER_WORKER = "LABKIT_GPUS_PER_WORKER"


class GpuSliceError(RuntimeError):
    """The job's GPU list cannot be split between its worker processes; the message names the fix."""


NO_GPU = ("-1", "NoDevFiles")  # CUDA's "hide every GPU" and Slurm's value for a job without GPU files


def parse_ids(value: str | Sequence[str] | None) -> list[str]:
    """GPU ids from a ``CUDA_VISIBLE_DEVICES`` value (``"0,1"``) or a list; empty entries dropped.

    The one parser labkit uses for that variable. ``-1`` or ``NoDevFiles`` ends the list: CUDA shows only
    the ids before an invalid one, so ``"-1"`` means no GPU and ``"0,-1,1"`` means GPU 0 only.
    """
    items = value.split(",") if isinstance(value, str) else list(value or [])
    ids: list[str] = []
    for item in (str(i).strip() for i in items):
        if item in NO_GPU:
            break
        if item:
            ids.append(item)
    return ids


def slice_gpus(job_gpus: str | Sequence[str] | None, index: int, gpus_per_worker: int,
               workers_per_job: int) -> list[str]:
    """The GPU ids worker process ``index`` of a job keeps: its ``gpus_per_worker`` ids of Slurm's list.

    With ``workers_per_job <= 1`` the list is returned unchanged. Raises GpuSliceError when the
    list is shorter than ``workers_per_job * gpus_per_worker`` or the index is out of range.
    """
    ids = parse_ids(job_gpus)
    if workers_per_job <= 1:
        return ids
    if gpus_per_worker < 1:
        raise GpuSliceError(f"gpus_per_worker={gpus_per_worker}: there is nothing to split; "
                            "run without the GPU slice preload or ask gpus_per_worker>=1")
    if not 0 <= index < workers_per_job:
        raise GpuSliceError(f"worker process index {index} is outside 0..{workers_per_job - 1} "
                            f"for workers_per_job={workers_per_job}")
    need = workers_per_job * gpus_per_worker
    if len(ids) < need:
        shown = ",".join(ids) if ids else "(unset or empty)"
        raise GpuSliceError(
            f"this Slurm job has {len(ids)} GPU(s) in CUDA_VISIBLE_DEVICES={shown}, but workers_per_job="
            f"{workers_per_job} x gpus_per_worker={gpus_per_worker} need {need}. Fix: make the job ask "
            f"--gres=gpu:{need}, check that the node's GRES sets "
            f"CUDA_VISIBLE_DEVICES, or lower workers_per_job")
    return ids[index * gpus_per_worker:(index + 1) * gpus_per_worker]


def process_index(worker_name: Any) -> int:
    """The process number in a worker name ``<job>-<i>`` (dask's ``--nworkers`` naming)."""
    head, sep, tail = str(worker_name).rpartition("-")
    if not sep or not tail.isdigit():
        raise GpuSliceError(f"worker name {worker_name!r} does not end in -<process number>, so its GPU "
                            "slice is unknown; start multi-worker jobs through labkit.start_cluster")
    return int(tail)


def _job_layout(env: Mapping[str, str]) -> tuple[int, int]:
    """(workers_per_job, gpus_per_worker) from the job script's variables."""
    return int(env.get(WORKERS_PER_JOB) or 1), int(env.get(GPUS_PER_WORKER) or 1)


def check_job(env: Mapping[str, str]) -> None:
    """Raise GpuSliceError when the job's GPU list is too short for all its worker processes."""
    workers, gpus = _job_layout(env)
    if workers > 1:
        slice_gpus(env.get(CUDA, ""), 0, gpus, workers)


def env_for(worker_name: Any, env: Mapping[str, str]) -> dict[str, str]:
    """The variables worker ``worker_name`` should get (empty when the job has one worker)."""
    workers, gpus = _job_layout(env)
    if workers <= 1:
        return {}
    job = env.get(CUDA, "")
    mine = slice_gpus(job, process_index(worker_name), gpus, workers)
    return {CUDA: ",".join(mine), JOB_GPUS: ",".join(parse_ids(job))}


def dask_setup(server: Any) -> None:
    """Dask preload hook: on a nanny, set the slice in the environment of the worker it spawns
    (before CUDA can initialise there); on a nanny-less worker, in this process."""
    if _job_layout(os.environ)[0] <= 1:
        return
    child_env = getattr(server, "env", None)
    target = child_env if isinstance(child_env, dict) and hasattr(server, "pre_spawn_env") else os.environ
    try:
        updates = env_for(server.name, os.environ)  # read before writing: without a nanny, target is os.environ
    except GpuSliceError:
        target[CUDA] = ""  # dask only logs this error: the worker then gets no GPU rather than all of them
        raise
    target.update(updates)


# dask loads this file in each nanny's constructor, where an exception stops the worker command and so
# the job (its log then says why); an exception in dask_setup would only be logged, and the workers
# would start sharing every GPU of the job. Only there: as ``labkit.cluster.gpu_slice`` (for parse_ids) it is
# also imported in worker processes, whose list is already narrowed to their own slice.
if not __package__:
    check_job(os.environ)
