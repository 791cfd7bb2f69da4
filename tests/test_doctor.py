import json
import os
import subprocess
import sys

import pytest

from labkit.lab.doctor import (
    FAIL,
    OK,
    WARN,
    DoctorReport,
    _check_proxy,
    enable_extension_fix,
    run_doctor,
    server_extension_enabled,
    slurm_partitions,
)


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


@pytest.mark.parametrize("script, needle", [
    (None, "sinfo not found: Slurm's client tools are not installed or not on PATH"),
    ("echo 'slurm_load_partitions: Unable to contact slurm controller' >&2; exit 1",
     "sinfo failed: slurm_load_partitions: Unable to contact slurm controller"),
    ("exec sleep 5", "sinfo did not answer within 1 s: is slurmctld running?"),
])
def test_sinfo_problems_keep_the_doctor_wording(monkeypatch, tmp_path, script, needle):
    if script is not None:  # a stand-in sinfo that fails the way a broken or hung Slurm does
        (tmp_path / "sinfo").write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin" if script else str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        slurm_partitions(timeout=1)
    assert str(err.value) == needle


def test_doctor_runs_folder(monkeypatch, tmp_path):
    from labkit.lab.doctor import OK, _check_runs

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


def _jupyter_config(folder, name, enabled, in_d=True):
    """Write one Jupyter Server config file under `folder` that enables or disables extension `name`."""
    data = json.dumps({"ServerApp": {"jpserver_extensions": {name: enabled}}})
    path = folder / "jupyter_server_config.d" / f"{name}.json" if in_d else folder / "jupyter_server_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    return path


def _user_jupyter_dir(monkeypatch, tmp_path):
    """A temporary user config folder, first in the Jupyter config path (outside a virtualenv's default)."""
    for var in ("JUPYTER_CONFIG_PATH", "JUPYTER_NO_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "0")
    user = tmp_path / "jupyter"
    user.mkdir()
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(user))
    return user


def test_doctor_proxy_extension_disabled_warns_with_the_fix(monkeypatch, tmp_path):
    user = _user_jupyter_dir(monkeypatch, tmp_path)
    off = _jupyter_config(user, "jupyter_server_proxy", False)  # as `jupyter server extension disable --user`
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    c = _check_proxy()
    assert c.status == WARN, c
    assert str(off) in c.detail and "/user/ada/proxy/" in c.detail
    assert c.fix.startswith("jupyter server extension enable --user jupyter_server_proxy")
    assert "[warn] dashboard link" in DoctorReport(checks=[c]).text() and c.fix in DoctorReport(checks=[c]).text()
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX")  # not behind JupyterHub: fine, with a hint for later
    c = _check_proxy()
    assert c.status == OK and "disabled" in c.detail and "--user jupyter_server_proxy" in c.detail
    # the fix it names works: run it (it writes only into the temporary user folder), then the check passes
    command = c.detail.split("before using JupyterHub: ")[1].split(",")[0].split()
    assert command[:4] == ["jupyter", "server", "extension", "enable"]
    r = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    assert _check_proxy().status == OK


def test_enable_extension_fix_targets_the_folder_that_disables(monkeypatch, tmp_path):
    from jupyter_core.paths import ENV_CONFIG_PATH

    user = _user_jupyter_dir(monkeypatch, tmp_path)
    d_file = "jupyter_server_config.d/x.json"
    assert enable_extension_fix("x", "").startswith("jupyter server extension enable --user x,")  # named nowhere
    assert enable_extension_fix("x", str(user / d_file)).startswith("jupyter server extension enable --user x,")
    env_file = os.path.join(ENV_CONFIG_PATH[0], d_file)
    assert enable_extension_fix("x", env_file).startswith("jupyter server extension enable --sys-prefix x,")
    # a folder's jupyter_server_config.json beats what the command writes, and JUPYTER_CONFIG_PATH
    # folders have no flag: the fix names the file to edit
    root = str(user / "jupyter_server_config.json")
    assert enable_extension_fix("x", root).startswith(f'in {root} set "x": true')
    other = str(tmp_path / "elsewhere" / d_file)
    assert enable_extension_fix("x", other).startswith(f'in {other} set "x": true')


def test_doctor_proxy_extension_enabled_is_ok(monkeypatch, tmp_path):
    user = _user_jupyter_dir(monkeypatch, tmp_path)
    # the folder's own jupyter_server_config.json beats its .d files, as in jupyter_server
    _jupyter_config(user, "jupyter_server_proxy", False)
    on = _jupyter_config(user, "jupyter_server_proxy", True, in_d=False)
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    c = _check_proxy()
    assert c.status == OK and "/user/ada/proxy/<port>/status" in c.detail, c
    assert server_extension_enabled("jupyter_server_proxy") == (True, str(on))


def test_server_extension_enabled_agrees_with_jupyter_server(tmp_path):
    """Our cheap reading gives what Jupyter Server itself would load, for layered folders."""
    from jupyter_server.extension.config import ExtensionConfigManager

    user, env, system = (tmp_path / n for n in ("user", "env", "system"))
    _jupyter_config(system, "a", True)
    _jupyter_config(env, "a", False)           # a higher folder disables a
    _jupyter_config(system, "b", True)         # b: only the system folder says
    _jupyter_config(env, "c", True)
    _jupyter_config(user, "c", False, in_d=False)
    _jupyter_config(user, "c", True)           # the user's .json beats its own .d file: c off
    (env / "jupyter_server_config.d" / "broken.json").write_text("{not json")  # skipped, as by jupyter_server
    dirs = [str(user), str(env), str(system)]
    theirs = ExtensionConfigManager(read_config_path=dirs).get_jpserver_extensions()
    for name in ("a", "b", "c", "d"):
        assert server_extension_enabled(name, dirs)[0] == bool(theirs.get(name, False)), name
    assert server_extension_enabled("a", dirs) == (False, str(env / "jupyter_server_config.d" / "a.json"))
    assert server_extension_enabled("d", dirs) == (False, "")  # named nowhere: not loaded


def test_doctor_lists_the_config_files_it_read(monkeypatch, tmp_path):
    """The instructor guide promises that the doctor shows which config layers were read."""
    user = tmp_path / "mine.yaml"
    user.write_text("scale: tiny\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    line = [c for c in run_doctor().checks if c.name == "config files"][0]
    assert str(user) in line.detail and "defaults.yaml" in line.detail

