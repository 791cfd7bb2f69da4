"""Local workers (laptop, Binder, a GPU workstation): a LocalCluster, one worker per GPU when asked."""

from __future__ import annotations

import glob
import os
from typing import Any

from ..config import Profile, parse_memory
from .gpu_slice import parse_ids
from .upstream import LabkitLocalCluster, NonDaemonNanny

__all__ = ["LabkitLocalCluster", "NonDaemonNanny", "build_local_cluster", "local_gpu_ids"]


def local_gpu_ids(env: dict[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: its CUDA_VISIBLE_DEVICES, else the NVIDIA device files."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return parse_ids(cvd)
    return sorted(p.removeprefix("/dev/nvidia") for p in glob.glob("/dev/nvidia[0-9]*"))


def build_local_cluster(profile: Profile, workers: int, gpus_per_worker: int, security: Any = None,
                        name: str | None = None, asynchronous: bool = False) -> tuple[LabkitLocalCluster, str]:
    """A local cluster with no workers yet (scale it), and a note on where its GPUs come from."""
    slots = local_gpu_ids()
    note = ""
    if gpus_per_worker > 0:
        need = (workers or profile.workers) * gpus_per_worker  # the sidebar starts with 0 workers
        if len(slots) >= need:
            note = f"GPUs {','.join(slots[:need])} of this machine, {gpus_per_worker} per worker"
        elif profile.fake_gpus:
            have = ",".join(slots) or "none"
            slots = [str(i) for i in range(need)]
            note = (f"this machine has {have if have != 'none' else 'no'} GPU(s) for {need} asked: "
                    f"fake GPU slots {','.join(slots)} (resource GPU and CUDA_VISIBLE_DEVICES per worker; "
                    f"code runs on CPU) because profile {profile.name!r} sets fake_gpus")
        else:
            from .errors import ClusterConfigError

            raise ClusterConfigError(
                f"{need} GPUs asked but this machine offers {len(slots)}; ask gpus_per_worker=0 or fewer workers, "
                f"or set fake_gpus: true in profile {profile.name!r} to rehearse GPU code on CPU"
            )
    memory_limit: Any = profile.memory_limit
    if memory_limit not in (None, "auto"):
        memory_limit = parse_memory(memory_limit)
    kwargs: dict[str, Any] = dict(
        n_workers=0, threads_per_worker=profile.threads_per_worker, processes=True,
        memory_limit=memory_limit, dashboard_address=profile.dashboard_address or "127.0.0.1:0",
        host="127.0.0.1", worker_class=NonDaemonNanny, gpu_slots=slots, gpus_per_worker=gpus_per_worker,
        worker_dashboard_address=None, name=name, asynchronous=asynchronous,
    )
    if security is not None:
        kwargs.update(security=security, protocol="tls://")
    return LabkitLocalCluster(**kwargs), note
