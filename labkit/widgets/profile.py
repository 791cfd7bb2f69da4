"""Views of labkit.profiling: where each profiled step's time went, as a stacked bar per (rank, step)
and a table; ``ProfileView`` draws ``profile`` events as they arrive (a sink, or ``attach(client)``).

Data, forward, backward and optimizer are stacked (they follow one another on the rank's thread);
communication is drawn beside them, not on top: under DDP the all-reduce runs during backward."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Mapping, Sequence

import plotly.graph_objects as go
from IPython.display import display

from ..core.events import Event, Subscription, subscribe
from ..profiling import PHASES
from .hardware import Chart, Table
from .live_plot import in_jupyter_kernel

COLUMNS = (*PHASES, "other")


def _rows(profiles: Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, float]]]:
    """(label, breakdown row) for every profiled step of every profile (a ``profile`` event or a
    ``TrainResult.profiles`` entry), by rank then step."""
    out = [(f"rank {p['rank']} step {r['step']}", r, p["rank"]) for p in profiles for r in p["breakdown"]]
    return [(label, row) for label, row, _ in sorted(out, key=lambda t: (t[2], t[1]["step"]))]


def _fill(fig: go.Figure, profiles: Iterable[Mapping[str, Any]]) -> None:
    """Put the bars of ``profiles`` into ``fig`` (one trace per phase, then communication)."""
    rows = _rows(profiles)
    labels = [label for label, _ in rows]
    traces = [go.Bar(x=labels, y=[r[f"{c}_ms"] for _, r in rows], name=c, offsetgroup="step") for c in COLUMNS]
    traces.append(go.Bar(x=labels, y=[r["communication_ms"] for _, r in rows], name="communication (overlaps)",
                         offsetgroup="comm", marker_pattern_shape="/"))
    with fig.batch_update() if isinstance(fig, go.FigureWidget) else contextlib.nullcontext():
        fig.data = []
        fig.add_traces(traces)


def _layout(fig: go.Figure) -> go.Figure:
    fig.update_layout(barmode="stack", height=380, yaxis_title="ms", bargap=0.3,
                      title="Where a step's time goes (torch.profiler); communication beside, as it "
                            "overlaps backward under DDP")
    return fig


def profile_figure(profiles: Sequence[Mapping[str, Any]]) -> Chart:
    """Stacked ms of data / forward / backward / optimizer / other per profiled (rank, step), and the
    step's communication as a bar beside."""
    fig = _layout(go.Figure())
    _fill(fig, profiles)
    return Chart(fig)


def profile_table(profiles: Sequence[Mapping[str, Any]]) -> Table:
    """One line per profiled (rank, step): ms of each phase, the step, and its communication."""
    rows = [[label, *(f"{r[f'{c}_ms']:.2f}" for c in COLUMNS), f"{r['step_ms']:.2f}",
             f"{r['communication_ms']:.2f} ({r['communication_in_backward_ms']:.2f} in backward)"]
            for label, r in _rows(profiles)]
    traces = ", ".join(p["trace"] for p in profiles)
    return Table(["step", *COLUMNS, "step total", "communication"], rows,
                 title=f"ms per step (torch.profiler); traces for https://ui.perfetto.dev: {traces}")


class ProfileView:
    """Draws ``profile`` events (``labkit.profiling``) as they arrive: a plotly ``FigureWidget`` in
    JupyterLab, a text table elsewhere. Feed it as a sink or follow a cluster with ``attach(client)``."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "widget", "text", "silent"):
            raise ValueError(f"ProfileView(mode={mode!r}): use 'auto' (a widget in Jupyter, text elsewhere), "
                             "'widget', 'text' or 'silent'")
        self.mode = ("widget" if in_jupyter_kernel() else "text") if mode == "auto" else mode
        self.profiles: list[Event] = []
        self._lock = threading.Lock()
        self._subscription: Subscription | None = None
        self.widget = _layout(go.FigureWidget()) if self.mode == "widget" else None

    def __call__(self, event: Event) -> None:
        """Take one event (the sink interface); other kinds are ignored."""
        if event.get("kind") != "profile":
            return
        with self._lock:
            self.profiles.append(event)
            profiles = list(self.profiles)
        if self.widget is not None:
            _fill(self.widget, profiles)
        elif self.mode == "text":
            print(profile_table([event]), flush=True)

    def attach(self, client: Any) -> "ProfileView":
        """Follow the ``profile`` events the client's Dask workers emit."""
        self.detach()
        self._subscription = subscribe(client, self, kinds=["profile"])
        return self

    def detach(self) -> None:
        """Stop following the cluster (what was drawn stays)."""
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def figure(self) -> Chart:
        """The profiles so far as a static figure."""
        with self._lock:
            return profile_figure(list(self.profiles))

    def _ipython_display_(self) -> None:
        if self.widget is not None:
            display(self.widget)
        else:
            print(profile_table(self.profiles) if self.profiles else "ProfileView: no profile events yet")
