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

import base64
import inspect
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import IMAGE_PYTHON, Profile
from ..settings import Memory
from .errors import ClusterConfigError
from .tls import SessionCredentials

__all__ = ["cluster_spec", "tls_secret", "find_kube_config", "import_kubecluster", "check_kubernetes_profile",
           "build_kubernetes_cluster"]

UID = 1000                       # the image's user `lab` (container/Dockerfile: USER 1000:1000)
TLS_MOUNT = "/etc/labkit/tls"    # where the Secret's ca.pem, cert.pem, key.pem appear in the pods
RUNS_MOUNT = "/mnt/labkit-runs"  # where shared_claim appears; LABKIT_RUN_DIR points there
SCHEDULER_PORT, DASHBOARD_PORT, WORKER_DASHBOARD_PORT = 8786, 8787, 8788
IDLE_TIMEOUT_S = 1800            # the operator deletes a cluster idle this long (a killed kernel's, too)
PACKAGE_FIX = "pip install dask-kubernetes (or labkit[kubernetes])"


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
    health = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    scheduler = {"name": "scheduler", "image": profile.image, "imagePullPolicy": pull, "args": scheduler_args,
                 "env": env, "volumeMounts": sched_mounts, "securityContext": container_sc,
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
    """Pre-flight of a kubernetes profile (image, package, kube config, TLS); returns the KubeCluster class."""
    where = f"profile {profile.name!r} ({profile.source})"
    _need_image(profile)
    kube_cluster = import_kubecluster()
    find_kube_config(env)
    if profile.tls and "security" not in inspect.signature(kube_cluster).parameters:
        raise ClusterConfigError(
            f"{where} asks for TLS (tls: true), but this dask-kubernetes' KubeCluster takes no security= and "
            "talks to its scheduler over plain tcp:// (its operator/networking.py), so it cannot reach a TLS "
            "scheduler (dask/dask-kubernetes#857). labkit will not start an unencrypted cluster silently. Fix: "
            "start_cluster(profile=..., tls=False) only in a namespace no one else can reach (a NetworkPolicy "
            "that admits only your own pods), or use a Slurm profile")
    return kube_cluster


def build_kubernetes_cluster(profile: Profile, name: str, credentials: SessionCredentials | None,
                             gpus_per_worker: int, kube_cluster: Any, asynchronous: bool = False) -> Any:
    """A KubeCluster with no workers yet (scale it) from :func:`cluster_spec`; ``kube_cluster`` is the class
    :func:`check_kubernetes_profile` returned. Contacts the Kubernetes API: never run here."""
    if credentials is not None:  # check_kubernetes_profile refuses tls until dask-kubernetes can do it
        raise ClusterConfigError("TLS on Kubernetes is not supported by the installed dask-kubernetes")
    spec = cluster_spec(profile, name, gpus_per_worker, workers=0)
    return kube_cluster(custom_cluster_spec=spec, namespace=profile.namespace, shutdown_on_close=True,
                        resource_timeout=profile.start_timeout, asynchronous=asynchronous)
