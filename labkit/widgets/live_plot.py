"""LivePlot: metrics drawn while work runs, one subplot per metric and one line per rank.

Each line is kept sorted by x: events from parallel work (a sweep's points, ranks) arrive in the
order they finish, and a line drawn in arrival order would zig-zag back and forth.

In JupyterLab it is a plotly ``FigureWidget`` that updates in place; in a terminal, in tests and
in CI it prints a short text line now and then. It only renders: feed it events as a sink
(``plot(event)``) or follow a Dask cluster with ``plot.attach(client)``.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any, Iterable, Sequence

import plotly.graph_objects as go
from IPython import get_ipython
from IPython.display import display
from plotly.subplots import make_subplots

from ..core.events import Event, Subscription, subscribe


def in_jupyter_kernel() -> bool:
    """True inside an IPython kernel (JupyterLab, nbclient), where widgets can render."""
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _insert_sorted(xs: list[Any], ys: list[float], x: Any, y: float) -> None:
    """Put (x, y) where x keeps ``xs`` sorted (after equal x's); in-order arrivals just append."""
    try:
        i = len(xs) if not xs or not x < xs[-1] else bisect.bisect_right(xs, x)
    except TypeError:  # x's that do not compare (mixed types): arrival order
        i = len(xs)
    xs.insert(i, x)
    ys.insert(i, y)


class LivePlot:
    """Plot chosen metrics of incoming events against ``x``, one line per ``group`` value."""

    def __init__(
        self,
        metrics: Sequence[str] = ("loss",),
        x: str = "step",
        group: str | None = "rank",
        kinds: Iterable[str] | None = None,
        title: str | None = None,
        mode: str = "auto",
        min_interval: float = 0.25,
        text_every: float = 5.0,
    ) -> None:
        if mode not in ("auto", "widget", "text", "silent"):
            raise ValueError("mode must be 'auto', 'widget', 'text' or 'silent'")
        self.metrics = list(metrics)
        self.x = x
        self.group = group
        self.kinds = frozenset(kinds) if kinds is not None else None
        self.title = title or ", ".join(self.metrics)
        self.min_interval = min_interval
        self.text_every = text_every
        self.events: list[Event] = []
        self._series: dict[tuple[str, Any], tuple[list[Any], list[float]]] = {}
        self._traces: dict[tuple[str, Any], int] = {}
        self._lock = threading.RLock()
        self._last_draw = 0.0
        self._last_text = 0.0
        self._timer: threading.Timer | None = None
        self._subscription: Subscription | None = None
        self.mode = ("widget" if in_jupyter_kernel() else "text") if mode == "auto" else mode
        self.widget = self._build_widget() if self.mode == "widget" else None

    # -- feeding ---------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        """Take one event (the sink interface)."""
        if self.kinds is not None and event.get("kind") not in self.kinds:
            return
        xv = event.get(self.x)
        if xv is None:
            return
        gv = event.get(self.group) if self.group else None
        with self._lock:
            self.events.append(event)
            for m in self.metrics:
                val = event.get(m)
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    _insert_sorted(*self._series.setdefault((m, gv), ([], [])), xv, float(val))
        self._schedule()

    def attach(self, client) -> "LivePlot":
        """Follow the events that the client's Dask workers emit."""
        self.detach()
        self._subscription = subscribe(client, self, kinds=self.kinds)
        return self

    def detach(self) -> None:
        """Stop following the cluster (the drawn data stays)."""
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    # -- reading ---------------------------------------------------------------------------
    def points(self, metric: str, group: Any = None) -> list[tuple[Any, float]]:
        """The (x, y) points drawn so far for one metric and group, in x order."""
        with self._lock:
            xs, ys = self._series.get((metric, group), ([], []))
            return list(zip(xs, ys))

    def groups(self) -> list[Any]:
        """The group values seen so far (e.g. ranks)."""
        with self._lock:
            return sorted({g for (_, g) in self._series}, key=str)

    # -- drawing ---------------------------------------------------------------------------
    def _build_widget(self):
        fig = make_subplots(rows=len(self.metrics), cols=1, shared_xaxes=True,
                            subplot_titles=self.metrics, vertical_spacing=0.08)
        fig.update_layout(title=self.title, height=220 * len(self.metrics) + 80,
                          margin=dict(l=50, r=20, t=60, b=40), showlegend=True)
        fig.update_xaxes(title_text=self.x, row=len(self.metrics), col=1)
        return go.FigureWidget(fig)

    def _schedule(self) -> None:
        now = time.monotonic()
        if now - self._last_draw >= self.min_interval:
            self.draw()
            return
        with self._lock:
            if self._timer is None:
                delay = self.min_interval - (now - self._last_draw)
                self._timer = threading.Timer(max(delay, 0.01), self._timer_draw)
                self._timer.daemon = True
                self._timer.start()

    def _timer_draw(self) -> None:
        with self._lock:
            self._timer = None
        self.draw()

    def draw(self) -> None:
        """Redraw now (called for you, at most every ``min_interval`` seconds)."""
        with self._lock:
            self._last_draw = time.monotonic()
            snapshot = {k: (list(xs), list(ys)) for k, (xs, ys) in self._series.items()}
        if self.mode == "widget" and self.widget is not None:
            self._draw_widget(snapshot)
        elif self.mode == "text":
            self._draw_text(snapshot)

    def _draw_widget(self, snapshot) -> None:
        fig = self.widget
        with self._lock:
            for key in snapshot:
                if key not in self._traces:
                    metric, gv = key
                    row = self.metrics.index(metric) + 1
                    name = f"{self.group} {gv}" if self.group and gv is not None else metric
                    fig.add_scatter(x=[], y=[], mode="lines", name=name, row=row, col=1,
                                    legendgroup=str(gv), showlegend=row == 1)
                    self._traces[key] = len(fig.data) - 1
            with fig.batch_update():
                for key, (xs, ys) in snapshot.items():
                    trace = fig.data[self._traces[key]]
                    trace.x, trace.y = xs, ys

    def _draw_text(self, snapshot, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_text < self.text_every:
            return
        self._last_text = now
        parts = []
        for (metric, gv), (xs, ys) in sorted(snapshot.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            if xs:
                who = f"{self.group}={gv} " if self.group and gv is not None else ""
                parts.append(f"{who}{metric}={ys[-1]:.4g}@{self.x} {xs[-1]}")
        if parts:
            print(f"[{self.title}] " + "  ".join(parts), flush=True)

    def close(self) -> None:
        """Detach, cancel pending redraws and draw the final state."""
        self.detach()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self.draw()
        if self.mode == "text":
            with self._lock:
                snapshot = {k: (list(xs), list(ys)) for k, (xs, ys) in self._series.items()}
            self._draw_text(snapshot, force=True)

    def _ipython_display_(self) -> None:
        if self.widget is not None:
            display(self.widget)
        else:
            print(f"LivePlot({self.title}): {len(self.events)} events")
