"""Helpers for the tests on the cluster in a box (``scripts/local-slurm.sh up --nodes 2``).

The compute hosts are partition ``nodes``: node1 and node2, each its own network, UTS and mount
namespace on interface ``labkit0``; this host is the login node. Only the checkout and $HOME are
shared with them, so every folder a worker must see lives under $HOME here, never under /tmp.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import skip_unless_ci

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local-slurm.sh"
PARTITION = "nodes"
IFACE = "labkit0"
NODES = ("node1", "node2")
PROLOGUE = [f"export PYTHONPATH={REPO}", "export OMP_NUM_THREADS=1"]


def node_addresses() -> dict[str, str]:
    """Compute host -> its address, as Slurm has them (NodeAddr)."""
    r = subprocess.run(["sinfo", "-N", "-h", "-p", PARTITION, "-o", "%n %o %T"], capture_output=True, text=True, timeout=15)
    out = {}
    for line in r.stdout.splitlines():
        name, addr, state = line.split()
        if not state.startswith(("down", "drain", "fail")):
            out[name] = addr
    return out


def require_nodes() -> dict[str, str]:
    """The two compute hosts, or a skip (outside CI only) saying how to bring them up."""
    if not shutil.which("sinfo"):
        skip_unless_ci("sinfo not installed (scripts/install-system.sh)")
    found = node_addresses()
    if set(NODES) - set(found):
        skip_unless_ci(f"partition {PARTITION!r} lacks live nodes {sorted(set(NODES) - set(found))} "
                       "(start them with: scripts/local-slurm.sh up --nodes 2)")
    return found


@pytest.fixture(scope="module")
def nodes(slurm) -> dict[str, str]:
    return require_nodes()


@pytest.fixture
def shared_dir():
    """A fresh folder on the shared filesystem ($HOME), removed afterwards."""
    d = Path.home() / ".cache" / "labkit-tests" / uuid.uuid4().hex[:10]
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def netns_pids(node: str) -> list[int]:
    """Every process running on a compute host (its network namespace)."""
    r = subprocess.run(["ip", "netns", "pids", f"labkit-{node}"], capture_output=True, text=True, timeout=10)
    return [int(p) for p in r.stdout.split()]


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
