"""labkit across hosts: Dask workers as Slurm jobs on two compute hosts of the cluster in a box.

node1 and node2 (partition ``nodes``) each have their own hostname, address and /tmp; this host is
the login node where the scheduler runs. See tests/multinode.py and scripts/local-slurm.sh.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import psutil
import pytest
import torch
from distributed.comm import get_address_host

from labkit.checkpoint import list_checkpoints
from labkit.cluster import ClusterConfigError, ClusterError, start_cluster
from labkit.core.shared import SharedFolderError
from labkit.data import DataConfig, preprocess
from labkit.data.shards import make_tiny_shards
from labkit.train import TrainConfig, train, train_distributed
from multinode import IFACE, NODES, PARTITION, PROLOGUE, REPO, nodes, shared_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # client.run ships these helpers by value


def _rank_env() -> dict:
    import os
    import socket

    return {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES")} | {
        "host": socket.gethostname()}


def _iface_addrs() -> list[str]:
    import socket

    import psutil

    return [a.address for a in psutil.net_if_addrs().get("labkit0", []) if a.family == socket.AF_INET]


@pytest.fixture(scope="module")
def four(nodes):
    """Four 1-GPU workers over the two compute hosts (2 GPUs each), TLS, interface labkit0."""
    lines: list[str] = []
    handle = start_cluster("slurm", workers=4, gpus_per_worker=1, partition=PARTITION, interface=IFACE, cores=1,
                           memory="1GiB", timeout=180, say=lines.append, prologue=PROLOGUE)
    handle.say_lines = lines
    yield handle
    handle.close()


def test_workers_land_on_both_nodes_with_their_own_gpus(four, nodes):
    from labkit.hardware import inspect_cluster

    hosts = four.hosts()
    assert collections.Counter(hosts.values()) == {"node1": 2, "node2": 2}, hosts
    worker_ips = {get_address_host(a) for a in four.workers()}
    assert worker_ips == {nodes["node1"], nodes["node2"]}  # each node's own address, none loopback
    assert not any(ip.startswith("127.") for ip in worker_ips)
    by_node = four.gpu_map(by_node=True)
    assert sorted(by_node) == list(NODES)
    for node, workers in by_node.items():  # Slurm gave the two jobs on a node its two GPUs, one each
        assert sorted(i for ids in workers.values() for i in ids) == ["0", "1"], (node, workers)
    rows = inspect_cluster(four.client)
    assert collections.Counter(r.host for r in rows) == {"node1": 2, "node2": 2}
    text = four.status().text()
    assert "node1" in text and "node2" in text


def test_scheduler_and_workers_bind_the_profile_interface(four):
    here = [a.address for a in psutil.net_if_addrs()[IFACE] if a.family == 2]
    assert get_address_host(four.address) in here  # the scheduler: labkit0 of the login node
    on_worker = four.client.run(_iface_addrs)
    for addr, ips in on_worker.items():
        assert get_address_host(addr) in ips  # each worker: labkit0 of its own node
    env = four.client.run(_rank_env)
    assert {e["GLOO_SOCKET_IFNAME"] for e in env.values()} == {IFACE}
    assert {e["NCCL_SOCKET_IFNAME"] for e in env.values()} == {IFACE}


TLS_PROBE = textwrap.dedent("""
    import json, socket, sys
    from distributed import Client
    from distributed.security import Security
    addr, ca, cert, key = sys.argv[1:5]
    out = {"host": socket.gethostname()}
    for name, kwargs in [("plain", {"address": "tcp://" + addr.removeprefix("tls://")}),
                         ("foreign", {"address": addr, "security": Security.temporary()}),
                         ("session", {"address": addr, "security": Security(require_encryption=True, tls_ca_file=ca,
                                      tls_client_cert=cert, tls_client_key=key)})]:
        try:
            c = Client(timeout=5, **kwargs)
            out[name] = len(c.nthreads())
            c.close()
        except Exception as exc:
            out[name] = "refused: " + type(exc).__name__
    print("RESULT " + json.dumps(out), flush=True)
""")


def test_tls_refuses_plain_and_foreign_clients_from_another_node(four, shared_dir):
    probe = shared_dir / "probe.py"
    probe.write_text(TLS_PROBE)
    creds = four.credentials
    r = subprocess.run(["srun", "-p", PARTITION, "-w", "node2", "-c", "1", "--mem=1G", "-t", "5",
                        sys.executable, str(probe), four.address, str(creds.ca_file), str(creds.cert_file),
                        str(creds.key_file)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout + r.stderr
    got = json.loads(line[0].removeprefix("RESULT "))
    assert got["host"] == "node2"
    assert got["plain"].startswith("refused") and got["foreign"].startswith("refused"), got
    assert got["session"] == 4  # the session's own files (shared home) do connect, from node2 too


def test_ddp_over_two_nodes_matches_one_process(four, shared_dir):
    shards = shared_dir / "shards"
    make_tiny_shards(shards)
    torch.set_num_threads(1)
    base = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, max_steps=12, warmup_steps=3, lr=1e-2,
                eval_interval=0, sample_tokens=0, precision="float32", seed=5, num_threads=1,
                checkpoint_interval=6)
    ddp = train_distributed(four.client, TrainConfig().replace(batch_size=1, checkpoint_dir=str(shared_dir / "ckpt"),
                                                               **base), shards, timeout=60)
    single = train(TrainConfig().replace(batch_size=4, **base), shards)
    assert ddp.world_size == 4 and ddp.effective_batch == single.effective_batch == 4
    for step, (a, b) in enumerate(zip(ddp.losses, single.losses, strict=True)):
        assert abs(a - b) / b <= 1e-4, (step, a, b)
    diffs = [(a - b).abs().mean().item() for a, b in zip(ddp.model.parameters(), single.model.parameters())]
    assert max(diffs) < 1e-4
    assert len(list_checkpoints(shared_dir / "ckpt")) == 2  # steps 6 and 12, on the shared folder


def test_a_folder_only_the_login_node_has_fails_before_training(four, tmp_path, shared_dir):
    tiny = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=1, max_steps=2, sample_tokens=0)
    local = tmp_path / "shards"  # this host's /tmp: each compute host has its own, without these files
    make_tiny_shards(local)
    t0 = time.monotonic()
    with pytest.raises(SharedFolderError) as err:
        train_distributed(four.client, TrainConfig().replace(**tiny), local)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert f"data_dir {local}" in msg and ("node1" in msg or "node2" in msg) and "$HOME" in msg, msg
    shards = shared_dir / "shards"
    make_tiny_shards(shards)
    run = tmp_path / "run"  # a run folder not made yet, under this host's /tmp: made here, seen nowhere else
    with pytest.raises(SharedFolderError, match=f"checkpoint_dir {run}"):
        train_distributed(four.client, TrainConfig().replace(checkpoint_dir=str(run), **tiny), shards)
    assert not list(run.iterdir())  # nothing written, no marker left behind


def test_pipeline_on_both_nodes_gives_the_same_bytes(four, shared_dir):
    from distributed import get_task_stream

    cfg = DataConfig.for_scale("tiny", partition_bytes=30_000, corpus_bytes=150_000)
    ref = preprocess("stdlib", shared_dir / "here", config=cfg, progress=False)
    with get_task_stream(four.client) as ts:
        rep = preprocess("stdlib", shared_dir / "nodes", client=four.client, config=cfg, progress=False)
    hosts = four.hosts()
    names = {a: str(w.get("name")) for a, w in four.workers().items()}
    ran_on = {hosts[names[t["worker"]]] for t in ts.data if t.get("worker") in names}
    assert ran_on == set(NODES), ran_on
    files = sorted(p.relative_to(ref.out_dir) for p in ref.out_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(rep.out_dir) for p in rep.out_dir.rglob("*") if p.is_file())
    for f in files:
        assert (ref.out_dir / f).read_bytes() == (rep.out_dir / f).read_bytes(), f


def test_a_wrong_interface_fails_fast_with_the_interfaces_there(nodes):
    t0 = time.monotonic()
    with pytest.raises(ClusterConfigError) as err:  # the scheduler's, on this host: before any job
        start_cluster("slurm", workers=1, gpus_per_worker=0, partition=PARTITION, interface="ib7", say=lambda s: None)
    assert time.monotonic() - t0 < 10
    assert "'ib7'" in str(err.value) and IFACE in str(err.value) and "scheduler_interface" in str(err.value)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:  # the workers', on a compute host: their job ends, its log says why
        start_cluster("slurm", workers=1, gpus_per_worker=0, partition=PARTITION, interface="ib7",
                      scheduler_interface=IFACE, cores=1, memory="1GiB", timeout=120, say=lambda s: None,
                      prologue=PROLOGUE)
    assert time.monotonic() - t0 < 60
    msg = str(err.value)
    assert "'ib7' is not a valid network interface" in msg and f"'{IFACE}'" in msg, msg
