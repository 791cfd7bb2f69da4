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
