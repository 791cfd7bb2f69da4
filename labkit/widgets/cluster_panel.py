"""ClusterPanel: a live view of a labkit cluster (workers, GPUs, memory, tasks, pending jobs).

In Jupyter it is an ipywidgets HTML refreshed by a background thread, so cells keep running
while it updates; elsewhere it prints the same table as text.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets
from IPython import get_ipython
from IPython.display import display

from ..cluster.status import ClusterStatus


def in_jupyter() -> bool:
    """True inside a Jupyter kernel (where widgets render)."""
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def status_html(st: ClusterStatus) -> str:
    """The snapshot as a small HTML table."""
    if st.closed:
        return "<b>labkit cluster</b>: closed"
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(w.name)}</td><td>{esc(w.host or '-')}</td><td>{esc(','.join(w.gpus) or '-')}</td><td>{w.threads}</td>"
        f"<td><progress max='{max(w.memory_limit, 1)}' value='{w.memory_used}'></progress> "
        f"{w.memory_used / 2**30:.1f}/{w.memory_limit / 2**30:.1f} GiB</td>"
        f"<td>{w.executing}</td><td>{w.ready}</td><td>{w.in_memory}</td></tr>"
        for w in st.workers
    )
    pending = "".join(f"<li>{esc(p)}</li>" for p in st.pending)
    link = f"<a href='{esc(st.dashboard)}' target='_blank'>dashboard</a>" if st.dashboard else ""
    return (
        f"<div><b>{esc(st.kind)} cluster</b>, profile <code>{esc(st.profile)}</code>: "
        f"{len(st.workers)}/{st.target} workers &middot; <code>{esc(st.address)}</code> &middot; {link}"
        "<table><tr><th>worker</th><th>node</th><th>GPUs</th><th>threads</th><th>memory</th><th>running</th>"
        f"<th>ready</th><th>results held</th></tr>{rows}</table>"
        + (f"<div>pending jobs:<ul>{pending}</ul></div>" if pending else "")
        + "</div>"
    )


class ClusterPanel:
    """Live panel for a ClusterHandle; ``interval`` seconds between refreshes."""

    def __init__(self, handle: Any, interval: float = 2.0):
        self.handle = handle
        self.interval = interval
        self.last: ClusterStatus | None = None
        self.updates = 0
        self._gpu_cache: dict[str, tuple[str, ...]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._widget: Any = None

    def refresh(self) -> ClusterStatus:
        """Take a new snapshot and push it to the widget (if shown)."""
        try:
            st = self.handle.status(self._gpu_cache)
        except Exception as exc:  # a closing cluster: show it, never raise into a thread
            st = ClusterStatus(self.handle.kind, self.handle.profile.name, "", f"unavailable: {exc}", 0, closed=True)
        self.last = st
        self.updates += 1
        if self._widget is not None:
            self._widget.value = status_html(st)
        return st

    def text(self) -> str:
        """The current state as text."""
        return (self.last or self.refresh()).text()

    def start(self) -> "ClusterPanel":
        """Refresh in a daemon thread until stop() or the cluster closes."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="labkit-cluster-panel", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop refreshing (the last view stays)."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            st = self.refresh()
            if st.closed:
                break
            self._stop.wait(self.interval)

    def show(self) -> "ClusterPanel":
        """Display: a live widget in Jupyter, else the text once."""
        if in_jupyter():
            if self._widget is None:
                self._widget = ipywidgets.HTML(status_html(self.refresh()))
            display(self._widget)
            self.start()
        else:
            print(self.text())
        return self

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        return self.text()
