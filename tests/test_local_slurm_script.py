"""scripts/local-slurm.sh stops only the munged its own "up" started.

The live Slurm here is shared, so these tests never run "up", "down" or "restart": they source the
script (which defines its functions and runs nothing) with a temporary state folder and call the munge
functions against a stand-in munged, a copy of `sleep` named munged. The real munged is checked to
outlive every test.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local-slurm.sh"

pytestmark = pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("pgrep") and shutil.which("ps") and Path("/proc").is_dir()),
    reason="needs bash, pgrep, ps and /proc (Linux), as the script does",
)


def _munged_pids() -> set[int]:
    r = subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True, check=False)
    return {int(p) for p in r.stdout.split()}


def _call(state: Path, *functions: str) -> subprocess.CompletedProcess:
    """Source the script with its state in `state` and call `functions` (never up/down/restart)."""
    assert not {"up", "down", "restart", "main"} & set(functions)
    env = dict(os.environ, LABKIT_SLURM_STATE_DIR=str(state))
    cmd = f'source "{SCRIPT}"; ' + "; ".join(functions)
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def fake_munged(tmp_path):
    """A process named munged that is not the machine's munged; killed at the end if still alive."""
    exe = tmp_path / "bin" / "munged"
    exe.parent.mkdir()
    shutil.copy(shutil.which("sleep"), exe)
    others = _munged_pids()
    proc = subprocess.Popen([str(exe), "300"])
    for _ in range(50):  # until ps shows it under its name
        if proc.pid in _munged_pids():
            break
        subprocess.run(["sleep", "0.1"], check=False)
    assert proc.pid in _munged_pids(), "the stand-in munged is not seen by pgrep -x munged"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    assert others <= _munged_pids(), "a munged that the test did not start was stopped"


def test_down_stops_the_munged_up_recorded(tmp_path, fake_munged):
    state = tmp_path / "state"
    state.mkdir()
    (state / "munged.pid").write_text(f"{fake_munged.pid}\n")
    r = _call(state, "stop_munge")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake_munged.wait(timeout=5) is not None  # it got the signal
    assert f"stopped munged (pid {fake_munged.pid}" in r.stdout
    assert not (state / "munged.pid").exists()
    r = _call(state, "stop_munge")  # down again: nothing recorded, nothing stopped
    assert r.returncode == 0 and "stopped munged" not in r.stdout


def test_down_leaves_a_munged_it_did_not_start(tmp_path, fake_munged):
    state = tmp_path / "state"
    state.mkdir()
    r = _call(state, "stop_munge")  # no record: the munged was found running, not started by up
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left running" in r.stdout
    assert fake_munged.poll() is None


def test_a_stale_record_never_kills_another_process(tmp_path, fake_munged):
    # the recorded munged died and its pid now belongs to something else: drop the record, kill nothing
    state = tmp_path / "state"
    state.mkdir()
    other = subprocess.Popen(["sleep", "300"])
    try:
        (state / "munged.pid").write_text(f"{other.pid}\n")
        r = _call(state, "stop_munge")
        assert r.returncode == 0, r.stdout + r.stderr
        assert other.poll() is None and fake_munged.poll() is None
        assert not (state / "munged.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_up_again_keeps_its_record_and_records_no_foreign_munged(tmp_path, fake_munged):
    # a munged runs (the stand-in), so start_munge starts nothing in every case below
    state = tmp_path / "state"
    state.mkdir()
    record = state / "munged.pid"
    r = _call(state, "start_munge")  # found running, not ours: no record appears
    assert r.returncode == 0, r.stdout + r.stderr
    assert not record.exists()
    record.write_text(f"{fake_munged.pid}\n")  # as an earlier "up" that started it left it
    r = _call(state, "start_munge")  # "up" twice: the record of our munged stays for "down"
    assert r.returncode == 0, r.stdout + r.stderr
    assert record.read_text().strip() == str(fake_munged.pid)
    fake_munged.kill()
    fake_munged.wait()
    with_other = subprocess.Popen([fake_munged.args[0], "300"])  # our munged died; another one runs now
    try:
        assert with_other.pid in _munged_pids()
        r = _call(state, "start_munge")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not record.exists()  # the stale record goes, so "down" will not stop the other one
    finally:
        with_other.kill()
        with_other.wait()


# ---- up --nodes: the compute hosts' namespaces, made and removed under names of the test's own ----

ISOLATED = {"LABKIT_SLURM_SUBNET": "10.79.0", "LABKIT_SLURM_BRIDGE": "lkt0", "LABKIT_SLURM_NETNS_PREFIX": "lkt-",
            "LABKIT_SLURM_VETH_PREFIX": "lktv-", "LABKIT_SLURM_NODES": "2"}


def _bash(cmd: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _links() -> str:
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout


def _links_names() -> set[str]:
    return {line.split()[0].split("@")[0] for line in _links().splitlines() if line.strip()}


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_compute_hosts_are_separate_hosts_and_down_removes_only_what_up_made(tmp_path):
    from conftest import skip_unless_ci

    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nsenter") and shutil.which("unshare")):
        skip_unless_ci("needs root, iproute2 and util-linux (nsenter, unshare), as up --nodes does")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    env = dict(os.environ, LABKIT_SLURM_STATE_DIR=str(tmp_path / "state"), LABKIT_SLURM_HOSTS_FILE=str(hosts), **ISOLATED)
    src = f'source "{SCRIPT}"'
    # a namespace and a veth that up did not make, named like its own: they must survive down
    subprocess.run(["ip", "netns", "add", "lkt-other"], check=True)
    subprocess.run(["ip", "link", "add", "lktv-x", "type", "veth", "peer", "name", "lktv-y"], check=True)
    (Path("/tmp") / f"login-only-{os.getpid()}").write_text("only on the login node")
    try:
        r = _bash(f"{src}; make_nodes", env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "lkt-node1" in _netns() and "lkt-node2" in _netns() and "lkt0" in _links()
        assert "10.79.0.11 node1" in hosts.read_text() and "10.79.0.12 node2" in hosts.read_text()
        inside = (f'nsenter --net=/var/run/netns/lkt-node1 unshare --uts --mount --propagation private -- bash -c '
                  f'\'{src}; node_setup node1; echo "host=$(hostname)"; echo "tmp=$(ls -A /tmp | tr "\\n" " ")"; '
                  f'ip -4 -o addr show | awk "{{print \\"addr=\\" \\$4}}"; ip -4 route | sed "s/^/route=/"; '
                  f'ip route get 192.0.2.1 >/dev/null 2>&1 || echo "outside=unreachable"; '
                  f'getent hosts node2 | sed "s/^/resolve=/"; test -f "{SCRIPT}" && echo shared=yes\'')
        r = _bash(inside, env)
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout.splitlines()
        assert "host=node1" in out
        tmp = next(line for line in out if line.startswith("tmp="))
        # a fresh node-local /tmp: the login node's files are not there (only a checkout under /tmp, re-exposed)
        assert f"login-only-{os.getpid()}" not in tmp and set(tmp.removeprefix("tmp=").split()) <= {
            Path(SCRIPT).resolve().parents[1].relative_to("/tmp").parts[0]} if str(SCRIPT).startswith("/tmp/") else tmp == "tmp="
        assert sorted(line for line in out if line.startswith("addr=")) == ["addr=10.79.0.11/24", "addr=127.0.0.1/8"]
        routes = [line for line in out if line.startswith("route=")]
        assert len(routes) == 1 and routes[0].startswith("route=10.79.0.0/24 dev lkt0 "), routes  # no default route
        assert "outside=unreachable" in out and any(line.startswith("resolve=10.79.0.12") for line in out)
        assert "shared=yes" in out  # the checkout stays visible, even when it lies under /tmp
        r = _bash(f"{src}; remove_made", env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "lkt-node1" not in _netns() and "lkt-node2" not in _netns() and "lkt0" not in _links_names()
        assert "node1" not in hosts.read_text() and hosts.read_text().startswith("127.0.0.1 localhost")
        assert "lkt-other" in _netns() and "lktv-x" in _links_names()  # what up did not make stays
    finally:
        _bash(f"{src}; remove_made", env)
        subprocess.run(["ip", "netns", "del", "lkt-other"], check=False)
        subprocess.run(["ip", "link", "del", "lktv-x"], check=False)
        (Path("/tmp") / f"login-only-{os.getpid()}").unlink(missing_ok=True)
