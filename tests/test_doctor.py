import os
import subprocess
import sys

from labkit.doctor import FAIL, run_doctor, slurm_partitions


def test_doctor_reports_local_gpu_partition(slurm):
    report = run_doctor()
    gpu = {p.name: p for p in report.partitions}["gpu"]
    assert gpu.gpus_per_node == 2
    text = report.text()
    assert "gpu (1 node" in text and "2 GPUs/node" in text
    assert "package torch" in text and "RAM" in text


def test_doctor_cli_exit_codes(slurm, tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "labkit", "doctor"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 GPUs/node" in r.stdout
    # a broken profile name is a failure that says what to do
    env["LABKIT_PROFILE"] = "nosuch"
    r = subprocess.run([sys.executable, "-m", "labkit", "doctor"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "[FAIL] config" in r.stdout and "valid profiles" in r.stdout


def test_doctor_fails_when_slurm_profile_but_no_slurm(monkeypatch, tmp_path):
    # an empty PATH for sinfo: the slurm profile needs it, so the doctor fails and says how to fix
    monkeypatch.setenv("LABKIT_PROFILE", "slurm")
    monkeypatch.setenv("PATH", str(tmp_path))
    report = run_doctor()
    slurm = [c for c in report.checks if c.name == "slurm"][0]
    assert slurm.status == FAIL and "local-slurm.sh up" in slurm.fix
    assert not report.ok


def test_doctor_proxy_check(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    report = run_doctor()
    c = [c for c in report.checks if c.name == "dashboard link"][0]
    assert "/user/ada/proxy/" in c.detail


def test_sinfo_parse(slurm):
    parts = slurm_partitions()
    assert any(p.name == "gpu" and "gpu:2" in p.gres for p in parts)


def test_doctor_runs_folder(monkeypatch, tmp_path):
    from labkit.doctor import OK, _check_runs

    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))
    c = _check_runs()
    assert c.status == OK and str(tmp_path / "runs") in c.detail and "LABKIT_RUN_DIR" in c.detail
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "file"))  # a file, not a folder: nothing fits in it
    c = _check_runs()
    assert c.status == FAIL and "LABKIT_RUN_DIR" in c.fix


def test_doctor_auto_profile_is_what_start_cluster_would_pick(slurm, monkeypatch, tmp_path):
    """Under auto with a Slurm profile in the user file, the doctor reports slurm (Slurm answers here),
    as start_cluster() would; with Slurm unreachable, the configured Slurm is a failure, not a quiet local."""
    user = tmp_path / "user.yaml"
    user.write_text("profiles:\n  slurm:\n    partition: gpu\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    line = [c for c in run_doctor().checks if c.name == "profile"][0]
    assert line.detail.startswith("auto -> slurm (slurm)") and "answer" in line.detail, line.detail
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo/squeue
    report = run_doctor()
    line = [c for c in report.checks if c.name == "profile"][0]
    assert line.detail.startswith("auto -> local (local)"), line.detail
    assert [c for c in report.checks if c.name == "slurm"][0].status == FAIL and not report.ok
