
import os
from pathlib import Path

import pytest

from labkit.config import ConfigError, load_config
from labkit.settings import Memory, Walltime


def test_packaged_profiles_and_scales():
    cfg = load_config()
    assert {"local", "slurm", "binder"} <= set(cfg.profiles)
    assert list(cfg.scales)[:4] == ["tiny", "binder", "workshop", "full"]
    assert cfg.profile("slurm").kind == "slurm"
    assert cfg.profile("slurm").tls is True
    assert cfg.profile("binder").workers == 1
    assert cfg.scale().name == "tiny"  # LABKIT_SCALE from conftest


def test_layers_site_then_user_then_env(tmp_path, monkeypatch):
    site = tmp_path / "site.yaml"
    user = tmp_path / "user.yaml"
    site.write_text("profile: slurm\nprofiles:\n  slurm:\n    partition: a100\n    account: proj1\n    require_account: true\n")
    user.write_text("profiles:\n  slurm:\n    partition: h100\n  mine:\n    kind: slurm\n    walltime: '00:30:00'\n")
    monkeypatch.setenv("LABKIT_SITE_CONFIG", str(site))
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    cfg = load_config()
    assert cfg.default_profile == "slurm"
    p = cfg.profile()
    assert (p.partition, p.account, p.require_account) == ("h100", "proj1", True)
    assert p.source == str(user)
    mine = cfg.profile("mine")
    assert mine.kind == "slurm" and mine.walltime == "00:30:00" and mine.gpus_per_worker == 1
    assert {"slurm", "mine"} <= cfg.configured_profiles
    monkeypatch.setenv("LABKIT_PROFILE", "local")
    assert load_config().profile().name == "local"


def test_unknown_profile_names_choices(monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "nosuch")
    with pytest.raises(ConfigError) as e:
        load_config()
    msg = str(e.value)
    assert "nosuch" in msg and "local" in msg and "slurm" in msg and "LABKIT_PROFILE" in msg


def test_unknown_scale(monkeypatch):
    monkeypatch.setenv("LABKIT_SCALE", "huge")
    with pytest.raises(ConfigError, match=r"unknown scale 'huge'.*tiny, binder, workshop, full"):
        load_config()


def test_malformed_yaml_names_file_and_line(tmp_path, monkeypatch):
    bad = tmp_path / "user.yaml"
    bad.write_text("profiles:\n  slurm:\n    partition: [gpu\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(bad))
    with pytest.raises(ConfigError) as e:
        load_config()
    assert str(bad) in str(e.value) and "line" in str(e.value)


def test_unknown_key_names_file_and_key(tmp_path, monkeypatch):
    bad = tmp_path / "site.yaml"
    bad.write_text("profiles:\n  slurm:\n    partiton: gpu\n")
    monkeypatch.setenv("LABKIT_SITE_CONFIG", str(bad))
    with pytest.raises(ConfigError) as e:
        load_config()
    assert str(bad) in str(e.value) and "profiles.slurm.partiton" in str(e.value) and "partition" in str(e.value)


@pytest.mark.parametrize("body,needle", [
    ("profiles:\n  slurm:\n    walltime: 'one hour'\n", "walltime"),
    ("profiles:\n  slurm:\n    memory: lots\n", "memory"),
    ("profiles:\n  slurm:\n    workers: -1\n", "workers"),
    ("profiles:\n  slurm:\n    kind: pbs\n", "kind"),
    ("profiles:\n  new:\n    workers: 3\n", "kind"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_values(tmp_path, monkeypatch, body, needle):
    f = tmp_path / "user.yaml"
    f.write_text(body)
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(f))
    with pytest.raises(ConfigError, match=needle):
        load_config()


def test_missing_named_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()


def test_parsers():
    assert Walltime("01:30:00").seconds == 5400
    assert Walltime("45").seconds == 2700
    assert Walltime("2-00:00:00").seconds == 2 * 86400
    assert Memory("4GiB").bytes == 4 * 2**30
    assert Memory("500MB").bytes == 500 * 10**6
    for bad in ("1:99:00", "abc", "0"):
        with pytest.raises(ConfigError):
            Walltime(bad)
    with pytest.raises(ConfigError):
        Memory("4 parsecs")


def test_profile_replace_validates():
    p = load_config().profile("slurm")
    q = p.replace(partition="debug", walltime="00:10:00")
    assert q.partition == "debug" and p.partition == "gpu"
    with pytest.raises(ConfigError, match="unknown profile key"):
        p.replace(partion="x")
    with pytest.raises(ConfigError, match="walltime"):
        p.replace(walltime="soon")


def test_scale_sections(tmp_path, monkeypatch):
    f = tmp_path / "user.yaml"
    f.write_text("scales:\n  tiny:\n    train:\n      max_steps: 3\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(f))
    assert load_config().scale("tiny").section("train") == {"max_steps": 3}
    assert load_config().scale("tiny").section("data") == {}


def _checkout(tmp_path):
    root = tmp_path / "labkit-checkout"
    (root / "labkit").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'labkit'\n")
    return root


def test_runs_dir_env_then_checkout(tmp_path):
    from labkit.config import runs_dir, runs_dir_choice

    root = _checkout(tmp_path)
    assert runs_dir({"LABKIT_RUN_DIR": "~/mine", "HOME": str(tmp_path)}) == tmp_path / "mine"
    path, why = runs_dir_choice({"HOME": str(tmp_path / "home")}, checkout=root)
    assert path == root / "runs" and "checkout" in why  # writable (it will be created there)


def test_new_run_dir_and_runner_share_the_stamp(tmp_path, monkeypatch):
    from datetime import datetime

    from labkit.config import new_run_dir
    from labkit.lab.runner import default_output

    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))
    now = datetime(2026, 1, 28, 14, 15, 2)
    assert new_run_dir("gpt", "tiny", now) == tmp_path / "runs" / "gpt-tiny" / "20260128-141502"
    assert default_output(now) == tmp_path / "runs" / "run-20260128-141502"
    assert new_run_dir("pruned", "binder").parent == tmp_path / "runs" / "pruned-binder"
    assert not (tmp_path / "runs").exists()  # a name only: the notebook's save makes it


def test_runs_dir_falls_back_to_home_when_checkout_runs_unusable(tmp_path):
    from labkit.config import runs_dir_choice

    root = _checkout(tmp_path)
    (root / "runs").write_text("not a folder")  # a file where the folder should be: nothing can go in it
    path, why = runs_dir_choice({"HOME": str(tmp_path / "home")}, checkout=root)
    assert path == tmp_path / "home" / "labkit-runs"
    assert "not writable" in why and "LABKIT_RUN_DIR" in why


CHOICE = "import sys; from pathlib import Path; from labkit.config import runs_dir_choice; " \
         "print(runs_dir_choice({'HOME': sys.argv[2]}, checkout=Path(sys.argv[1]))[0])"


def _choice_with_read_only(checkout: Path, home: Path, read_only: Path) -> Path:
    """runs_dir_choice while ``read_only`` cannot be written to. Root writes through permission
    bits, so as root the folder is bind-mounted read-only in a private mount namespace
    (``unshare -m``), where even root gets EROFS; otherwise plain 0555 permissions do it."""
    import shutil
    import subprocess
    import sys

    from labkit.config import runs_dir_choice

    if os.geteuid() != 0:
        read_only.chmod(0o555)
        try:
            return runs_dir_choice({"HOME": str(home)}, checkout=checkout)[0]
        finally:
            read_only.chmod(0o755)
    if shutil.which("unshare") is None:
        from conftest import skip_unless_ci

        skip_unless_ci("running as root without util-linux's unshare: cannot make a folder read-only for root")
    ro = str(read_only)
    script = (f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" && '
              f'exec "{sys.executable}" -c "$0" "$1" "$2"')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, CHOICE, str(checkout), str(home)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip())


def test_runs_dir_falls_back_for_read_only_shared_checkout(tmp_path):
    root = _checkout(tmp_path)
    home = tmp_path / "home"
    # a class-wide checkout owned by the instructor, no runs/ yet
    assert _choice_with_read_only(root, home, root) == home / "labkit-runs"
    # runs/ made by the instructor, read-only for learners
    (root / "runs").mkdir()
    assert _choice_with_read_only(root, home, root / "runs") == home / "labkit-runs"
    # and writable again: the checkout's own runs/ is used
    from labkit.config import runs_dir_choice

    assert runs_dir_choice({"HOME": str(home)}, checkout=root)[0] == root / "runs"
