"""Shared fixtures: the repo root, the local Slurm, isolated config layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory, monkeypatch):
    """Tests never read the developer's own ~/.config/labkit or /etc/labkit files."""
    empty = tmp_path_factory.mktemp("cfg")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(empty / "user.yaml"))
    monkeypatch.setenv("LABKIT_SITE_CONFIG", str(empty / "site.yaml"))
    (empty / "user.yaml").write_text("")
    (empty / "site.yaml").write_text("")
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    monkeypatch.setenv("LABKIT_SCALE", "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def client():
    """A real local Dask cluster of 2 worker processes (one thread each), shared by a test module."""
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def skip_unless_ci(reason: str) -> None:
    """Skip outside CI; in CI a missing install or service is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"must run in CI, but: {reason} (.ci/run installs and starts what the tests need)")
    pytest.skip(reason)


def slurm_answers() -> tuple[bool, str]:
    """Whether the local Slurm answers, and why not."""
    if not shutil.which("sinfo"):
        return False, "sinfo not installed (apt-get install slurm-client; scripts/local-slurm.sh up)"
    r = subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True, timeout=15)
    if r.returncode != 0:
        return False, f"Slurm does not answer ({r.stderr.strip()}); start it with scripts/local-slurm.sh up"
    return True, r.stdout


@pytest.fixture(scope="session")
def slurm():
    """The live local Slurm; skips (outside CI only) when it cannot be reached."""
    ok, info = slurm_answers()
    if not ok:
        skip_unless_ci(info)
    return info


@pytest.fixture(scope="session")
def executed_notebooks() -> dict:
    """Notebooks this session already ran at tiny scale, by stem: test_browser.py (which runs first) keeps
    what JupyterLab saved after running each, and test_notebooks.py checks that copy instead of running the
    notebook a second time (~150 s of the suite); run alone, test_notebooks.py executes them itself."""
    return {}


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A tiny set of token shards (stdlib text, seconds to build), shared read-only by the training tests."""
    from labkit.data.shards import make_tiny_shards

    out = tmp_path_factory.mktemp("shards")
    make_tiny_shards(out)
    return out


def training_past_a_checkpoint(client, config, shards, timeout: float = 20.0, wait: float = 120.0):
    """A background training run (``start_distributed``) once its first checkpoint is written."""
    from labkit.core.events import Recorder, subscribe
    from labkit.train import start_distributed

    rec = Recorder()
    sub = subscribe(client, rec, kinds=["checkpoint"])
    run = start_distributed(client, config, shards, timeout=timeout)
    deadline = time.time() + wait
    while not rec.of("checkpoint") and not run.done() and time.time() < deadline:
        time.sleep(0.1)
    sub.close()
    assert not run.done(), "training ended before a checkpoint was seen"
    return run
