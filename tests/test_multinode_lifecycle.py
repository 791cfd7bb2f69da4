"""Across hosts, the things that end: a node lost mid-training, a killed kernel, a serving job.

Runs after tests/test_multinode.py (whose cluster is closed by then), since these take whole nodes
and one of them crashes node2 on purpose (``scripts/local-slurm.sh fail-node``) and brings it back.
"""

from __future__ import annotations

import collections
import os
import ssl
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from conftest import skip_unless_ci, training_past_a_checkpoint
from labkit.checkpoint import list_checkpoints
from labkit.cluster import start_cluster
from labkit.config import load_config
from labkit.core.ranks import RankLost
from labkit.core.workers import workers_now
from labkit.data.shards import make_tiny_shards
from labkit.serve.slurm import submit
from labkit.train import TrainConfig, train_distributed
from multinode import IFACE, NODES, PARTITION, PROLOGUE, REPO, SCRIPT, netns_pids, nodes, process_name, shared_dir  # noqa: F401

pytestmark = pytest.mark.slurm


def _session_jobs(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i", "-t", "PENDING,RUNNING,CONFIGURING,SUSPENDED"],
                         capture_output=True, text=True, timeout=15)
    return out.stdout.split()


def _revive_nodes() -> None:
    """``up --nodes 2`` again: restarts a failed node's slurmd (idempotent when all run)."""
    subprocess.run([str(SCRIPT), "up", "--nodes", str(len(NODES))], check=True, capture_output=True, timeout=120)


def test_a_lost_node_is_named_then_resume_then_back_to_two_nodes(nodes, shared_dir):
    if os.geteuid() != 0:
        skip_unless_ci("failing and reviving a node needs root (scripts/local-slurm.sh fail-node)")
    shards = shared_dir / "shards"
    make_tiny_shards(shards)
    ckpt = shared_dir / "ckpt"
    lines: list[str] = []
    handle = start_cluster("slurm", workers=4, gpus_per_worker=1, partition=PARTITION, interface=IFACE, cores=1,
                           memory="1GiB", timeout=180, say=lines.append, prologue=PROLOGUE)
    client = handle.client
    try:
        config = TrainConfig().replace(n_layer=1, n_head=2, n_embd=16, block_size=16, precision="float32",
                                       batch_size=1, max_steps=3000, eval_interval=0, sample_tokens=0,
                                       num_threads=1, checkpoint_dir=str(ckpt), checkpoint_interval=5)
        run = training_past_a_checkpoint(client, config, shards)
        subprocess.run([str(SCRIPT), "fail-node", "node2"], check=True, capture_output=True, timeout=30)
        failed = time.monotonic()
        with pytest.raises(RankLost) as err:
            run.result(timeout=60)
        assert time.monotonic() - failed < 30
        assert err.value.host == "node2" and "on node node2" in str(err.value)
        # resume on what is left: node1's two workers, from the last checkpoint on the shared folder
        deadline = time.monotonic() + 30
        while len(workers_now(client)) > 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert set(handle.hosts().values()) == {"node1"}
        last = int(list_checkpoints(ckpt)[-1].name[5:13])
        res = train_distributed(client, config.replace(max_steps=last + 3), shards, resume=True, timeout=60)
        assert res.start_step == last and res.steps == 3 and res.world_size == 2 and res.effective_batch == 4
        # node2 comes back; scale() replaces the lost jobs and training resumes on both nodes again
        _revive_nodes()
        handle.scale(4, wait=True, timeout=180)
        assert collections.Counter(handle.hosts().values()) == {"node1": 2, "node2": 2}
        res2 = train_distributed(client, config.replace(max_steps=last + 6), shards, resume=True, timeout=60)
        assert res2.start_step == last + 3 and res2.steps == 3 and res2.world_size == 4
    finally:
        handle.close()
        _revive_nodes()


HOLDER = textwrap.dedent("""
    import time
    from labkit.cluster import start_cluster
    if __name__ == "__main__":
        # 3 of a node's 4 CPUs per job: the two jobs cannot share a node, so one runs on each
        h = start_cluster("slurm", workers=2, gpus_per_worker=0, partition="nodes", interface="labkit0", cores=3,
                          memory="1GiB", timeout=120, prologue=["export OMP_NUM_THREADS=1"])
        print("NAME", h.session.job_name, h.session.path, sorted(h.hosts().values()), flush=True)
        time.sleep(600)
""")


def test_kill_9_of_the_kernel_leaves_no_job_and_no_process_on_any_node(nodes, shared_dir):
    script = shared_dir / "holder.py"
    script.write_text(HOLDER)
    before = {n: set(netns_pids(n)) for n in NODES}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        name = path = None
        for line in proc.stdout:
            if line.startswith("NAME "):
                _, name, path, hosts = line.split(maxsplit=3)
                break
        assert name and hosts.strip() == str(list(NODES)), line
        busy = {n: set(netns_pids(n)) - before[n] for n in NODES}
        assert all(busy.values()), busy  # worker processes run on both nodes
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 90
    while _session_jobs(name) and time.monotonic() < deadline:
        time.sleep(1)
    assert _session_jobs(name) == [], "worker jobs outlived the killed kernel by 90 s"
    while time.monotonic() < deadline and any(set(netns_pids(n)) - before[n] for n in NODES):
        time.sleep(1)
    left = {n: [process_name(p) for p in set(netns_pids(n)) - before[n]] for n in NODES}
    assert not any(left.values()), f"processes left on the nodes: {left}"
    assert {process_name(p) for n in NODES for p in netns_pids(n)} <= {"slurmd"}
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(1)
    assert not os.path.exists(path), "the killed kernel's session keys were left behind"


def test_serve_as_a_job_lands_on_a_compute_node_and_answers_here_over_tls(nodes, shared_dir, monkeypatch):
    for var in ("LABKIT_USER_CONFIG", "LABKIT_SITE_CONFIG"):  # the job reads them on the node: shared files
        (shared_dir / f"{var}.yaml").write_text("")
        monkeypatch.setenv(var, str(shared_dir / f"{var}.yaml"))
    profile = load_config().profile("slurm").replace(partition=PARTITION, walltime="00:05:00", memory="1GiB", cores=1)
    job = submit(profile, ["--demo", "--no-embed"], job_name="labkit-serve-mn", directory=shared_dir)
    try:
        url = job.wait_url(timeout=150)
        host = httpx.URL(url).host
        assert url.startswith("https://") and host in NODES, url  # the node's own name, resolved here
        verify = ssl.create_default_context(cafile=str(job.certfile))
        with httpx.Client(base_url=url, verify=verify, timeout=60) as c:
            assert c.get("/health").json()["cuda_visible_devices"] not in (None, "")
            r = c.post("/generate", json={"prompt": "nodes", "max_new_tokens": 3, "seed": 1},
                       headers={"Authorization": f"Bearer {job.token}"})
            assert r.status_code == 200 and r.json()["new_tokens"] == 3
        with pytest.raises(httpx.TransportError):  # plain http on the TLS port gets no answer
            httpx.get(url.replace("https://", "http://") + "/health", timeout=10)
    finally:
        job.cancel()
