"""The cluster layer: ``start_cluster`` gives a local, Slurm or Kubernetes Dask cluster behind one handle.

Modules: ``start`` (profile choice, start-up), ``handle`` (ClusterHandle), ``local`` (LocalCluster),
``slurm`` (dask-jobqueue SLURMCluster), ``container`` (Slurm workers in an Apptainer image),
``kubernetes`` (dask-kubernetes' DaskCluster spec, pre-flight), ``upstream`` (every override of dask-jobqueue's and distributed's
private API, with the upstream issue it works around), ``jobscript`` (#SBATCH directives from a profile),
``preflight`` (fail-fast checks), ``status`` (snapshots for panels), ``tls`` (per-session
credentials), ``session`` (private directory, job-name tag), ``slurmcli`` (sbatch/squeue/scancel, job states),
``cleanup`` (``labkit cleanup``), ``sidebar`` (the dask-labextension factory).
"""

from __future__ import annotations

from .errors import ClusterConfigError, ClusterError, ClusterTimeout
from .handle import ClusterHandle
from .start import choose_profile, start_cluster

__all__ = ["ClusterConfigError", "ClusterError", "ClusterHandle", "ClusterTimeout", "choose_profile", "start_cluster"]
