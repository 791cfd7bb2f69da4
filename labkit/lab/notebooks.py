"""Run the lab's notebooks headless: inject parameters, execute with nbclient, report.

The notebooks each have one cell tagged ``parameters``; values given here are written into
a new cell right after it (tagged ``injected-parameters``), so the notebook's own defaults
stay visible and the run's values win.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import nbformat
from nbclient.exceptions import CellExecutionError

from labkit.lab.kernel_watch import KernelStalled, NotebookStopped, WatchedClient

REPO_ROOT = Path(__file__).resolve().parents[2]  # labkit/lab/notebooks.py -> the checkout
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
    nudges: list[str] = field(default_factory=list)  # cells whose reply was late: the kernel was nudged
    stopped: str | None = None  # why the watchdog gave up: a stalled kernel, or a budget from should_stop
    missed_wakeups: int = 0  # kernel messages the client's zmq poll missed and found a second later

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
    should_stop: Callable[[], str | None] | None = None,
    stall_after: float = 55.0,
    nudge_after: float | None = 5.0,
    on_stall: Callable[[Any, Any], None] | None = None,
) -> NotebookRun:
    """Execute one notebook in its own folder with ``params`` injected; never raises for a cell error.

    ``on_kernel_start(pid)`` is called with the kernel's process id once it is up (to watch its memory).
    A kernel that stops answering is nudged after ``nudge_after`` seconds (None: never) and fails the
    run about ``stall_after`` seconds later, naming the cell (``on_stall(client, watch)`` runs first);
    a reason returned by ``should_stop()`` (polled twice a second) stops it at once
    (see :mod:`labkit.lab.kernel_watch`).
    """
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
    client = WatchedClient(
        nb, timeout=timeout, kernel_name=kernel_name, should_stop=should_stop, stall_after=stall_after,
        nudge_after=nudge_after, on_stall=on_stall,
        resources={"metadata": {"path": str(path.parent)}},
    )
    if on_kernel_start is not None:
        client.on_notebook_start = lambda notebook: on_kernel_start(client.km.provisioner.pid)
    start = time.monotonic()
    error = stopped = None
    try:
        client.execute(env=kernel_env)
    except CellExecutionError as exc:
        error = str(exc)
    except (KernelStalled, NotebookStopped) as exc:
        error = stopped = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a dead kernel or timeout is an error of this notebook, not of the runner
        error = f"{type(exc).__name__}: {exc}"
    return NotebookRun(path=path, seconds=time.monotonic() - start, error=error, notebook=nb,
                       nudges=list(client.watch_log.nudges), stopped=stopped,
                       missed_wakeups=client.watch_log.missed_wakeups)
