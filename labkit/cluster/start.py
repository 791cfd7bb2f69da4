"""start_cluster: pick a profile (local, Slurm or Kubernetes), check it, start workers, wait with feedback."""

from __future__ import annotations

from typing import Any, Callable

from distributed import Client

from ..config import ConfigError, LabConfig, Profile, load_config
from . import slurmcli
from .cleanup import cleanup
from .errors import ClusterConfigError
from .handle import ClusterHandle
from .kubernetes import build_kubernetes_cluster, check_kubernetes_profile
from .local import MAIN_GUARD_FIX, build_local_cluster, importing_main_in_a_child
from .preflight import check_slurm_profile
from .session import Session, end_session, stale_sessions
from .slurm import build_slurm_cluster
from .tls import SessionCredentials
from .watchdog import spawn


def slurm_answers(timeout: float = 5.0) -> tuple[bool, str]:
    """Whether sbatch exists and squeue answers, and why not."""
    if slurmcli.which("sbatch") is None:
        return False, "sbatch is not on PATH"
    try:
        slurmcli.run(["squeue", "-h", "-u", "nobody-labkit-probe"], timeout=timeout, check=False)
        slurmcli.run(["sinfo", "-h", "-o", "%P"], timeout=timeout)
    except Exception as exc:  # ClusterError from a missing tool, a timeout or an error answer
        return False, str(exc)
    return True, "sbatch and squeue answer"


def choose_profile(cfg: LabConfig, requested: str | None) -> tuple[Profile, str]:
    """The profile to use and why: asked for, set as active, or auto (Slurm when configured and answering)."""
    if requested is not None:
        return cfg.profile(requested), f"profile {requested!r} asked for"
    if cfg.default_profile != "auto":
        return cfg.profile(cfg.default_profile), f"active profile {cfg.default_profile!r} ({cfg._who_set('profile')})"
    slurm_names = sorted((n for n in cfg.configured_profiles if cfg.profiles[n].kind == "slurm"),
                         key=lambda n: (n != "slurm", n))
    if not slurm_names:
        return cfg.profile("local"), "auto: no Slurm profile configured in a site or user file, so local"
    ok, why = slurm_answers()
    if ok:
        return cfg.profile(slurm_names[0]), f"auto: Slurm profile {slurm_names[0]!r} configured and {why}"
    return cfg.profile("local"), f"auto: Slurm profile {slurm_names[0]!r} configured but {why}, so local"


def resolve_profile(profile: str | None, overrides: dict[str, Any], caller: str = "start_cluster") -> tuple[Profile, str]:
    """The chosen profile with overrides applied (validated like a file), and why it was chosen."""
    prof, reason = choose_profile(load_config(), profile)
    if overrides:
        try:
            prof = prof.replace(**overrides)
        except ConfigError as exc:
            raise ClusterConfigError(f"{caller}({', '.join(f'{k}={v!r}' for k, v in overrides.items())}): {exc}") from exc
    return prof, reason


def build_cluster(prof: Profile, workers: int, gpus: int, asynchronous: bool = False) -> tuple[Any, Session, Any, str]:
    """Pre-flight, a fresh session (keys, logs) and the cluster object (no Slurm job yet, no local worker)."""
    if prof.kind == "slurm":
        check_slurm_profile(prof, gpus)
        cleanup()  # jobs a killed kernel left queued (running ones end by themselves): cancel them now
    kube_cluster = check_kubernetes_profile(prof) if prof.kind == "kubernetes" else None
    for stale in stale_sessions():  # keys left by a killed kernel on this host
        stale.remove()
    session = Session.create()
    creds = SessionCredentials.create(session.path / "tls") if prof.tls else None
    try:
        if prof.kind == "slurm":
            cluster = build_slurm_cluster(prof, session, creds, gpus, asynchronous=asynchronous)
            note = f"{gpus} GPU(s) per worker via --gres=gpu:{gpus}" if gpus else "no GPUs"
            if prof.workers_per_job > 1:
                per_job = f"{prof.workers_per_job} workers per job"
                note = f"{per_job} (--gres=gpu:{gpus * prof.workers_per_job}), {gpus} GPU(s) each" if gpus else f"{per_job}, no GPUs"
        elif prof.kind == "kubernetes":
            cluster = build_kubernetes_cluster(prof, session.job_name, creds, gpus, kube_cluster, asynchronous=asynchronous)
            note = f"{gpus} GPU(s) per worker pod via resources.limits nvidia.com/gpu" if gpus else "no GPUs"
        else:
            cluster, note = build_local_cluster(prof, workers, gpus, security=creds.security() if creds else None,
                                                name=session.job_name, asynchronous=asynchronous)
    except BaseException:
        end_session(session, creds, slurm=False)
        raise
    return cluster, session, creds, note


def start_cluster(profile: str | None = None, workers: int | None = None, gpus_per_worker: int | None = None,
                  wait: bool = True, timeout: float | None = None, *, say: Callable[[str], None] = print,
                  **overrides: Any) -> ClusterHandle:
    """Start Dask workers locally, as Slurm jobs or as Kubernetes pods (same notebook code); returns a ClusterHandle.

    ``overrides`` are profile keys (``partition=``, ``walltime=``, ``account=``, ``memory=``,
    ``job_extra=``, ``workers_per_job=``, ``signal=`` ...). With ``wait`` it blocks until the workers joined, reporting pending jobs,
    and raises ClusterTimeout (jobs cancelled) after ``timeout`` seconds.
    """
    if importing_main_in_a_child():
        raise ClusterConfigError(f"start_cluster ran in a Dask worker process that was importing your script: {MAIN_GUARD_FIX}")
    prof, reason = resolve_profile(profile, overrides)
    n = prof.workers if workers is None else workers
    gpus = prof.gpus_per_worker if gpus_per_worker is None else gpus_per_worker
    if n < 0 or gpus < 0:
        raise ClusterConfigError(f"workers={n}, gpus_per_worker={gpus}: both must be >= 0")
    say(f"labkit: starting a {prof.kind} cluster with profile {prof.name!r} ({reason})")
    cluster, session, creds, note = build_cluster(prof, n, gpus)
    try:
        client = Client(cluster, security=creds.security()) if creds else Client(cluster)
    except BaseException:
        cluster.close()
        end_session(session, creds, slurm=False)
        raise
    handle = ClusterHandle(cluster=cluster, client=client, profile=prof, kind=prof.kind, session=session,
                           credentials=creds, gpus_per_worker=gpus, note=note, say=say, target=n)
    if prof.kind == "slurm":  # cancels queued jobs too if this kernel is killed (see labkit.cluster.watchdog)
        handle.watchdog = spawn(session)
    if note:
        say(f"labkit: GPUs: {note}")
    try:
        handle.scale(n)
        if wait:
            handle.wait(n, timeout)
    except BaseException:
        handle.close()
        raise
    say(f"labkit: {len(client.nthreads())} worker(s) ready at {handle.address}; dashboard {handle.dashboard_link}")
    return handle
