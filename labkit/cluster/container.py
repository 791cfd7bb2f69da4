"""Slurm workers inside an Apptainer (Singularity) image: the worker command and its pre-flight check.

With ``container: {image: ...}`` in a Slurm profile, the job script's worker command becomes
``apptainer exec [--nv] --bind <session dir> --bind <runs> ... IMAGE /opt/labkit/venv/bin/python -m
distributed.cli.dask_worker ...``: dask-jobqueue writes ``<python> -m distributed.cli.dask_worker``, so
the prefix goes where the Python path would. The job script's prologue, its signal trap and the
``#SBATCH`` lines stay outside, on the node; the trap signals the runtime's process, which passes
the signal on to the worker (Apptainer's documented behaviour, not run here: no Apptainer on this machine).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from ..config import Container, Profile
from .errors import ClusterConfigError

__all__ = ["check_container", "exec_command", "exec_prefix", "image_path"]


def image_path(container: Container) -> str:
    """The image as the job script names it: ``~`` expanded (the script quotes it), URIs as given."""
    return container.image if "://" in container.image else str(Path(container.image).expanduser())


def exec_prefix(container: Container, gpus: int, binds: list[Path | str]) -> list[str]:
    """``apptainer exec [--nv] --bind B ... [options] IMAGE PYTHON``: what runs the Dask worker module.

    ``--nv`` (the host's NVIDIA driver inside the container) only when the job asks GPUs; ``binds``
    (labkit's own: the session folder with the TLS keys, the runs folder) come before the profile's."""
    argv = [container.runtime, "exec"] + (["--nv"] if gpus > 0 else [])
    seen: set[str] = set()
    for bind in [*map(str, binds), *container.binds]:
        if bind not in seen:
            seen.add(bind)
            argv += ["--bind", bind]
    return argv + list(container.options) + [image_path(container), container.python]


def exec_command(container: Container, gpus: int, binds: list[Path | str]) -> str:
    """:func:`exec_prefix` as one shell-quoted string (dask-jobqueue's ``python=``)."""
    return " ".join(shlex.quote(a) for a in exec_prefix(container, gpus, binds))


def check_container(profile: Profile, where: str) -> None:
    """The image exists here (the nodes share the path) and the runtime is on PATH or loaded by the prologue."""
    container = profile.container
    if container is None:
        return
    key = f"profiles.{profile.name}.container"
    image = image_path(container)
    if "://" not in image and not Path(image).exists():
        raise ClusterConfigError(
            f"{where}: {key}.image {image!r} does not exist on this host; build it (apptainer build "
            f"labkit.sif container/labkit.def, see docs/instructors.md) on storage the compute nodes share, "
            "or fix the path")
    runtime = container.runtime
    loaded = any(runtime in line for line in profile.prologue)
    if shutil.which(runtime) is None and not loaded:
        raise ClusterConfigError(
            f"{where}: {key}.runtime {runtime!r} is not on PATH here and the prologue does not load it; "
            f"add 'module load {runtime}' (your site's module name) to profiles.{profile.name}.prologue, "
            f"or set {key}.runtime to the one your site has (apptainer or singularity)")
