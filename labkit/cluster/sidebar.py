"""The dask-labextension factory: the JupyterLab Dask sidebar's "+NEW" starts a labkit cluster.

Dask config (copy ``labkit/profiles/labextension.yaml`` to ``~/.config/dask/labextension.yaml``)::

    labextension:
      factory:
        module: labkit.cluster.sidebar
        class: LabkitCluster
        args: []
        kwargs: {}

The sidebar then builds clusters with the active profile (auto: Slurm when configured), the same
pre-flight checks, TLS keys and job-name tag as ``start_cluster``; closing it in the sidebar cancels
its jobs and deletes its keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ClusterConfigError
from .session import end_session
from .start import build_cluster, resolve_profile

CONFIG_FILE = Path(__file__).parent.parent / "profiles" / "labextension.yaml"


def LabkitCluster(*args: Any, asynchronous: bool = True, profile: str | None = None, **overrides: Any) -> Any:
    """A not-yet-started labkit cluster (LocalCluster or SLURMCluster) for the sidebar to await and scale."""
    if args:
        raise ClusterConfigError(f"LabkitCluster takes keyword arguments only (profile keys), not {args!r}")
    prof, _reason = resolve_profile(profile, overrides, caller="labextension.factory.kwargs")
    cluster, session, creds, _note = build_cluster(prof, 0, prof.gpus_per_worker, asynchronous=asynchronous)
    cluster.on_close = lambda: end_session(session, creds, prof.kind == "slurm")
    return cluster
