"""Pruning views: a sparsity slider with live perplexity and latency, a head-importance heatmap,
and curves of quality against sparsity.

The slider's logic lives in :meth:`SparsitySlider.update`, which works (and is tested) without a
browser; the ipywidgets box only calls it. Figures are plotly and render offline.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import ipywidgets as W
import plotly.graph_objects as go
import torch
from IPython.display import display
from torch import nn

from labkit.prune.evaluate import METHODS, measure_point


class SparsitySlider:
    """Move the slider: the model is pruned to that amount, perplexity and latency are measured.

    ``model`` is never changed; each position prunes a fresh copy. ``x`` is the token batch timed
    for latency (default: the first validation windows).
    """

    def __init__(self, model: nn.Module, val: torch.Tensor, method: str = "unstructured", x: torch.Tensor | None = None,
                 repeats: int = 3, max_amount: float = 0.9, step: float = 0.1) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r}: choose from {', '.join(METHODS)}")
        self.model, self.val, self.method, self.repeats = model, val, method, repeats
        self.x = x
        self.base_ppl: float | None = None      # the dense perplexity, measured by the first update
        self.history: list[dict] = []
        self.max_amount, self.step = max_amount, step
        self._box = None
        self._label = None

    def update(self, amount: float, method: str | None = None) -> dict:
        """Prune a copy to ``amount`` and measure it against the dense model; returns the row."""
        row = measure_point(self.model, method or self.method, amount, self.val, self.x, repeats=self.repeats,
                            dense_perplexity=self.base_ppl)
        self.base_ppl = row["perplexity_dense"]
        self.history.append(row)
        if self._label is not None:
            self._label.value = self.html(row)
        return row

    @staticmethod
    def text(row: dict) -> str:
        """One line for a terminal or a log."""
        return (f"{row['method']} {row['amount']:.0%} (weights removed {row['sparsity']:.0%}): perplexity "
                f"{row['perplexity']:.2f} (dense {row['perplexity_dense']:.2f}), latency {row['ms']:.2f} ms "
                f"(dense {row['ms_dense']:.2f} ms, {row['speedup']:.2f}x)")

    def html(self, row: dict) -> str:
        return f"<code>{html.escape(self.text(row))}</code>"

    def widget(self) -> Any:
        """The ipywidgets box (slider, method, result line)."""
        slider = W.FloatSlider(value=0.0, min=0.0, max=self.max_amount, step=self.step, description="amount",
                               continuous_update=False, readout_format=".0%")
        method = W.Dropdown(options=list(METHODS), value=self.method, description="method")
        self._label = W.HTML("move the slider")

        def changed(_):
            self.update(slider.value, method.value)

        slider.observe(changed, names="value")
        method.observe(changed, names="value")
        self._box = W.VBox([W.HBox([slider, method]), self._label])
        return self._box

    def _ipython_display_(self) -> None:
        display(self.widget())


def _matrix(scores: Sequence[torch.Tensor]) -> list[list[float | None]]:
    width = max(len(s) for s in scores)
    return [[float(v) for v in s] + [None] * (width - len(s)) for s in scores]


def head_heatmap(scores: Sequence[torch.Tensor], title: str = "head importance", pruned: Sequence[Sequence[int]] | None = None):
    """Layers x heads heatmap of importance (plotly); ``pruned`` heads are marked with a cross."""
    if not scores:
        raise ValueError("give one importance tensor per layer")
    z = _matrix(scores)
    fig = go.Figure(go.Heatmap(z=z, colorscale="Viridis", colorbar=dict(title="importance"),
                               hovertemplate="layer %{y}, head %{x}: %{z:.3g}<extra></extra>"))
    if pruned:
        xs = [h for layer in range(len(pruned)) for h in pruned[layer]]
        ys = [layer for layer in range(len(pruned)) for _ in pruned[layer]]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(symbol="x", size=12, color="red"),
                                 name="pruned", hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=120 + 40 * len(z),
                      margin=dict(l=50, r=20, t=50, b=40))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_xaxes(dtick=1)
    return fig


def heatmap_text(scores: Sequence[torch.Tensor]) -> str:
    """The same importances as a text table (terminal fallback)."""
    lines = ["layer | " + " ".join(f"h{j:<5}" for j in range(max(len(s) for s in scores)))]
    for i, s in enumerate(scores):
        lines.append(f"{i:>5} | " + " ".join(f"{float(v):<6.3g}" for v in s))
    return "\n".join(lines)


def curve_figure(rows: Sequence[Any], x: str = "sparsity", y: str = "perplexity", group: str | None = "method",
                 title: str | None = None):
    """Lines of ``y`` against ``x``, one per ``group`` value (one line when None); rows are dicts or
    objects with ``as_dict``."""
    data = [r.as_dict() if hasattr(r, "as_dict") else dict(r) for r in rows]
    fig = go.Figure()
    for g in dict.fromkeys(d.get(group) if group else y for d in data):
        pts = sorted((d[x], d[y]) for d in data if (d.get(group) if group else y) == g)
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=str(g)))
    fig.update_layout(title=title or f"{y} vs {x}", xaxis_title=x, yaxis_title=y, height=340,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig
