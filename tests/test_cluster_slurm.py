"""The cluster layer against the real local Slurm: GPUs, TLS, feedback, fail-fast, no orphans, walltime."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

from labkit.cluster import ClusterConfigError, ClusterTimeout, slurmcli, start_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # client.run ships these helpers by value


def _session_jobs(name: str) -> list[str]:
    """Live (not completing) jobs of a session."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i", "-t", "PENDING,RUNNING,CONFIGURING,SUSPENDED"], capture_output=True, text=True, timeout=15)
    return out.stdout.split()


def _worker_facts():
    import multiprocessing
    import os
    import sys

    p = multiprocessing.get_context("fork").Process(target=sum, args=([1, 2],))  # DataLoader-style child
    p.start()
    p.join()
    return {
        "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "job": os.environ.get("SLURM_JOB_ID"),
        "leak": os.environ.get("SLURM_LABKIT_LEAK"),
        "python": sys.executable,
        "child_ok": p.exitcode == 0,
    }


@pytest.fixture(scope="module")
def gpu_cluster(slurm):
    """One 2-worker, 1-GPU-each Slurm cluster shared by the tests below; started from inside a fake job."""
    leak = {"SLURM_LABKIT_LEAK": "1", "SLURM_JOB_ID": "999999", "SLURM_MEM_PER_NODE": "1"}
    saved = {k: os.environ.get(k) for k in leak}
    os.environ.update(leak)  # as if the notebook itself ran inside a Slurm job (batchspawner)
    lines: list[str] = []
    try:
        handle = start_cluster("slurm", workers=2, gpus_per_worker=1, timeout=120, say=lines.append,
                               prologue=["export LABKIT_PROLOGUE_RAN=yes"])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    handle.say_lines = lines
    yield handle
    handle.close()


def test_two_gpu_workers_see_distinct_devices(gpu_cluster):
    gmap = gpu_cluster.gpu_map()
    assert len(gmap) == 2
    ids = [tuple(v) for v in gmap.values()]
    assert all(len(v) == 1 for v in ids) and len(set(ids)) == 2, gmap
    facts = gpu_cluster.client.run(_worker_facts)
    assert sorted(f["job"] for f in facts.values()) == sorted(gpu_cluster.job_ids())  # own job, not the leak
    assert all(f["leak"] is None for f in facts.values())
    assert all(f["python"] == sys.executable and f["child_ok"] for f in facts.values())
    # a GPU-pinned task lands on a worker with a GPU resource
    fut = gpu_cluster.client.submit(lambda: os.environ["CUDA_VISIBLE_DEVICES"], resources={"GPU": 1})
    assert fut.result(timeout=30) in {v[0] for v in gmap.values()}
    info = gpu_cluster.workers()
    assert all(w["resources"] == {"GPU": 1} for w in info.values())


def test_tls_only_session_credentials_connect(gpu_cluster, tmp_path):
    from distributed import Client
    from labkit.cluster.tls import SessionCredentials

    addr = gpu_cluster.address
    assert addr.startswith("tls://")
    plain = "tcp://" + addr.removeprefix("tls://")
    with pytest.raises((OSError, TimeoutError)):
        Client(plain, timeout=3)
    other = SessionCredentials.create(tmp_path / "other").security()
    with pytest.raises((OSError, TimeoutError, ssl.SSLError)):
        Client(addr, security=other, timeout=3)
    files = gpu_cluster.credentials.files()
    assert stat.S_IMODE(gpu_cluster.credentials.directory.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert gpu_cluster.dashboard_link.startswith("http://127.0.0.1:")
    sockets = gpu_cluster.cluster.scheduler.http_server._sockets.values()
    assert {s.getsockname()[0] for s in sockets} == {"127.0.0.1"}


def test_job_script_mem_modes_and_prologue(gpu_cluster):
    script = gpu_cluster.cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --mem=4G" in script
    assert f"#SBATCH -J {gpu_cluster.session.job_name}" in script
    assert "DASK_DISTRIBUTED__WORKER__DAEMON=False" in script and sys.executable in script
    assert any("labkit: 0/2 workers; jobs:" in line for line in gpu_cluster.say_lines)


def test_mem_per_gpu_directive(slurm):
    from labkit.cluster.session import Session
    from labkit.cluster.slurm import build_slurm_cluster
    from labkit.config import load_config

    prof = load_config().profile("slurm").replace(memory_mode="mem-per-gpu", memory="4GiB")
    session = Session.create()
    cluster = build_slurm_cluster(prof, session, None, gpus_per_worker=2)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
        session.remove()
    assert "--mem-per-gpu=2048M" in script and "--mem=" not in script and "--gres=gpu:2" in script


def test_close_cancels_jobs_and_deletes_keys(gpu_cluster):
    h = gpu_cluster
    assert set(h.client.run(lambda: os.environ.get("LABKIT_PROLOGUE_RAN")).values()) == {"yes"}
    files, name = h.credentials.files(), h.session.job_name
    assert len(_session_jobs(name)) == 2
    h.close()
    assert not any(p.exists() for p in files) and not h.session.path.exists()
    assert _session_jobs(name) == []


def test_pending_job_reported_and_timeout_carries_reason(slurm):
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(ClusterTimeout) as err:
        start_cluster("slurm", workers=1, gpus_per_worker=0, job_extra=["--begin=now+1hour"], timeout=6,
                      say=lines.append)
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert "PENDING (BeginTime)" in msg and err.value.jobs
    jid = err.value.jobs[0].job_id
    assert jid in msg and "cancelled" in msg
    assert any("PENDING (BeginTime)" in line for line in lines)
    assert all(j.state != "PENDING" for j in slurmcli.jobs([jid]))


@pytest.mark.parametrize("overrides, needle", [
    ({"partition": "nosuch"}, "valid partitions: cpu, gpu"),
    ({"partition": "cpu"}, "has no GPU GRES"),
    ({"gpus_per_worker": 3}, "at most 2"),  # scripts/local-slurm.sh: 2 GPUs per node
    ({"walltime": "ten minutes"}, "walltime"),
    ({"memory": "lots"}, "memory"),
    ({"require_account": True}, "requires a Slurm account"),
    ({"cores": 4096}, "CPUs; ask cores<="),
    ({"lifetime": "soon"}, "cannot read lifetime"),
    ({"lifetime": "59m", "walltime": "01:00:00"}, "reaches the walltime"),
])
def test_bad_config_fails_fast(slurm, overrides, needle):
    t0 = time.monotonic()
    with pytest.raises(ClusterConfigError) as err:
        start_cluster("slurm", workers=1, say=lambda s: None, **overrides)
    assert time.monotonic() - t0 < 10
    assert needle in str(err.value)


def test_forced_slurm_without_sbatch(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ClusterConfigError, match="sbatch not found.*profile='local'"):
        start_cluster("slurm", say=lambda s: None)
    assert time.monotonic() - t0 < 10


HOLDER = textwrap.dedent("""
    import sys, time
    from labkit.cluster import start_cluster
    if __name__ == "__main__":
        if sys.argv[1] == "queued":  # a job that cannot start for an hour: no worker inside to notice anything
            h = start_cluster("slurm", workers=1, gpus_per_worker=0, wait=False, job_extra=["--begin=now+3600"])
        else:
            h = start_cluster("slurm", workers=2, gpus_per_worker=0, timeout=120)
        print("NAME", h.session.job_name, h.session.path, flush=True)
        if sys.argv[1] == "exit":
            sys.exit(0)  # no close(): atexit must cancel the jobs
        time.sleep(600)
""")


def test_normal_exit_without_close_cancels_jobs(slurm, tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    r = subprocess.run([sys.executable, str(script), "exit"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    name, path = [line.split()[1:3] for line in r.stdout.splitlines() if line.startswith("NAME ")][0]
    assert _session_jobs(name) == [], "atexit left jobs behind"
    assert not os.path.exists(path), "atexit left the session's keys behind"


def test_job_dying_at_start_fails_fast_with_log(slurm):
    from labkit.cluster import ClusterError

    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        start_cluster("slurm", workers=1, gpus_per_worker=0, timeout=120, say=lambda s: None,
                      prologue=["echo 'module cuda/99 not found' >&2", "exit 3"])
    assert time.monotonic() - t0 < 60
    assert "ended before their worker joined" in str(err.value) and "module cuda/99 not found" in str(err.value)


@pytest.mark.parametrize("mode, jobs", [("hold", 2), ("queued", 1)])
def test_sigkilled_holder_leaves_no_jobs(slurm, tmp_path, mode, jobs):
    """kill -9 of the process holding a cluster: running workers and still-queued jobs alike are
    gone from squeue within 90 s, and the session's keys are deleted."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True, env=env)
    try:
        name = path = None
        for line in proc.stdout:
            if line.startswith("NAME "):
                name, path = line.split()[1:3]
                break
        assert name and len(_session_jobs(name)) == jobs
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 90
    while _session_jobs(name) and time.monotonic() < deadline:
        time.sleep(2)
    assert _session_jobs(name) == [], "worker jobs outlived the killed notebook by 90 s"
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(1)
    assert not os.path.exists(path), "the killed notebook's session keys were left behind"


def test_cleanup_cancels_only_stale_jobs(slurm):
    from labkit.cluster.cleanup import cleanup

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename.split(".")[0]
    ids = {}
    for who, pid in (("stale", dead.pid), ("live", os.getpid())):
        out = subprocess.run(["sbatch", "--parsable", "-p", "gpu", "-J", f"labkit-{'de' if who == 'stale' else 'ad'}adbeef",
                              f"--comment=labkit:{host}:{pid}", "-t", "2", "--mem=10M", "-o", "/dev/null", "--wrap", "sleep 120"],
                             capture_output=True, text=True, timeout=15, check=True)
        ids[who] = out.stdout.strip().split(";")[0]
    try:
        jobs, _ = cleanup(dry_run=True)
        live = {j.job_id for j in slurmcli.jobs(list(ids.values())) if j.state in ("PENDING", "RUNNING")}
        # (another session's start_cluster may have cancelled the stale job first: that is the same cleanup)
        assert ids["stale"] in {j.job_id for j in jobs} or ids["stale"] not in live
        assert ids["live"] not in {j.job_id for j in jobs}
        r = subprocess.run([sys.executable, "-m", "labkit", "cleanup"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0
        assert f"cancelled job {ids['stale']}" in r.stdout or ids["stale"] not in live
        live = {j.job_id for j in slurmcli.jobs(list(ids.values())) if j.state in ("PENDING", "RUNNING")}
        assert ids["live"] in live and ids["stale"] not in live
    finally:
        slurmcli.cancel(ids.values())


def test_workers_retire_before_walltime_and_are_replaced(slurm):
    import dask

    def _job_of_worker(_):  # nested: shipped by value, workers cannot import this test module
        time.sleep(0.2)
        return os.environ["SLURM_JOB_ID"]

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "3s"}):
        with start_cluster("slurm", workers=2, gpus_per_worker=0, lifetime="10s", lifetime_stagger="2s",
                           timeout=120, say=lambda s: None) as h:
            first = set(h.job_ids())
            seen: list[str] = []
            t0 = time.monotonic()
            while len(set(seen) - first) < 2 and time.monotonic() - t0 < 80:
                seen.append(h.client.submit(_job_of_worker, time.monotonic(), pure=False).result(timeout=60))
                time.sleep(0.5)
            assert len(set(seen) - first) >= 2, f"no replacement workers: {sorted(set(seen))} vs first {first}"


def test_start_cancels_jobs_a_killed_kernel_left_queued(slurm):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename.split(".")[0]
    out = subprocess.run(["sbatch", "--parsable", "-p", "gpu", "-J", "labkit-0dead0ed", "--begin=now+1hour",
                          f"--comment=labkit:{host}:{dead.pid}", "-t", "2", "--mem=10M", "-o", "/dev/null", "--wrap", "sleep 1"],
                         capture_output=True, text=True, timeout=15, check=True)
    jid = out.stdout.strip().split(";")[0]
    try:
        with start_cluster("slurm", workers=0, say=lambda s: None):
            pass
        assert all(j.state != "PENDING" for j in slurmcli.jobs([jid]))
    finally:
        slurmcli.cancel([jid])
