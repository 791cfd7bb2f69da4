"""The cluster layer without Slurm: profile choice, local workers with GPU slots, the panel, lifetimes."""

from __future__ import annotations

import os
import re
import time

import pytest

from labkit.cluster import ClusterConfigError, choose_profile, start_cluster
from labkit.config import load_config


@pytest.fixture(scope="module")
def local_cluster():
    lines: list[str] = []
    with start_cluster("local", workers=2, gpus_per_worker=1, say=lines.append) as h:
        h.lines = lines
        yield h


def test_local_fake_gpu_slots_and_gpu_task(local_cluster):
    h = local_cluster
    assert any("fake GPU slots 0,1" in line for line in h.lines)  # said out loud, not hidden
    gmap = h.gpu_map()
    assert sorted(tuple(v) for v in gmap.values()) == [("0",), ("1",)]
    cvd = h.client.submit(lambda: os.environ["CUDA_VISIBLE_DEVICES"], resources={"GPU": 1}).result(timeout=30)
    assert cvd in ("0", "1")
    h.scale(3, wait=True, timeout=60)  # a third worker finds no free slot: no GPU resource, no CUDA id
    assert sorted(len(v) for v in h.gpu_map().values()) == [0, 1, 1]
    h.scale(2, wait=True)
    assert len(h.client.nthreads()) == 2


def test_local_workers_may_start_processes(local_cluster):
    def child_ok():
        import multiprocessing

        p = multiprocessing.get_context("spawn").Process(target=abs, args=(-1,))
        p.start()
        p.join()
        return p.exitcode

    assert set(local_cluster.client.run(child_ok).values()) == {0}


def test_dashboard_link_behind_jupyterhub(local_cluster, monkeypatch):
    port = local_cluster.dashboard_port
    assert local_cluster.dashboard_link == f"http://127.0.0.1:{port}/status"
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    assert local_cluster.dashboard_link == f"/user/ada/proxy/{port}/status"


def test_cluster_panel_text_and_live_refresh(local_cluster):
    import time

    from labkit.widgets.cluster_panel import ClusterPanel, status_html

    panel = ClusterPanel(local_cluster, interval=0.2).start()
    deadline = time.monotonic() + 20
    while panel.updates < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    panel.stop()
    assert panel.updates >= 3
    text = panel.text()
    assert "local cluster" in text and "GPUs" in text and "GiB" in text
    assert len(panel.last.workers) >= 2 and {w.gpus for w in panel.last.workers} >= {("0",), ("1",)}
    assert "<table>" in status_html(panel.last)


def test_no_gpus_without_fake_slots_is_an_error():
    with pytest.raises(ClusterConfigError, match="fake_gpus"):
        start_cluster("local", workers=1, gpus_per_worker=1, fake_gpus=False, say=lambda s: None)


def test_unknown_override_names_valid_keys():
    with pytest.raises(ClusterConfigError, match="valid keys"):
        start_cluster("local", partiton="gpu", say=lambda s: None)


def test_auto_profile_choice(tmp_path, monkeypatch):
    prof, why = choose_profile(load_config(), None)
    assert prof.name == "local" and "no Slurm profile configured" in why
    user = tmp_path / "user.yaml"
    user.write_text("profiles:\n  slurm:\n    partition: gpu\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    prof, why = choose_profile(load_config(), None)
    assert prof.name == "local" and "sbatch is not on PATH" in why


def test_auto_profile_picks_configured_slurm(slurm, tmp_path, monkeypatch):
    user = tmp_path / "user.yaml"
    user.write_text("profiles:\n  slurm:\n    partition: gpu\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    prof, why = choose_profile(load_config(), None)
    assert prof.name == "slurm" and "answer" in why


def test_lifetime_defaults_from_walltime():
    from labkit.cluster.slurm import lifetime_args

    prof = load_config().profile("slurm").replace(signal=None)
    assert lifetime_args(prof.replace(walltime="01:00:00")) == ["--lifetime", "3300s", "--lifetime-stagger", "150s"]
    assert lifetime_args(prof.replace(walltime="00:10:00", lifetime_stagger=None)) == ["--lifetime", "540s"]
    assert lifetime_args(prof.replace(lifetime="20m", lifetime_stagger="1m")) == [
        "--lifetime", "20m", "--lifetime-stagger", "1m"]


def test_gpu_task_checker(local_cluster):
    from labkit.check.cluster import check, show_solution, solution, solved

    assert check("gpu_task", solved("gpu_task"), cluster=local_cluster).passed
    assert "resources" in solution("gpu_task") and show_solution("gpu_task") == solution("gpu_task")

    def unfinished(client, fn):
        raise NotImplementedError

    r = check("gpu_task", unfinished, cluster=local_cluster)  # the notebook runs on headless
    assert r.passed is None and r.message.startswith("not yet")
    r = check("gpu_task", lambda client, fn: client.submit(fn, pure=False), cluster=local_cluster)
    assert r.passed is False and re.search(r"resources=\{'GPU': 1\}", r.message), r.message
    r = check("gpu_task", lambda client, fn: fn(), cluster=local_cluster)
    assert r.passed is False and "not a Future" in r.message, r.message
    # more GPUs than any worker owns: the task would wait for ever; the checker says so at once
    start = time.monotonic()
    r = check("gpu_task", lambda client, fn: client.submit(fn, resources={"GPU": 2}, pure=False), cluster=local_cluster)
    assert r.passed is False and re.search(r"no worker offers that much .*'GPU': 1", r.message), r.message
    assert time.monotonic() - start < 10


def test_sidebar_factory_through_dask_labextension():
    """The JupyterLab Dask sidebar's own make_cluster builds, scales and closes a labkit cluster."""
    import asyncio

    import dask
    import yaml

    from labkit.cluster.session import state_root
    from labkit.cluster.sidebar import CONFIG_FILE

    factory = yaml.safe_load(CONFIG_FILE.read_text())["labextension"]["factory"]

    async def run():
        # imported where a loop runs, as in jupyter_server: the module makes its manager at import and
        # asks for the current loop, which there is none of once an earlier test's asyncio.run() ended
        from dask_labextension.manager import make_cluster

        with dask.config.set({"labextension.factory": factory}):
            cluster, _ = await make_cluster({"workers": 1})
        session_dir = state_root() / cluster.name.removeprefix("labkit-")
        try:
            while len(cluster.scheduler_info["workers"]) < 1:
                await asyncio.sleep(0.1)
            assert session_dir.is_dir() and cluster.dashboard_link
        finally:
            await cluster.close()
        return session_dir

    session_dir = asyncio.run(asyncio.wait_for(run(), 60))
    assert not session_dir.exists()  # closing from the sidebar ends the session too


def test_a_script_without_main_guard_fails_fast_naming_the_fix(tmp_path):
    """Local workers are spawned processes that import the script again: unguarded, they die at start.
    The error comes in seconds (not a 60 s timeout), speaks of local worker processes (not of Slurm
    jobs) and names the main guard."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "train_me.py"
    script.write_text("import labkit\nh = labkit.start_cluster(profile='local', workers=2, timeout=120)\n"
                      "print('READY')\nh.close()\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    start = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env,
                       cwd=tmp_path)
    took = time.monotonic() - start
    assert r.returncode != 0 and "READY" not in r.stdout
    assert "local worker process(es) exited while starting" in r.stderr, r.stderr[-3000:]
    assert 'if __name__ == "__main__":' in r.stderr
    assert "squeue" not in r.stderr and "Slurm" not in r.stderr.split("ClusterError")[-1]
    assert took < 60, f"the failure took {took:.0f} s: it must not wait for the start timeout"


def test_a_killed_local_worker_is_reported_with_its_cause(caplog):
    """distributed says a worker process died only at INFO, which LocalCluster hides: labkit warns,
    naming the signal and the likely cause (an OOM kill), and the nanny still brings a worker back."""
    import logging
    import signal

    from labkit.cluster.upstream import death_note

    caplog.set_level(logging.WARNING, logger="labkit.cluster")
    from distributed.core import Status

    with start_cluster("local", workers=1, say=lambda line: None) as h:
        # a worker can answer before its nanny has marked it started; killed then, it is a failed
        # start (another path, tested above), not a death
        def started() -> bool:
            nannies = list(h.cluster.workers.values())
            return len(nannies) == 1 and nannies[0].status == Status.running

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not started():
            time.sleep(0.05)
        assert started(), f"the nanny never reported itself started: {h.cluster.workers}"
        (addr, pid), = h.client.run(os.getpid).items()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("SIGKILL" in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
        notes = [r.getMessage() for r in caplog.records if r.name == "labkit.cluster"]
        assert any(f"local worker process {pid}" in n and "SIGKILL" in n and "out-of-memory" in n for n in notes), notes
        h.client.wait_for_workers(1, timeout=60)  # the nanny restarts it
        assert h.client.run(os.getpid) and pid not in h.client.run(os.getpid).values()
    # a normal close says nothing
    assert not [r for r in caplog.records if r.name == "labkit.cluster" and "killed" in r.getMessage()
                and str(pid) not in r.getMessage()]
    assert "exited with status 3" in death_note(7, "tcp://x:1", 3)
    assert "SIGSEGV" in death_note(7, None, -11) and "not yet connected" in death_note(7, None, -11)
