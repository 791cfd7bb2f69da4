"""Local workers (laptop, Binder, a GPU workstation): a LocalCluster, one worker per GPU when asked."""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

from ..config import Profile
from ..settings import Memory
from .errors import ClusterConfigError
from .gpu_slice import parse_ids
from .upstream import LabkitLocalCluster, NonDaemonNanny

__all__ = ["LabkitLocalCluster", "NonDaemonNanny", "build_local_cluster", "local_gpu_ids"]

MAIN_GUARD_FIX = ("put the code that starts the cluster under `if __name__ == \"__main__\":` in your script "
                  "(local Dask workers are new Python processes that import your script again; unguarded, each "
                  "of them runs it too)")


def importing_main_in_a_child() -> bool:
    """Whether this call comes from a script's top level while a spawned process re-imports it.

    multiprocessing's spawn runs the parent's main script again as ``__mp_main__`` in each new
    process (a local Dask worker): a ``start_cluster`` there is the missing main guard, not a cluster.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            return True
        frame = frame.f_back
    return False


def run_from_a_script() -> bool:
    """Whether this process runs a Python script (not a notebook kernel or a REPL)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return main.endswith(".py") and "ipykernel" not in os.path.basename(main)


def explain_failed_start(names: list[str], asked: int) -> str:
    """What to tell a person whose local worker processes died at start, with the likely fix."""
    msg = (f"{len(names)} of {asked} local worker process(es) exited while starting ({', '.join(names)}; "
           "distributed says 'Nanny failed to start'); their own error is printed above, on this process's stderr.")
    if run_from_a_script():
        msg += f"\nIn a script the usual cause is a missing main guard: {MAIN_GUARD_FIX}."
    else:
        msg += ("\nFix: read the worker error above; `labkit doctor` checks the installation, and a smaller "
                "memory_limit or fewer workers helps when the machine is short of memory.")
    return msg


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
            raise ClusterConfigError(
                f"{need} GPUs asked but this machine offers {len(slots)}; ask gpus_per_worker=0 or fewer workers, "
                f"or set fake_gpus: true in profile {profile.name!r} to rehearse GPU code on CPU"
            )
    memory_limit: Any = profile.memory_limit
    if isinstance(memory_limit, Memory):
        memory_limit = memory_limit.bytes
    kwargs: dict[str, Any] = dict(
        n_workers=0, threads_per_worker=profile.threads_per_worker, processes=True,
        memory_limit=memory_limit, dashboard_address=profile.dashboard_address or "127.0.0.1:0",
        host="127.0.0.1", worker_class=NonDaemonNanny, gpu_slots=slots, gpus_per_worker=gpus_per_worker,
        worker_dashboard_address=None, name=name, asynchronous=asynchronous,
    )
    if security is not None:
        kwargs.update(security=security, protocol="tls://")
    return LabkitLocalCluster(**kwargs), note
