"""The kubernetes profile: the DaskCluster spec labkit builds, and the errors before anything is created.

No Kubernetes runs here: the spec is plain data, its commands are parsed by distributed's own command
lines, its TLS environment is read by dask's config, and ``start_cluster`` is followed up to a stand-in
KubeCluster. With TLS, dask-kubernetes' real KubeCluster (a test dependency) starts as labkit subclasses
it, against a real TLS scheduler and worker on this host; only the Kubernetes API is stood in.
"""

from __future__ import annotations

import base64
import importlib
import sys
import types
import weakref

import dask.config
import pytest
from distributed.cli import dask_scheduler, dask_worker
from distributed.security import Security

from labkit.cluster import ClusterConfigError, start_cluster
from labkit.cluster import kubernetes as K
from labkit.cluster.tls import SessionCredentials
from labkit.config import IMAGE_PYTHON, load_config

IMAGE = "registry.example.org/lab/labkit:cuda"


def k8s(**overrides):
    return load_config().profile("k8s").replace(image=IMAGE, **overrides)


def _pods(spec):
    worker = spec["spec"]["worker"]["spec"]
    scheduler = spec["spec"]["scheduler"]["spec"]
    return worker, worker["containers"][0], scheduler, scheduler["containers"][0]


def _dotted(tree, prefix=""):
    """A nested config dict as ``{"a.b.c": value}``, so that setting it changes only those keys."""
    out = {}
    for k, v in tree.items():
        out |= _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _env(container):
    return {e["name"]: e["value"] for e in container["env"]}


def test_default_profile_is_kubernetes_and_not_chosen_by_auto():
    cfg = load_config()
    prof = cfg.profile("k8s")
    assert prof.kind == "kubernetes" and prof.tls and prof.gpus_per_worker == 1 and prof.image is None
    assert cfg.default_profile == "auto" and "k8s" not in cfg.configured_profiles


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_gpus_become_resource_limits(gpus):
    spec = K.cluster_spec(k8s(memory="8GiB", cores=4), "labkit-abc", gpus, workers=3)
    _, worker, _, _ = _pods(spec)
    res = worker["resources"]
    assert res["requests"] == {"cpu": "4", "memory": "8192Mi"}
    assert res["limits"] == ({"memory": "8192Mi", "nvidia.com/gpu": str(gpus)} if gpus else {"memory": "8192Mi"})
    args = worker["args"]
    assert ("--resources" in args) == bool(gpus) and (not gpus or args[args.index("--resources") + 1] == f"GPU={gpus}")
    assert args[args.index("--memory-limit") + 1] == str(8 * 2**30) and args[args.index("--nthreads") + 1] == "4"
    assert spec["spec"]["worker"]["replicas"] == 3


def test_spec_shape_is_the_operators():
    spec = K.cluster_spec(k8s(namespace="lab-ns"), "labkit-abc", 1)
    assert spec["apiVersion"] == "kubernetes.dask.org/v1" and spec["kind"] == "DaskCluster"
    assert spec["metadata"] == {"name": "labkit-abc", "namespace": "lab-ns",
                                "labels": {"app.kubernetes.io/part-of": "labkit", "labkit/session": "labkit-abc"}}
    _, worker, _, scheduler = _pods(spec)
    assert worker["image"] == scheduler["image"] == IMAGE and worker["imagePullPolicy"] == "IfNotPresent"
    assert worker["args"][:3] == [IMAGE_PYTHON, "-m", "distributed.cli.dask_worker"]
    assert worker["args"][0] == IMAGE_PYTHON and "$(DASK_WORKER_NAME)" in worker["args"]
    service = spec["spec"]["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": "labkit-abc", "dask.org/component": "scheduler"}
    assert [p["name"] for p in service["ports"]] == ["tcp-comm", "http-dashboard"]
    assert "namespace" not in K.cluster_spec(k8s(), "labkit-abc", 1)["metadata"], "none: the kube config's own"


@pytest.mark.parametrize("tls", [False, True])
def test_commands_parse_with_distributeds_own_command_lines(tls):
    spec = K.cluster_spec(k8s(), "labkit-abc", 2, tls_secret_name="labkit-abc-tls" if tls else None)
    _, worker, _, scheduler = _pods(spec)
    for cli, args in ((dask_worker.main, worker["args"]), (dask_scheduler.main, scheduler["args"])):
        assert args[1] == "-m"
        ctx = cli.make_context(args[2], args[3:])  # parses and checks every option, runs nothing
        if cli is dask_scheduler.main:
            assert ctx.params["protocol"] == ("tls" if tls else None) and str(ctx.params["port"]) == "8786"


def test_tls_mounts_the_secret_and_configures_dask():
    spec = K.cluster_spec(k8s(), "labkit-abc", 1, tls_secret_name="labkit-abc-tls")
    for pod, container in (_pods(spec)[:2], _pods(spec)[2:]):
        vol = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert vol["secret"] == {"secretName": "labkit-abc-tls", "defaultMode": 0o440}
        assert {"name": "tls", "mountPath": K.TLS_MOUNT, "readOnly": True} in container["volumeMounts"]
        env = _env(container)
        with dask.config.set(_dotted(dask.config.collect_env(env))):  # what dask in the pod reads from it
            sec = Security()
        assert sec.require_encryption and sec.tls_ca_file == f"{K.TLS_MOUNT}/ca.pem"
        assert sec.tls_worker_cert == sec.tls_scheduler_cert == sec.tls_client_cert == f"{K.TLS_MOUNT}/cert.pem"
        assert sec.tls_worker_key == f"{K.TLS_MOUNT}/key.pem"
    worker_env = _env(_pods(spec)[1])
    assert worker_env["DASK_SCHEDULER_ADDRESS"] == "tls://labkit-abc-scheduler:8786"
    # the operator cannot speak TLS: the scheduler serves its HTTP API (idleness, retiring workers) besides
    # distributed's default routes, as dask in the pod reads the setting
    with dask.config.set(_dotted(dask.config.collect_env(_env(_pods(spec)[3])))):
        routes = dask.config.get("distributed.scheduler.http.routes")
    defaults = dask.config.get("distributed.scheduler.http.routes")
    assert routes == defaults + ["distributed.http.scheduler.api"]
    for name in routes:
        importlib.import_module(name)  # each is a module distributed has
    assert not [e for e in worker_env if "ROUTES" in e]


def test_without_tls_no_secret_and_no_tls_settings():
    spec = K.cluster_spec(k8s(tls=False), "labkit-abc", 1)
    for pod, container in (_pods(spec)[:2], _pods(spec)[2:]):
        assert all("secret" not in v for v in pod["volumes"])
        assert not [k for k in _env(container) if "TLS" in k or k == "DASK_SCHEDULER_ADDRESS"]


def test_pods_run_as_non_root_on_a_read_only_root():
    spec = K.cluster_spec(k8s(), "labkit-abc", 1)
    for pod, container in (_pods(spec)[:2], _pods(spec)[2:]):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"] and _env(container)["HOME"] == "/tmp"
        assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    worker_pod = _pods(spec)[0]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in worker_pod["volumes"]


def test_site_settings_reach_the_pods():
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    prof = k8s(service_account="lab-sa", image_pull_policy="Always", node_selector={"gpu": "a100"},
               tolerations=[tol], shared_claim="lab-runs")
    worker_pod, worker, sched_pod, scheduler = _pods(K.cluster_spec(prof, "labkit-abc", 1))
    assert worker_pod["nodeSelector"] == {"gpu": "a100"} and worker_pod["tolerations"] == [tol]
    assert "nodeSelector" not in sched_pod and "tolerations" not in sched_pod, "the scheduler needs no GPU node"
    for pod, container in ((worker_pod, worker), (sched_pod, scheduler)):
        assert pod["serviceAccountName"] == "lab-sa" and pod["automountServiceAccountToken"] is True
        assert container["imagePullPolicy"] == "Always"
        assert {"name": "runs", "persistentVolumeClaim": {"claimName": "lab-runs"}} in pod["volumes"]
        assert _env(container)["LABKIT_RUN_DIR"] == f"{K.RUNS_MOUNT}/runs"


def test_tls_secret_holds_the_session_files(tmp_path):
    creds = SessionCredentials.create(tmp_path / "tls")
    secret = K.tls_secret("labkit-abc-tls", creds, namespace="lab-ns")
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == "lab-ns"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        p.name: p.read_text() for p in creds.files()}


def test_profile_errors_name_the_key():
    with pytest.raises(ClusterConfigError, match=r"sets no image: set profiles.k8s.image"):
        K.cluster_spec(load_config().profile("k8s"), "labkit-abc", 1)
    with pytest.raises(Exception, match="image_pull_policy must be 'Always', 'IfNotPresent' or 'Never'"):
        k8s(image_pull_policy="sometimes")
    with pytest.raises(Exception, match="profiles.k8s: container only applies to kind: slurm"):
        k8s(container={"image": "/x.sif"})


def test_new_kubernetes_profile_starts_from_the_packaged_one(tmp_path, monkeypatch):
    user = tmp_path / "user.yaml"
    user.write_text("profiles:\n  gpu-cloud:\n    kind: kubernetes\n    image: reg/labkit:cuda\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    prof = load_config().profile("gpu-cloud")
    assert (prof.tls, prof.memory, prof.start_timeout, prof.image) == (True, "4GiB", 600, "reg/labkit:cuda")


# --------------------------------------------------------------------------------- pre-flight, start


def test_kube_config_lookup(tmp_path):
    sa = tmp_path / "sa"
    with pytest.raises(ClusterConfigError) as err:
        K.find_kube_config({"KUBECONFIG": str(tmp_path / "nope")}, home=tmp_path, service_account_dir=sa)
    msg = str(err.value)
    assert "$KUBECONFIG=" in msg and f"{tmp_path}/.kube/config (no such file)" in msg
    assert "no $KUBERNETES_SERVICE_HOST" in msg and "kubectl get pods" in msg
    sa.mkdir()
    (sa / "token").write_text("t")
    assert "in-cluster" in K.find_kube_config({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, home=tmp_path, service_account_dir=sa)
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("")
    assert K.find_kube_config({}, home=tmp_path, service_account_dir=sa) == str(tmp_path / ".kube" / "config")
    other = tmp_path / "other"
    other.write_text("")
    assert str(other) in K.find_kube_config({"KUBECONFIG": f"{tmp_path}/nope:{other}"}, home=tmp_path)


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(ClusterConfigError, match=r"needs dask-kubernetes.*pip install dask-kubernetes \(or labkit\[kubernetes\]\)"):
        start_cluster(profile="k8s", image=IMAGE, say=lambda s: None)


class FakeKubeCluster:
    """Stands in for dask_kubernetes.operator.KubeCluster: records what labkit passes, starts nothing."""

    made: list = []

    def __init__(self, *, custom_cluster_spec=None, namespace=None, shutdown_on_close=None, resource_timeout=None,
                 asynchronous=False, **kwargs):
        self.spec, self.namespace, self.kwargs = custom_cluster_spec, namespace, kwargs
        self.shutdown_on_close = shutdown_on_close
        FakeKubeCluster.made.append(self)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_operator(monkeypatch, tmp_path):
    """A dask_kubernetes.operator module with FakeKubeCluster, and a kube config file that is never read."""
    pkg, op = types.ModuleType("dask_kubernetes"), types.ModuleType("dask_kubernetes.operator")
    op.KubeCluster = FakeKubeCluster
    pkg.operator = op
    monkeypatch.setitem(sys.modules, "dask_kubernetes", pkg)
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", op)
    config = tmp_path / "kubeconfig"
    config.write_text("")
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path / "state"))
    FakeKubeCluster.made = []
    return FakeKubeCluster


def test_missing_kube_config_fails_before_any_cluster(fake_operator, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterConfigError, match="no Kubernetes credentials: looked at"):
        start_cluster(profile="k8s", image=IMAGE, tls=False, say=lambda s: None)
    assert fake_operator.made == []


def test_tls_needs_the_kubecluster_labkit_was_written_for(fake_operator):
    """The stand-in has none of dask-kubernetes' internals that the TLS subclass relies on: refused at once."""
    with pytest.raises(ClusterConfigError, match=r"lacks wait_for_scheduler_comm.*dask-kubernetes>=2026.3.*tls=False"):
        start_cluster(profile="k8s", image=IMAGE, say=lambda s: None)
    assert fake_operator.made == []


def test_start_cluster_with_tls_hands_the_session_keys_to_the_cluster(fake_operator, monkeypatch):
    from labkit.cluster import start as start_mod

    async def wait_for_scheduler_comm(address):  # the name upstream's module has
        raise AssertionError("not reached: the stand-in starts nothing")

    sys.modules["dask_kubernetes.operator"].wait_for_scheduler_comm = wait_for_scheduler_comm
    monkeypatch.setattr(FakeKubeCluster, "__module__", "dask_kubernetes.operator", raising=False)
    for name in ("_get_scheduler_address", "_create_cluster", "_connect_cluster"):
        monkeypatch.setattr(FakeKubeCluster, name, lambda self: None, raising=False)

    class Stop(Exception):
        pass

    seen = {}

    def no_client(cluster, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(start_mod, "Client", no_client)
    with pytest.raises(Stop):
        start_cluster(profile="k8s", image=IMAGE, namespace="lab-ns", say=lambda s: None)
    (made,) = fake_operator.made
    name = made.spec["metadata"]["name"]
    assert type(made).__name__ == "TLSFakeKubeCluster" and made.closed
    assert made.security.require_encryption and made.security.tls_ca_file.endswith("ca.pem")
    assert seen["security"].tls_ca_file == made.security.tls_ca_file  # the client uses the same session keys
    secret = made._labkit_secret
    assert secret["metadata"] == {"name": f"{name}-tls", "namespace": "lab-ns",
                                  "labels": {"app.kubernetes.io/part-of": "labkit"}}
    assert sorted(secret["data"]) == ["ca.pem", "cert.pem", "key.pem"]
    for part in ("worker", "scheduler"):
        vols = made.spec["spec"][part]["spec"]["volumes"]
        assert {"name": "tls", "secret": {"secretName": f"{name}-tls", "defaultMode": 0o440}} in vols


class FakeKubernetesAPI:
    """The Kubernetes API as dask-kubernetes' KubeCluster sees it through kr8s: a DaskCluster resource that
    can be created, read and deleted, a scheduler pod and service that are ready at once, and the
    scheduler's address as a port-forward gives it (tcp://127.0.0.1:<port>)."""

    def __init__(self, port: int) -> None:
        self.port, self.clusters, self.log = port, {}, []

    def install(self, monkeypatch, module, kube_cluster) -> None:
        api = self

        class DaskCluster:
            def __init__(self, spec_or_name, namespace=None, **kw):
                self.name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name["metadata"]["name"]
                self.namespace = namespace

            def __await__(self):
                async def me():
                    return self
                return me().__await__()

            @classmethod
            async def get(cls, name, namespace=None, **kw):
                return cls(name, namespace)

            async def exists(self):
                return self.name in api.clusters

            async def create(self):
                api.log.append(("create cluster", self.name, self.namespace))
                api.clusters[self.name] = self

            async def delete(self):
                api.log.append(("delete cluster", self.name))
                api.clusters.pop(self.name, None)

        async def nothing(*a, **kw):
            return None

        async def scheduler_address(service, namespace, port_name="tcp-comm", **kw):
            api.log.append(("address", service, port_name))
            return f"tcp://127.0.0.1:{api.port if port_name == 'tcp-comm' else 1}"

        monkeypatch.setattr(module, "DaskCluster", DaskCluster)
        monkeypatch.setattr(module, "wait_for_scheduler", nothing)
        monkeypatch.setattr(module, "wait_for_service", nothing)
        monkeypatch.setattr(module, "get_scheduler_address", scheduler_address)
        monkeypatch.setattr(kube_cluster, "_wait_for_controller", nothing)
        monkeypatch.setattr(kube_cluster, "_watch_component_status", nothing)

        async def apply(secret, namespace):
            api.log.append(("create secret", secret["metadata"]["name"], namespace))

        async def delete(secret, namespace):
            api.log.append(("delete secret", secret["metadata"]["name"], namespace))

        monkeypatch.setattr(K, "_apply_secret", apply)
        monkeypatch.setattr(K, "_delete_secret", delete)


def test_kubecluster_reaches_a_tls_scheduler_with_the_session_keys(tmp_path, monkeypatch):
    """dask-kubernetes' own KubeCluster, as labkit subclasses it, against a real TLS scheduler and worker:
    it waits for the scheduler over TLS, talks to it over TLS, and a Client made from it alone (no
    security= passed) runs a task. dask-kubernetes unchanged cannot: it waits over plain TCP forever."""
    import asyncio

    from dask_kubernetes.operator import KubeCluster
    from dask_kubernetes.operator.kubecluster import kubecluster as upstream
    from distributed import Client, Scheduler, Worker
    from tornado.ioloop import IOLoop

    creds = SessionCredentials.create(tmp_path / "tls")
    security = creds.security()
    spec = K.cluster_spec(k8s(tls=True), "labkit-tlstest", 0, tls_secret_name="labkit-tlstest-tls")
    secret = K.tls_secret("labkit-tlstest-tls", creds, namespace="lab-ns")
    original_wait = upstream.wait_for_scheduler_comm
    TLSKubeCluster = K.tls_kube_cluster(KubeCluster)
    # upstream closes every KubeCluster it made at exit; these two live and die inside this test's loop
    monkeypatch.setattr(KubeCluster, "_instances", weakref.WeakSet())

    async def main():
        async with Scheduler(security=security, protocol="tls", host="127.0.0.1", port=0,
                             dashboard_address=":0") as scheduler:
            assert scheduler.address.startswith("tls://")
            api = FakeKubernetesAPI(int(scheduler.address.rsplit(":", 1)[1]))
            api.install(monkeypatch, upstream, KubeCluster)
            async with Worker(scheduler.address, security=security, nthreads=1, dashboard_address=":0"):
                # unchanged dask-kubernetes: its wait speaks plain TCP to a TLS listener and never gets through
                here = IOLoop.current()  # given, so that upstream's __init__ leaves the start to the await
                plain = KubeCluster(custom_cluster_spec=spec, namespace="lab-ns", asynchronous=True, quiet=True,
                                    shutdown_on_close=True, loop=here)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(plain._start(), timeout=3)
                await plain._close()
                api.clusters.clear()
                api.log.clear()
                cluster = await TLSKubeCluster(custom_cluster_spec=spec, namespace="lab-ns", asynchronous=True,
                                               quiet=True, loop=here, shutdown_on_close=True, security=security,
                                               tls_secret=secret)
                assert upstream.wait_for_scheduler_comm is original_wait, "the TLS wait is scoped to the start"
                assert cluster.scheduler_address == f"tls://127.0.0.1:{api.port}"
                async with Client(cluster, asynchronous=True) as client:  # the security comes from the cluster
                    assert await client.submit(lambda x: x + 1, 41) == 42
                    assert client.scheduler.address == cluster.scheduler_address
                await cluster.close()
                return api.log

    log = asyncio.run(main())
    assert log[0] == ("create secret", "labkit-tlstest-tls", "lab-ns"), "the Secret exists before the pods that mount it"
    assert ("create cluster", "labkit-tlstest", "lab-ns") in log and log[1:].index(("create cluster", "labkit-tlstest", "lab-ns")) >= 0
    assert log[-2:] == [("delete cluster", "labkit-tlstest"), ("delete secret", "labkit-tlstest-tls", "lab-ns")]


def test_start_cluster_dispatches_to_kubecluster(fake_operator, monkeypatch):
    from labkit.cluster import start as start_mod

    class Stop(Exception):
        pass

    def no_client(cluster, **kw):  # the spec is what this test checks: stop before connecting anywhere
        raise Stop

    monkeypatch.setattr(start_mod, "Client", no_client)
    said = []
    with pytest.raises(Stop):
        start_cluster(profile="k8s", image=IMAGE, tls=False, namespace="lab-ns", gpus_per_worker=2, say=said.append)
    (made,) = fake_operator.made
    assert made.namespace == "lab-ns" and made.shutdown_on_close is True and made.closed
    assert made.spec["metadata"]["name"].startswith("labkit-") and made.spec["spec"]["worker"]["replicas"] == 0
    assert made.spec["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "starting a kubernetes cluster with profile 'k8s'" in said[0]


def test_a_scheduler_that_refuses_the_keys_is_a_clear_timeout_not_a_hang(tmp_path):
    """A real TLS scheduler holding another session's keys: the TLS wait gives up after its timeout
    with what it tried and where to look, where dask-kubernetes' own wait would retry for ever."""
    import asyncio

    from distributed import Scheduler

    from labkit.cluster import ClusterTimeout

    theirs = SessionCredentials.create(tmp_path / "theirs").security()
    ours = SessionCredentials.create(tmp_path / "ours").security()

    async def main():
        async with Scheduler(security=theirs, protocol="tls", host="127.0.0.1", port=0, dashboard_address=":0") as s:
            await K.wait_for_scheduler_over(s.address, theirs.get_connection_args("client"), timeout=5)  # its own keys: in
            with pytest.raises(ClusterTimeout) as err:
                await K.wait_for_scheduler_over(s.address, ours.get_connection_args("client"), timeout=1)
            return s.address, str(err.value)

    address, message = asyncio.run(main())
    assert address in message and "did not answer over TLS within 1 s" in message
    assert "kubectl logs -l dask.org/component=scheduler" in message and "start_timeout" in message
