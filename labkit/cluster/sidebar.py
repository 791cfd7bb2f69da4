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

from ..config import ConfigError, load_config
from .errors import ClusterConfigError
from .session import Session, end_session, stale_sessions
from .start import choose_profile
from .tls import SessionCredentials

CONFIG_FILE = Path(__file__).parent.parent / "profiles" / "labextension.yaml"


def LabkitCluster(*args: Any, asynchronous: bool = True, profile: str | None = None, **overrides: Any) -> Any:
    """A not-yet-started labkit cluster (LocalCluster or SLURMCluster) for the sidebar to await and scale."""
    if args:
        raise ClusterConfigError(f"LabkitCluster takes keyword arguments only (profile keys), not {args!r}")
    prof, _reason = choose_profile(load_config(), profile)
    try:
        prof = prof.replace(**overrides) if overrides else prof
    except ConfigError as exc:
        raise ClusterConfigError(f"labextension.factory.kwargs: {exc}") from exc
    gpus = prof.gpus_per_worker
    if prof.kind == "slurm":
        from .preflight import check_slurm_profile

        check_slurm_profile(prof, gpus)
    for stale in stale_sessions():
        stale.remove()
    session = Session.create()
    creds = SessionCredentials.create(session.path / "tls") if prof.tls else None
    if prof.kind == "slurm":
        from .slurm import build_slurm_cluster

        cluster = build_slurm_cluster(prof, session, creds, gpus, asynchronous=asynchronous)
    else:
        from .local import build_local_cluster

        cluster, _note = build_local_cluster(prof, 0, gpus, security=creds.security() if creds else None,
                                             name=session.job_name, asynchronous=asynchronous)
    cluster.on_close = lambda: end_session(session, creds, prof.kind == "slurm")
    return cluster
