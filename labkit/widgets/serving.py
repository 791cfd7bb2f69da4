"""Views for the serving notebook: time to first token and inter-token latency under load."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLORS = ("#2563eb", "#f59e0b", "#16a34a", "#db2777", "#7c3aed")


def stream_latency_figure(results: Sequence) -> go.Figure:
    """Box plots of time to first token and of inter-token latency (ms), one box per number of
    concurrent clients (``StreamLoadResult`` objects of ``labkit.serve.stream_load``)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time to first token (ms)", "inter-token latency (ms)"))
    for i, r in enumerate(results):
        name, color = f"{r.concurrency} clients", COLORS[i % len(COLORS)]
        fig.add_trace(go.Box(y=[1000 * t for t in r.ttfts], name=name, boxpoints="all", jitter=0.4,
                             marker=dict(size=4, color=color)), row=1, col=1)
        fig.add_trace(go.Box(y=[1000 * g for g in r.gaps], name=name, boxpoints=False, marker_color=color),
                      row=1, col=2)
    fig.update_yaxes(title="ms", rangemode="tozero")
    fig.update_layout(title="streamed completions under concurrent load", height=360, showlegend=False,
                      margin=dict(l=50, r=20, t=70, b=40))
    return fig
