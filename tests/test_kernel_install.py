"""`labkit install-kernel`: a kernelspec for this interpreter, with LABKIT_* passed through, that really starts."""

import json
import sys

import nbformat
import pytest

from labkit.lab.cli import main
from labkit.lab.notebooks import execute_notebook


def test_install_kernel_into_prefix_and_run_it(tmp_path, monkeypatch, capsys):
    prefix = tmp_path / "prefix"
    monkeypatch.setenv("LABKIT_PROFILE", "binder")
    rc = main(["install-kernel", "--prefix", str(prefix), "--name", "labkit-test", "--env", "LABKIT_MARK=from-spec"])
    assert rc == 0, capsys.readouterr().err
    spec_dir = prefix / "share" / "jupyter" / "kernels" / "labkit-test"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["env"]["LABKIT_PROFILE"] == "binder" and spec["env"]["LABKIT_MARK"] == "from-spec"
    assert spec["env"]["LABKIT_SCALE"] == "tiny"  # set by conftest, passed through like any LABKIT_*
    assert "labkit (Python" in spec["display_name"]

    # Jupyter finds it through JUPYTER_PATH and a notebook runs in it, with the spec's environment.
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.delenv("LABKIT_PROFILE")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import os, sys, labkit\nprint(sys.executable, os.environ['LABKIT_PROFILE'], os.environ['LABKIT_MARK'])"
    )]
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    run = execute_notebook(path, kernel_name="labkit-test", timeout=120)
    assert run.ok, run.error
    assert run.notebook.cells[0].outputs[0]["text"].split() == [sys.executable, "binder", "from-spec"]


def test_install_kernel_rejects_bad_input(tmp_path, capsys):
    assert main(["install-kernel", "--prefix", str(tmp_path), "--name", "Bad Name"]) == 2
    assert "lowercase" in capsys.readouterr().err
    assert main(["install-kernel", "--prefix", str(tmp_path), "--env", "NOEQUALS"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["install-kernel", "--user", "--prefix", str(tmp_path)])
    assert not (tmp_path / "share").exists()
