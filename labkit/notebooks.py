"""Run the lab's notebooks headless: inject parameters, execute with nbclient, report.

The notebooks each have one cell tagged ``parameters``; values given here are written into
a new cell right after it (tagged ``injected-parameters``), so the notebook's own defaults
stay visible and the run's values win.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import nbformat

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def list_notebooks(directory: Path | str = NOTEBOOK_DIR) -> list[Path]:
    """The lab's notebooks in teaching order (their names start with a two-digit number)."""
    return sorted(p for p in Path(directory).glob("*.ipynb") if not p.name.startswith("."))


def parameters_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indexes of the cells tagged ``parameters``."""
    return [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]


def inject_parameters(nb: nbformat.NotebookNode, params: Mapping[str, Any]) -> nbformat.NotebookNode:
    """Insert a cell after the ``parameters`` cell that sets ``params``; raises if there is not exactly one."""
    idx = parameters_cells(nb)
    if len(idx) != 1:
        raise ValueError(f"expected exactly one cell tagged 'parameters', found {len(idx)}: in JupyterLab select "
                         "the cell that sets scale/profile and add the tag 'parameters' (right sidebar, Property "
                         "Inspector, Cell Tags), and remove it from any other cell")
    lines = ["# Parameters injected by labkit"] + [f"{k} = {v!r}" for k, v in params.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx[0] + 1, cell)
    return nb


@dataclass
class NotebookRun:
    """What happened when one notebook ran."""

    path: Path
    seconds: float
    error: str | None
    notebook: nbformat.NotebookNode

    @property
    def ok(self) -> bool:
        return self.error is None


def execute_notebook(
    path: Path | str,
    params: Mapping[str, Any] | None = None,
    *,
    timeout: int = 600,
    env: Mapping[str, str] | None = None,
    kernel_name: str = "python3",
    on_kernel_start: Callable[[int], None] | None = None,
) -> NotebookRun:
    """Execute one notebook in its own folder with ``params`` injected; never raises for a cell error.

    ``on_kernel_start(pid)`` is called with the kernel's process id once it is up (to watch its memory).
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if params:
        inject_parameters(nb, params)
    kernel_env = dict(os.environ)
    kernel_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([kernel_env["PYTHONPATH"]] if kernel_env.get("PYTHONPATH") else [])
    )
    if params and "scale" in params and params["scale"]:
        kernel_env["LABKIT_SCALE"] = str(params["scale"])
    if params and params.get("profile"):
        kernel_env["LABKIT_PROFILE"] = str(params["profile"])
    kernel_env.update(env or {})
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    if on_kernel_start is not None:
        client.on_notebook_start = lambda notebook: on_kernel_start(client.km.provisioner.pid)
    start = time.monotonic()
    error = None
    try:
        client.execute(env=kernel_env)
    except CellExecutionError as exc:
        error = str(exc)
    except Exception as exc:  # a dead kernel or timeout is an error of this notebook, not of the runner
        error = f"{type(exc).__name__}: {exc}"
    return NotebookRun(path=path, seconds=time.monotonic() - start, error=error, notebook=nb)
