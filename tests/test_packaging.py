"""The three places that name the lab's dependencies agree: pyproject, environment.yml, binder/."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# conda-forge name -> pip name, where they differ
CONDA_TO_PIP = {"pytorch": "torch", "pytorch-cpu": "torch", "python": None, "pip": None, "nodejs": None}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_deps() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = {_name(d) for d in data["project"]["dependencies"]}
    return deps


def pyproject_test_deps() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {_name(d) for d in data["project"]["optional-dependencies"]["test"]}


def conda_deps(path: Path) -> set[str]:
    env = yaml.safe_load(path.read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            names |= {_name(d) for d in dep.get("pip", []) if not d.startswith(("-", "."))}
        else:
            n = _name(dep)
            n = CONDA_TO_PIP.get(n, n)
            if n:
                names.add(n)
    return names


def test_environment_yml_matches_pyproject():
    want = pyproject_deps() | pyproject_test_deps()
    have = conda_deps(REPO / "environment.yml") - {"labkit"}
    assert want - have == set(), f"missing from environment.yml: {sorted(want - have)}"
    assert have - want == set(), f"in environment.yml but not pyproject.toml: {sorted(have - want)}"


def test_binder_matches_pyproject():
    want = pyproject_deps()
    have = conda_deps(REPO / "binder" / "environment.yml")
    assert want - have == set(), f"missing from binder/environment.yml: {sorted(want - have)}"
    assert have - want == set(), f"in binder/environment.yml but not pyproject.toml: {sorted(have - want)}"
    # CPU-only and small: the cpu build of pytorch, no test extras
    text = (REPO / "binder" / "environment.yml").read_text()
    assert "pytorch-cpu" in text and "cuda" not in text.lower()
    assert not (pyproject_test_deps() & have)


def test_binder_scripts():
    post = (REPO / "binder" / "postBuild").read_text()
    start = (REPO / "binder" / "start").read_text()
    assert "pip install" in post and "--no-deps" in post
    assert "LABKIT_PROFILE=binder" in start and "LABKIT_SCALE=binder" in start and 'exec "$@"' in start


def test_console_script_declared():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["labkit"] == "labkit.lab.cli:main"


def _specs(reqs) -> dict[str, str]:
    """name -> version specifier (``>=4``), extras dropped, conda names mapped to pip ones."""
    out = {}
    for req in reqs:
        if not isinstance(req, str) or req.startswith(("-", ".")):
            continue
        name = CONDA_TO_PIP.get(_name(req), _name(req))
        if name:
            out[name] = re.sub(r"^[A-Za-z0-9_.\-]+(\[[^\]]*\])?", "", req.strip()).strip()
    return out


def _conda_specs(path: Path) -> dict[str, str]:
    deps = yaml.safe_load(path.read_text())["dependencies"]
    pip = [d for dep in deps if isinstance(dep, dict) for d in dep.get("pip", [])]
    return _specs([d for d in deps if isinstance(d, str)] + pip)


def test_version_floors_agree():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    want = _specs(data["project"]["dependencies"] + data["project"]["optional-dependencies"]["test"])
    for path in (REPO / "environment.yml", REPO / "binder" / "environment.yml"):
        have = _conda_specs(path)
        differ = {n: (want[n], have[n]) for n in want.keys() & have.keys() if want[n] != have[n]}
        assert not differ, f"{path.relative_to(REPO)} pins differently from pyproject.toml: {differ}"
    # tests/test_serve_schema.py drives the v4 command line (--phases, --generation-database)
    assert want["schemathesis"] == ">=4"
