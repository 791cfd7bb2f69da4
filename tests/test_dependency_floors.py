"""The lower bounds in pyproject.toml are true: labkit uses nothing newer than the floor it declares.

Three checks, each able to fail: a scan for NumPy names that only exist from NumPy 2 on; a table of
the APIs that set a floor (each row's use must still be found in the code, so the table cannot rot);
and every third-party import is declared, or comes with a declared dependency. The declared floor of
NumPy is also simulated: the code that used ``np.trapezoid`` runs on a NumPy without it.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(REPO / "labkit").rglob("*.py"), *(REPO / "bench").rglob("*.py")])

# top-level NumPy names that appeared in 2.x (release notes of 2.0, 2.1, 2.2)
NUMPY_NEW = {
    "2.0": ["trapezoid", "concat", "permute_dims", "pow", "acos", "acosh", "asin", "asinh", "atan", "atan2",
            "atanh", "bitwise_left_shift", "bitwise_right_shift", "bitwise_invert", "bitwise_count",
            "isdtype", "astype", "matrix_transpose", "vecdot", "unique_all", "unique_counts",
            "unique_inverse", "unique_values", "strings", "ulong"],
    "2.1": ["cumulative_sum", "cumulative_prod", "unstack"],
    "2.2": ["matvec", "vecmat"],
}

# (distribution, minimum version, regex that finds the use in labkit/ or bench/, what sets the floor)
API_FLOORS = [
    ("torch", "2.0", r"F\.scaled_dot_product_attention\(", "torch.nn.functional.scaled_dot_product_attention"),
    ("torch", "1.13", r"torch\.load\(.*weights_only=", "torch.load(weights_only=...)"),
    ("torch", "2.6", r"from torch\.distributed\.fsdp import [^\n]*\bfully_shard\b", "torch.distributed.fsdp.fully_shard (FSDP2)"),
    ("safetensors", "0.4", r"from safetensors\.torch import", "safetensors.torch save/load of bytes with metadata"),
    ("transformers", "4.36", r"attn_implementation=attn_implementation", "from_pretrained(attn_implementation=...)"),
    ("pydantic", "2.0", r"from pydantic import [^\n]*\bfield_validator\b", "pydantic v2 (ConfigDict, field_validator)"),
    ("cryptography", "2.0", r"from cryptography\.hazmat\.primitives\.ciphers\.aead import AESGCM",
     "cryptography's AESGCM and HKDF (encryption at rest)"),
]

# imported by labkit but not declared itself: the declared distribution that always brings it
COMES_WITH = {
    "starlette": "fastapi",      # fastapi is built on starlette
    "IPython": "ipykernel",      # ipykernel depends on ipython
    "jupyter_core": "nbformat",  # nbformat depends on jupyter-core
    "traitlets": "jupyter_client",  # jupyter-client depends on traitlets
    "tornado": "distributed",    # distributed depends on tornado
    "distributed": "dask",       # declared as dask[distributed]
    "pydantic_core": "pydantic",  # pydantic pins its own pydantic-core
}
# import name -> distribution name, where they differ
IMPORT_TO_DIST = {"yaml": "pyyaml", "dask_jobqueue": "dask-jobqueue"}
# optional: imported inside a try that tells the user what to install
OPTIONAL = {"datasets", "dask_kubernetes", "kr8s"}  # dask_kubernetes: the labkit[kubernetes] extra, kr8s with it


def declared_floors() -> dict[str, Version]:
    """``{distribution: lowest version allowed}`` from pyproject.toml's dependencies."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    out = {}
    for text in data["project"]["dependencies"]:
        req = Requirement(text)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        out[req.name.lower()] = max(lows) if lows else Version("0")
    return out


def _source_text() -> dict[Path, str]:
    return {p: p.read_text() for p in SOURCES}


def test_numpy_names_are_covered_by_the_floor():
    floor = declared_floors()["numpy"]
    too_new = set()
    for path, text in _source_text().items():
        for since, names in NUMPY_NEW.items():
            for m in re.finditer(rf"(?<![\w.])(?:np|numpy)\.({'|'.join(names)})\b", text):
                if Version(since) > floor:
                    line = text.count("\n", 0, m.start()) + 1
                    too_new.add(f"{path.relative_to(REPO)}:{line} numpy.{m.group(1)} needs NumPy >= {since}")
    assert not too_new, (f"pyproject.toml promises numpy>={floor}, but: {sorted(too_new)}; raise the floor (in "
                         "environment.yml and binder/environment.yml too) or avoid the name")


@pytest.mark.parametrize("dist,minimum,pattern,what", API_FLOORS, ids=[r[3] for r in API_FLOORS])
def test_api_floor(dist, minimum, pattern, what):
    where = [p for p, text in _source_text().items() if re.search(pattern, text)]
    assert where, (f"no use of {what} found any more ({pattern!r}): drop or update its row in "
                   "API_FLOORS of tests/test_dependency_floors.py")
    floors = declared_floors()
    assert dist in floors, (f"{where[0].relative_to(REPO)} uses {what}, but {dist} is not declared: add "
                            f"'{dist}>={minimum}' to pyproject.toml and the environment.yml files")
    assert floors[dist] >= Version(minimum), (
        f"{where[0].relative_to(REPO)} uses {what}, which needs {dist} >= {minimum}, but pyproject.toml "
        f"allows {dist} {floors[dist]}: raise the floor there and in the environment.yml files")


def _third_party_imports() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("labkit", "bench", "__future__"):
                    found.setdefault(top, path)
    return found


def test_every_import_has_a_declared_floor():
    floors = declared_floors()
    missing = []
    for name, path in sorted(_third_party_imports().items()):
        if name in OPTIONAL:
            continue
        dist = name
        while dist in COMES_WITH:
            dist = COMES_WITH[dist]
        dist = IMPORT_TO_DIST.get(dist, dist).lower().replace("_", "-")
        if dist not in floors:
            missing.append(f"{name} (imported by {path.relative_to(REPO)})")
    assert not missing, (f"imported but not declared in pyproject.toml, so no floor holds: {missing}; "
                         "declare them (with the version the code needs) or name what brings them in COMES_WITH")


def test_lsh_params_runs_on_the_numpy_floor(monkeypatch):
    """NumPy 1.26 (the floor) has no ``np.trapezoid``; labkit's LSH tuning must not need it."""
    from labkit.data import clean as C

    want = C.lsh_params(0.8, 128)
    monkeypatch.delattr(np, "trapezoid", raising=False)
    assert C.lsh_params(0.8, 128) == want
