"""`make lab` and Binder's start script point the Dask sidebar's factory at labkit's cluster."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RESOLVE = """
import importlib, dask.config
f = dask.config.get("labextension.factory")
cls = getattr(importlib.import_module(f["module"]), f["class"])
print(cls.__module__ + "." + cls.__name__)
"""


def _factory_from(env_lines: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_LABEXTENSION")}
    env.update(env_lines, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", RESOLVE], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export DASK_LABEXTENSION"):
            key, _, value = line[len("export "):].partition("=")
            out[key.rstrip(" ?")] = value.strip()
    return out


def test_make_lab_and_binder_start_set_the_sidebar_factory():
    for source in (REPO / "Makefile", REPO / "binder" / "start"):
        env = _exports(source.read_text())
        assert set(env) == {"DASK_LABEXTENSION__FACTORY__MODULE", "DASK_LABEXTENSION__FACTORY__CLASS"}, source
        assert _factory_from(env) == "labkit.cluster.sidebar.LabkitCluster", source
