"""Kubernetes workers through dask-kubernetes' operator: the DaskCluster resource labkit asks for.

``cluster_spec`` builds the ``DaskCluster`` dict that ``dask_kubernetes.operator.KubeCluster(custom_cluster_spec=...)``
creates (the shape of dask-kubernetes' own ``make_cluster_spec``): a scheduler pod and a worker group of
pods from the lab image (container/Dockerfile), one Dask worker each with its GPUs as
``resources.limits["nvidia.com/gpu"]``, as a non-root user on a read-only root filesystem. With TLS, the
session's certificates come from a Kubernetes Secret (:func:`tls_secret`) mounted into every pod.

Nothing here imports dask-kubernetes: the spec is plain data, tested without it. Starting a cluster
needs the package (``labkit[kubernetes]``) and a kube config; :func:`check_kubernetes_profile` says which
is missing before anything is created. Never run against a real cluster here (see README).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from distributed.comm.core import CommClosedError
from distributed.core import rpc

from ..config import IMAGE_PYTHON, Profile
from ..settings import Memory
from .errors import ClusterConfigError, ClusterTimeout
from .tls import SessionCredentials

__all__ = ["cluster_spec", "tls_secret", "find_kube_config", "import_kubecluster", "check_kubernetes_profile",
           "build_kubernetes_cluster", "tls_kube_cluster", "wait_for_scheduler_over"]

UID = 1000                       # the image's user `lab` (container/Dockerfile: USER 1000:1000)
TLS_MOUNT = "/etc/labkit/tls"    # where the Secret's ca.pem, cert.pem, key.pem appear in the pods
RUNS_MOUNT = "/mnt/labkit-runs"  # where shared_claim appears; LABKIT_RUN_DIR points there
SCHEDULER_PORT, DASHBOARD_PORT, WORKER_DASHBOARD_PORT = 8786, 8787, 8788
IDLE_TIMEOUT_S = 1800            # the operator deletes a cluster idle this long (a killed kernel's, too)
PACKAGE_FIX = "pip install dask-kubernetes (or labkit[kubernetes])"
# the scheduler's HTTP routes with TLS: distributed's defaults plus its API, through which the operator
# (which reaches the scheduler only over plain tcp:// or HTTP) checks idleness for idleTimeout and
# retires workers gracefully when scaling down; without it those fail over TLS (no idle clean-up,
# last-in-first-out deletion of worker pods)
SCHEDULER_HTTP_ROUTES = ["distributed.http.scheduler.prometheus", "distributed.http.scheduler.info",
                         "distributed.http.scheduler.json", "distributed.http.health", "distributed.http.proxy",
                         "distributed.http.statics", "distributed.http.scheduler.api"]


def quantity(memory: Memory) -> str:
    """A Kubernetes memory quantity in MiB: ``Memory("4GiB")`` -> ``"4096Mi"``."""
    return f"{max(1, memory.bytes // 2**20)}Mi"


def _security_contexts() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) securityContext: uid 1000, no privilege escalation, no capabilities, read-only root."""
    pod = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                 "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _env(profile: Profile, tls: bool) -> list[dict[str, str]]:
    """Environment of every pod: writable places on a read-only root, offline models, TLS from the Secret."""
    env = {"HOME": "/tmp", "DASK_TEMPORARY_DIRECTORY": "/tmp", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}  # tasks may start DataLoader workers, as on Slurm
    if profile.shared_claim:
        env["LABKIT_RUN_DIR"] = f"{RUNS_MOUNT}/runs"
    if tls:  # dask's config from the environment: every Security() in the pod (worker, scheduler, a task's client)
        env |= {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True", "DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME": "tls",
                "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": f"{TLS_MOUNT}/ca.pem"}
        for role in ("SCHEDULER", "WORKER", "CLIENT"):
            env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = f"{TLS_MOUNT}/cert.pem"
            env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = f"{TLS_MOUNT}/key.pem"
    return [{"name": k, "value": v} for k, v in env.items()]


def _volumes(profile: Profile, tls_secret_name: str | None, shm: bool) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): /tmp, /dev/shm for workers, the TLS Secret (0440, group 1000), the runs claim."""
    vols: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if shm:  # torch DataLoader workers share tensors through /dev/shm (64 MiB by default in a pod)
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if tls_secret_name:
        vols.append({"name": "tls", "secret": {"secretName": tls_secret_name, "defaultMode": 0o440}})
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
    if profile.shared_claim:
        vols.append({"name": "runs", "persistentVolumeClaim": {"claimName": profile.shared_claim}})
        mounts.append({"name": "runs", "mountPath": RUNS_MOUNT})
    return vols, mounts


def _pod(profile: Profile, container: dict[str, Any], volumes: list[dict], worker: bool) -> dict[str, Any]:
    """A pod spec around one container: security, service account, and (workers) node selector, tolerations."""
    pod_sc, _ = _security_contexts()
    pod: dict[str, Any] = {"securityContext": pod_sc, "volumes": volumes, "containers": [container],
                           "automountServiceAccountToken": bool(profile.service_account)}
    if profile.service_account:
        pod["serviceAccountName"] = profile.service_account
    if worker and profile.node_selector:
        pod["nodeSelector"] = dict(profile.node_selector)
    if worker and profile.tolerations:
        pod["tolerations"] = [dict(t) for t in profile.tolerations]
    return pod


def _need_image(profile: Profile) -> None:
    """A kubernetes profile names its image; ClusterConfigError with the key to set when it does not."""
    if not profile.image:
        raise ClusterConfigError(f"profile {profile.name!r} ({profile.source}) sets no image: set "
                                 f"profiles.{profile.name}.image (or start_cluster(image=...)) to the lab image "
                                 "(container/Dockerfile) in a registry your cluster pulls from")


def cluster_spec(profile: Profile, name: str, gpus_per_worker: int, workers: int = 0,
                 tls_secret_name: str | None = None) -> dict[str, Any]:
    """The ``DaskCluster`` resource for ``profile``: scheduler and ``workers`` worker pods, TLS from
    ``tls_secret_name`` (a Secret made by :func:`tls_secret`) when given."""
    _need_image(profile)
    tls = tls_secret_name is not None
    memory = profile.memory or Memory("4GiB")
    _, container_sc = _security_contexts()
    env = _env(profile, tls)
    pull = profile.image_pull_policy or "IfNotPresent"
    labels = {"app.kubernetes.io/part-of": "labkit", "labkit/session": name}

    worker_args = [IMAGE_PYTHON, "-m", "distributed.cli.dask_worker", "--name", "$(DASK_WORKER_NAME)",
                   "--nthreads", str(profile.cores), "--memory-limit", str(memory.bytes),
                   "--dashboard-address", str(WORKER_DASHBOARD_PORT), "--local-directory", "/tmp"]
    worker_env = list(env)
    if gpus_per_worker > 0:
        worker_args += ["--resources", f"GPU={gpus_per_worker}"]
    if tls:  # the operator fills in tcp://... only when the container names no scheduler address itself
        worker_env.append({"name": "DASK_SCHEDULER_ADDRESS", "value": f"tls://{name}-scheduler:{SCHEDULER_PORT}"})
    limits = {"memory": quantity(memory)} | ({"nvidia.com/gpu": str(gpus_per_worker)} if gpus_per_worker else {})
    worker_vols, worker_mounts = _volumes(profile, tls_secret_name, shm=True)
    worker = {"name": "worker", "image": profile.image, "imagePullPolicy": pull, "args": worker_args,
              "env": worker_env, "volumeMounts": worker_mounts, "securityContext": container_sc,
              "resources": {"requests": {"cpu": str(profile.cores), "memory": quantity(memory)}, "limits": limits},
              "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"}]}

    scheduler_args = [IMAGE_PYTHON, "-m", "distributed.cli.dask_scheduler", "--host", "0.0.0.0",
                      "--port", str(SCHEDULER_PORT), "--dashboard-address", f":{DASHBOARD_PORT}"]
    if tls:
        scheduler_args += ["--protocol", "tls"]
    sched_vols, sched_mounts = _volumes(profile, tls_secret_name, shm=False)
    sched_env = list(env)
    if tls:  # the operator speaks no TLS: it checks idleness and retires workers through the HTTP API instead
        sched_env.append({"name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES", "value": repr(SCHEDULER_HTTP_ROUTES)})
    health = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    scheduler = {"name": "scheduler", "image": profile.image, "imagePullPolicy": pull, "args": scheduler_args,
                 "env": sched_env, "volumeMounts": sched_mounts, "securityContext": container_sc,
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                 "ports": [{"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
                           {"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"}],
                 "readinessProbe": {**health, "periodSeconds": 2, "timeoutSeconds": 5},
                 "livenessProbe": {**health, "initialDelaySeconds": 15, "periodSeconds": 20}}
    service = {"type": "ClusterIP",
               "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
               "ports": [{"name": "tcp-comm", "protocol": "TCP", "port": SCHEDULER_PORT, "targetPort": "tcp-comm"},
                         {"name": "http-dashboard", "protocol": "TCP", "port": DASHBOARD_PORT,
                          "targetPort": "http-dashboard"}]}
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if profile.namespace:
        metadata["namespace"] = profile.namespace
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": metadata,
        "spec": {
            "idleTimeout": IDLE_TIMEOUT_S,
            "worker": {"replicas": workers, "spec": _pod(profile, worker, worker_vols, worker=True)},
            "scheduler": {"spec": _pod(profile, scheduler, sched_vols, worker=False), "service": service},
        },
    }


def tls_secret(name: str, credentials: SessionCredentials, namespace: str | None = None) -> dict[str, Any]:
    """The Secret ``name`` holding the session's ``ca.pem``, ``cert.pem`` and ``key.pem`` (for :func:`cluster_spec`)."""
    data = {p.name: base64.b64encode(p.read_bytes()).decode() for p in credentials.files()}
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "labkit"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata, "data": data}


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def find_kube_config(env: Mapping[str, str] | None = None, home: Path | None = None,
                     service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> str:
    """Where the Kubernetes credentials come from ($KUBECONFIG, ~/.kube/config, or in-cluster); ClusterConfigError
    naming each place looked at when there are none. Reads no file's contents and opens no connection."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home()) if home is None else home
    looked = []
    if env.get("KUBECONFIG"):
        paths = [p for p in env["KUBECONFIG"].split(os.pathsep) if p]
        found = [p for p in paths if Path(p).expanduser().is_file()]
        if found:
            return f"$KUBECONFIG ({', '.join(found)})"
        looked.append(f"$KUBECONFIG={env['KUBECONFIG']} (no such file)")
    default = home / ".kube" / "config"
    if default.is_file():
        return str(default)
    looked.append(f"{default} (no such file)")
    token = service_account_dir / "token"
    if env.get("KUBERNETES_SERVICE_HOST") and token.is_file():
        return f"in-cluster service account ({token})"
    looked.append(f"in-cluster service account ({'no $KUBERNETES_SERVICE_HOST' if not env.get('KUBERNETES_SERVICE_HOST') else f'no {token}'})")
    raise ClusterConfigError(
        "no Kubernetes credentials: looked at " + "; ".join(looked) + ". Fix: copy your cluster's kube config to "
        f"{default} (or point $KUBECONFIG at it), e.g. from your site's Kubernetes portal, and check it with "
        "`kubectl get pods`; inside a cluster, run the notebook in a pod with a service account")


def import_kubecluster() -> Any:
    """dask-kubernetes' operator ``KubeCluster`` class; ClusterConfigError with the install command when it is missing."""
    try:
        from dask_kubernetes.operator import KubeCluster  # lazy: dask-kubernetes is the optional labkit[kubernetes]
    except ImportError as exc:
        raise ClusterConfigError(f"the kubernetes profile needs dask-kubernetes, which is not installed "
                                 f"({exc}): {PACKAGE_FIX}") from exc
    return KubeCluster


def check_kubernetes_profile(profile: Profile, env: Mapping[str, str] | None = None) -> Any:
    """Pre-flight of a kubernetes profile (image, package, kube config, TLS); returns the KubeCluster class
    to build (with TLS, :func:`tls_kube_cluster` of dask-kubernetes' own)."""
    _need_image(profile)
    kube_cluster = import_kubecluster()
    find_kube_config(env)
    return tls_kube_cluster(kube_cluster) if profile.tls else kube_cluster


# dask-kubernetes' KubeCluster reaches its scheduler with plain ``rpc(address)`` objects and a module-level
# ``wait_for_scheduler_comm(address)`` (dask/dask-kubernetes#857: no ``security=``); these are the names
# :func:`tls_kube_cluster` relies on, checked before anything is created
_UPSTREAM_NAMES = ("wait_for_scheduler_comm", "_get_scheduler_address", "_create_cluster", "_connect_cluster")


async def wait_for_scheduler_over(address: str, connection_args: dict[str, Any], timeout: float | None = None) -> None:
    """Wait until the scheduler at ``address`` answers, connecting with ``connection_args`` (TLS's
    ``ssl_context``): dask-kubernetes' own wait knows only plain TCP. After ``timeout`` seconds (None:
    for ever, as upstream waits) a ClusterTimeout says what was tried and what to check."""
    loop = asyncio.get_running_loop()
    end = None if timeout is None else loop.time() + timeout
    while True:
        try:
            async with rpc(address, connection_args=connection_args) as comm:
                await comm.versions()
            return
        except (CommClosedError, OSError) as exc:  # ssl.SSLError is an OSError too
            if end is not None and loop.time() > end:
                raise ClusterTimeout(
                    f"the scheduler at {address} did not answer over TLS within {timeout:.0f} s (last: "
                    f"{type(exc).__name__}: {exc}). Fix: see its log with `kubectl logs -l "
                    "dask.org/component=scheduler` (a scheduler without the session's Secret mounted, or "
                    "one started before it, refuses these keys), or raise the profile's start_timeout") from exc
            await asyncio.sleep(0.1)


def tls_kube_cluster(kube_cluster: type) -> type:
    """``kube_cluster`` (dask-kubernetes' operator KubeCluster) made to reach a TLS scheduler with the
    session's keys: it takes ``security=`` (a :class:`distributed.Security`), turns the scheduler
    service's ``tcp://`` address (in-cluster or port-forwarded) into ``tls://``, waits for and talks to
    the scheduler with the security's client context, and hands the security on to ``Client(cluster)``.
    It also owns the TLS Secret (``tls_secret=``, a :func:`tls_secret` dict): created before the pods
    that mount it, deleted with the cluster. ClusterConfigError where this dask-kubernetes differs."""
    module = sys.modules[kube_cluster.__module__]
    missing = [n for n in _UPSTREAM_NAMES if not hasattr(module, n) and not hasattr(kube_cluster, n)]
    if missing:
        raise ClusterConfigError(
            f"this dask-kubernetes ({module.__name__}) lacks {', '.join(missing)}, which labkit uses to reach its "
            "scheduler over TLS. Fix: pip install 'dask-kubernetes>=2026.3,<2027' (what labkit was written "
            "against), or start_cluster(profile=..., tls=False) only in a namespace no one else can reach")

    class TLSKubeCluster(kube_cluster):  # type: ignore[misc, valid-type]
        __doc__ = tls_kube_cluster.__doc__

        def __init__(self, *, security: Any, tls_secret: dict[str, Any] | None = None, **kwargs: Any) -> None:
            self.security = security  # Client(cluster) takes it from here
            self._labkit_secret = tls_secret
            self._labkit_secret_made = False
            super().__init__(**kwargs)

        @property
        def scheduler_comm(self) -> Any:
            return self.__dict__.get("_labkit_scheduler_comm")

        @scheduler_comm.setter
        def scheduler_comm(self, comm: Any) -> None:
            # upstream assigns rpc(address) without connection args; give it the client's TLS context
            if comm is not None and not getattr(comm, "connection_args", None):
                comm = rpc(comm.address, connection_args=self.security.get_connection_args("client"))
            self.__dict__["_labkit_scheduler_comm"] = comm

        async def _get_scheduler_address(self) -> str:
            address = await super()._get_scheduler_address()
            return "tls://" + address.split("://", 1)[-1]

        @contextlib.contextmanager
        def _waits_over_tls(self) -> Any:
            """Upstream's module-level wait, for the length of one create/connect, as a TLS one."""
            args = self.security.get_connection_args("client")
            original = module.wait_for_scheduler_comm

            async def wait(address: str) -> None:
                await wait_for_scheduler_over(address, args, timeout=getattr(self, "_resource_timeout", None))

            module.wait_for_scheduler_comm = wait
            try:
                yield
            finally:
                module.wait_for_scheduler_comm = original

        async def _create_cluster(self) -> None:
            if self._labkit_secret is not None and not self._labkit_secret_made:
                await _apply_secret(self._labkit_secret, self.namespace)
                self._labkit_secret_made = True
            with self._waits_over_tls():
                await super()._create_cluster()

        async def _connect_cluster(self) -> None:
            with self._waits_over_tls():
                await super()._connect_cluster()

        async def _close(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super()._close(*args, **kwargs)
            finally:
                if self._labkit_secret_made:
                    self._labkit_secret_made = False
                    await _delete_secret(self._labkit_secret, self.namespace)

    TLSKubeCluster.__name__ = TLSKubeCluster.__qualname__ = f"TLS{kube_cluster.__name__}"
    return TLSKubeCluster


async def _apply_secret(secret: dict[str, Any], namespace: str | None) -> None:
    """Create the TLS Secret (kr8s, dask-kubernetes' own client); one left by a killed kernel is replaced."""
    from kr8s.asyncio.objects import Secret  # lazy: kr8s comes with the optional dask-kubernetes

    obj = await Secret(secret, namespace=namespace)
    if await obj.exists():
        await obj.delete()
    await obj.create()


async def _delete_secret(secret: dict[str, Any], namespace: str | None) -> None:
    """Delete the TLS Secret if it is there."""
    from kr8s.asyncio.objects import Secret  # lazy: kr8s comes with the optional dask-kubernetes

    obj = await Secret(secret, namespace=namespace)
    if await obj.exists():
        await obj.delete()


def build_kubernetes_cluster(profile: Profile, name: str, credentials: SessionCredentials | None,
                             gpus_per_worker: int, kube_cluster: Any, asynchronous: bool = False) -> Any:
    """A KubeCluster with no workers yet (scale it) from :func:`cluster_spec`; ``kube_cluster`` is the class
    :func:`check_kubernetes_profile` returned. With ``credentials`` the pods mount them from a Secret
    ``<name>-tls`` and everyone talks TLS. Contacts the Kubernetes API: never run here."""
    kwargs: dict[str, Any] = dict(namespace=profile.namespace, shutdown_on_close=True,
                                  resource_timeout=profile.start_timeout, asynchronous=asynchronous)
    if credentials is None:
        return kube_cluster(custom_cluster_spec=cluster_spec(profile, name, gpus_per_worker, workers=0), **kwargs)
    secret_name = f"{name}-tls"
    spec = cluster_spec(profile, name, gpus_per_worker, workers=0, tls_secret_name=secret_name)
    return kube_cluster(custom_cluster_spec=spec, security=credentials.security(),
                        tls_secret=tls_secret(secret_name, credentials, profile.namespace), **kwargs)
