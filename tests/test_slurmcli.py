"""slurmcli.submit against stand-in sbatch commands: the job id, a refusal that names the fix, a time limit."""

from __future__ import annotations

import os
import time

import pytest

from labkit.cluster import ClusterError, slurmcli


def _fake_sbatch(tmp_path, monkeypatch, body: str) -> None:
    exe = tmp_path / "bin" / "sbatch"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("out", ["4711", "4711;cluster1", "sbatch: warning: odd\n4711"])
def test_submit_parses_parsable_output(tmp_path, monkeypatch, out):
    _fake_sbatch(tmp_path, monkeypatch, f'printf "%s\\n" "{out}"')
    assert slurmcli.submit(tmp_path / "job.sh") == "4711"


def test_submit_passes_args_and_a_clean_env(tmp_path, monkeypatch):
    _fake_sbatch(tmp_path, monkeypatch, 'echo "$@" > "$(dirname "$0")/args"; env > "$(dirname "$0")/env"; echo 7')
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    assert slurmcli.submit(tmp_path / "job.sh", args=["--qos=low"]) == "7"
    assert (tmp_path / "bin" / "args").read_text().split() == ["--parsable", "--qos=low", str(tmp_path / "job.sh")]
    assert "SLURM_JOB_ID" not in (tmp_path / "bin" / "env").read_text()
    assert slurmcli.submit("job.sh", env={"PATH": os.environ["PATH"], "X_ONLY": "1"}) == "7"
    assert "X_ONLY=1" in (tmp_path / "bin" / "env").read_text()


def test_submit_refusal_names_reason_and_fix(tmp_path, monkeypatch):
    _fake_sbatch(tmp_path, monkeypatch, 'echo "sbatch: error: Invalid account or account/partition combination" >&2; exit 1')
    with pytest.raises(ClusterError, match=r"sbatch refused the job script .*job.sh: sbatch: error: Invalid account.*Fix: "):
        slurmcli.submit(tmp_path / "job.sh")


def test_submit_without_a_job_id_is_a_refusal(tmp_path, monkeypatch):
    _fake_sbatch(tmp_path, monkeypatch, "echo 'Submitted to the void'")
    with pytest.raises(ClusterError, match="Submitted to the void"):
        slurmcli.submit(tmp_path / "job.sh")


def test_submit_is_time_limited(tmp_path, monkeypatch):
    _fake_sbatch(tmp_path, monkeypatch, "exec sleep 30")
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="did not answer within 1 s: is slurmctld up"):
        slurmcli.submit(tmp_path / "job.sh", timeout=1)
    assert time.monotonic() - t0 < 10


def test_one_set_of_terminal_states():
    from labkit.cluster import handle

    assert handle.TERMINAL is slurmcli.TERMINAL_STATES
    assert {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "GONE"} <= slurmcli.TERMINAL_STATES
    assert not {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "SUSPENDED"} & slurmcli.TERMINAL_STATES
