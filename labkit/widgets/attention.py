"""Attention views in plotly, offline: heatmaps, a layer x head grid, a token-to-token line view,
the cost curves, and an explorer widget (your sentence, layer/head sliders, scale, causal toggle).

Nothing here loads from a CDN: figures are plain ``go.Figure`` (JupyterLab renders them with its
bundled plotly), :func:`to_html` inlines plotly.js, and the explorer uses ``go.FigureWidget``,
whose JavaScript ships inside the plotly package. Without ipywidgets the explorer falls back to text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import ipywidgets as W
import plotly.graph_objects as go
import plotly.io as pio
import torch
from IPython.display import display
from plotly.subplots import make_subplots

from labkit.attention import attention_stats, softmax_at_scales
from labkit.pretrained import attention_probs

COLORSCALE = "Blues"


def _matrix(probs: torch.Tensor, layer: int | None = None, head: int | None = None) -> torch.Tensor:
    """Pick one (T, T) matrix from (T, T), (H, T, T), (L, H, T, T) or a batch of 1 in front."""
    p = probs.detach().float().cpu()
    if p.dim() == 5:
        p = p[:, 0]
    if p.dim() == 4:
        p = p[layer or 0]
    if p.dim() == 3:
        p = p[head or 0]
    if p.dim() != 2:
        raise ValueError(f"expected (T, T), (H, T, T) or (L, H, T, T) attention, got shape {tuple(probs.shape)}")
    return p


def _labels(tokens: Sequence[str]) -> list[str]:
    """Unique axis labels (plotly merges repeated category names): '#i token'."""
    return [f"{i}:{t}" for i, t in enumerate(tokens)]


def heatmap(probs: torch.Tensor, tokens: Sequence[str], layer: int | None = None, head: int | None = None,
            title: str | None = None) -> go.Figure:
    """One head's attention as a heatmap: rows are queries (who looks), columns keys (looked at)."""
    p = _matrix(probs, layer, head)
    labels = _labels(tokens)
    fig = go.Figure(go.Heatmap(z=p.numpy(), x=labels, y=labels, colorscale=COLORSCALE, zmin=0, zmax=1,
                               hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"))
    name = title or f"layer {layer or 0}, head {head or 0}"
    fig.update_layout(title=name, xaxis_title="key", yaxis_title="query", yaxis_autorange="reversed",
                      width=520, height=480, margin=dict(l=90, r=20, t=50, b=90))
    return fig


def grid(probs: torch.Tensor | Sequence[torch.Tensor], tokens: Sequence[str] | None = None,
         title: str = "attention: layers x heads") -> go.Figure:
    """Overview of every layer (rows) and head (columns) as small heatmaps.

    ``probs``: (L, H, T, T), or the list transformers returns as ``outputs.attentions``."""
    if not isinstance(probs, torch.Tensor):
        probs = torch.stack([p[0] if p.dim() == 4 else p for p in probs])
    p = probs.detach().float().cpu()
    n_layer, n_head = p.shape[:2]
    fig = make_subplots(rows=n_layer, cols=n_head, horizontal_spacing=0.005, vertical_spacing=0.01,
                        row_titles=[f"L{i}" for i in range(n_layer)], column_titles=[f"H{j}" for j in range(n_head)])
    text = _labels(tokens) if tokens is not None else None
    for i in range(n_layer):
        for j in range(n_head):
            fig.add_trace(go.Heatmap(z=p[i, j].numpy(), x=text, y=text, coloraxis="coloraxis",
                                     hovertemplate=f"L{i} H{j}<br>q %{{y}}<br>k %{{x}}<br>%{{z:.3f}}<extra></extra>"),
                          row=i + 1, col=j + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(title=title, coloraxis=dict(colorscale=COLORSCALE, cmin=0, cmax=1),
                      width=max(500, 70 * n_head), height=max(400, 70 * n_layer), margin=dict(t=70, l=40, r=40, b=20))
    return fig


def lines(probs: torch.Tensor, tokens: Sequence[str], layer: int | None = None, head: int | None = None,
          threshold: float = 0.02, bins: int = 8) -> go.Figure:
    """Token-to-token view: queries on the left, keys on the right, a line per pair, darker = more weight."""
    p = _matrix(probs, layer, head)
    t = p.shape[0]
    fig = go.Figure()
    edges = torch.linspace(threshold, 1.0, bins + 1)
    for b in range(bins):  # one trace per weight bin keeps the figure light (not one trace per line)
        xs, ys = [], []
        lo, hi = edges[b], edges[b + 1] if b < bins - 1 else 1.01
        for i, j in ((p >= lo) & (p < hi)).nonzero().tolist():
            xs += [0, 1, None]
            ys += [-i, -j, None]
        if xs:
            opacity = float(0.15 + 0.85 * (b + 1) / bins)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                     line=dict(color=f"rgba(31,119,180,{opacity:.2f})", width=1 + 4 * (b + 1) / bins)))
    for x, anchor in ((0, "right"), (1, "left")):
        fig.add_trace(go.Scatter(x=[x] * t, y=[-i for i in range(t)], mode="text", text=list(tokens),
                                 textposition=f"middle {anchor}", showlegend=False, hoverinfo="skip"))
    fig.update_xaxes(visible=False, range=[-0.6, 1.6])
    fig.update_yaxes(visible=False)
    fig.update_layout(title=f"layer {layer or 0}, head {head or 0}: query (left) -> key (right)",
                      width=460, height=max(300, 26 * t), margin=dict(l=10, r=10, t=50, b=10),
                      plot_bgcolor="white")
    return fig


def saturation(scores: torch.Tensor, d_k: int, factors: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)) -> go.Figure:
    """Softmax of one row of raw scores q.k at different scales: 1 = the model's 1/sqrt(d_k);
    sqrt(d_k) = no scaling at all, where softmax saturates towards one-hot."""
    fig = go.Figure()
    for f, p in softmax_at_scales(scores, d_k, factors):
        fig.add_trace(go.Bar(y=p.numpy(), name=f"{f:g}/sqrt(d_k)  (max {p.max():.2f})"))
    fig.update_layout(barmode="group", title="softmax saturates as the scale grows", xaxis_title="key",
                      yaxis_title="weight", width=700, height=360)
    return fig


def cost_figure(points) -> go.Figure:
    """Time and peak memory against sequence length, one line per implementation (log-log)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time", "peak memory"))
    colors = {"naive": "#d62728", "online": "#1f77b4", "sdpa": "#2ca02c"}
    for impl in dict.fromkeys(p.impl for p in points):
        pts = sorted((p for p in points if p.impl == impl), key=lambda p: p.seq_len)
        x = [p.seq_len for p in pts]
        style = dict(color=colors.get(impl))
        fig.add_trace(go.Scatter(x=x, y=[p.seconds * 1e3 for p in pts], name=impl, line=style,
                                 legendgroup=impl), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[p.peak_mib for p in pts], name=impl, line=style,
                                 legendgroup=impl, showlegend=False), row=1, col=2)
    fig.update_xaxes(type="log", title="sequence length T")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title="ms", row=1, col=1)
    fig.update_yaxes(title="MiB", row=1, col=2)
    fig.update_layout(width=900, height=380)
    return fig


def to_html(fig: go.Figure, path: str | Path | None = None) -> str:
    """Self-contained HTML with plotly.js inlined (works with no network); written to ``path`` if given."""
    html = pio.to_html(fig, include_plotlyjs=True, full_html=True)
    if path is not None:
        Path(path).write_text(html, encoding="utf-8")
    return html


class AttentionExplorer:
    """Type a sentence, pick layer and head, change the scale, toggle a causal mask: the heatmap and
    line view follow. Recomputes the attention with labkit.attention from the model's own weights."""

    def __init__(self, model, tokenizer, sentence: str = "The cat sat on the mat because it was tired."):
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.n_layer, self.n_head = cfg.num_hidden_layers, cfg.num_attention_heads
        self.d_k = cfg.hidden_size // cfg.num_attention_heads
        self.sentence = sentence
        self._ui = None

    def compute(self, sentence: str | None = None, factor: float = 1.0, causal: bool = False):
        """(tokens, probs (L, H, T, T)) with scale = factor / sqrt(d_k)."""
        return attention_probs(self.model, self.tokenizer, sentence or self.sentence,
                               scale=factor / math.sqrt(self.d_k), causal=causal)

    def text(self, layer: int = 0, head: int = 0, factor: float = 1.0, causal: bool = False) -> str:
        """The console fallback: for each query, the key it attends to most."""
        tokens, probs = self.compute(factor=factor, causal=causal)
        p = probs[layer, head]
        rows = [f"{tokens[i]:>12} -> {tokens[int(p[i].argmax())]:<12} {float(p[i].max()):.2f}" for i in range(len(tokens))]
        return f"layer {layer}, head {head}, scale {factor:g}/sqrt(d_k), causal={causal}\n" + "\n".join(rows)

    def widget(self):
        """The ipywidgets UI (text box, sliders, toggle, two live figures)."""
        text = W.Text(value=self.sentence, description="sentence", layout=W.Layout(width="95%"),
                      continuous_update=False)
        layer = W.IntSlider(0, 0, self.n_layer - 1, description="layer")
        head = W.IntSlider(0, 0, self.n_head - 1, description="head")
        factor = W.FloatLogSlider(value=1.0, base=2, min=-3, max=math.log2(math.sqrt(self.d_k)) + 1, step=0.5,
                                  description="scale x", readout_format=".3g")
        causal = W.Checkbox(False, description="causal mask")
        note = W.HTML()
        heat, line = go.FigureWidget(), go.FigureWidget()
        state = {}

        def redraw(*_):
            if "probs" not in state or state.get("key") != (text.value, factor.value, causal.value):
                state["tokens"], state["probs"] = self.compute(text.value, factor.value, causal.value)
                state["key"] = (text.value, factor.value, causal.value)
            tok, pr = state["tokens"], state["probs"]
            for target, fig in ((heat, heatmap(pr, tok, layer.value, head.value)),
                                (line, lines(pr, tok, layer.value, head.value))):
                with target.batch_update():
                    target.data = []
                    target.add_traces(list(fig.data))
                    target.layout = fig.layout
            stats = attention_stats(pr[layer.value, head.value])
            note.value = (f"scale = {factor.value:.3g} / sqrt({self.d_k}); mean max weight "
                          f"{stats['mean_max_weight']:.2f}, mean entropy {stats['entropy']:.2f} nats "
                          f"(at scale x {math.sqrt(self.d_k):g} = no 1/sqrt(d_k): near one-hot)")

        for w in (text, layer, head, factor, causal):
            w.observe(redraw, names="value")
        redraw()
        self._ui = W.VBox([text, W.HBox([layer, head]), W.HBox([factor, causal]), note, W.HBox([heat, line])])
        return self._ui

    def _ipython_display_(self):
        try:
            display(self.widget())
        except ImportError:  # no ipywidgets: text
            print(self.text())
