"""Views for the data notebook: length histogram, Zipf plot, cleaning funnel, duplicates, a playground.

Each plot function returns a plotly Figure (it renders in JupyterLab and in executed notebooks);
the playground is an ipywidgets box whose logic lives in :func:`try_text` so it works, and is
tested, without a browser.
"""

from __future__ import annotations

import html
from typing import Callable, Mapping, Sequence

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.data import clean as C
from labkit.data import shards as S

from .live_plot import LivePlot

PALETTE = ("#dbeafe", "#fde68a", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa")


def length_histogram(lengths: Sequence[int], title: str = "document length (characters)", bins: int = 40):
    """Histogram of document lengths on a log-spaced axis (lengths span several decades)."""
    x = np.asarray(lengths, dtype=float)
    x = x[x > 0]
    edges = np.logspace(np.log10(max(x.min(), 1)), np.log10(x.max() + 1), bins + 1) if x.size else np.array([1, 10])
    counts, edges = np.histogram(x, edges)
    fig = go.Figure(go.Bar(x=np.sqrt(edges[:-1] * edges[1:]), y=counts, width=np.diff(edges), marker_line_width=0))
    fig.update_xaxes(type="log", title="characters per document")
    fig.update_yaxes(title="documents")
    fig.update_layout(title=f"{title}: {x.size:,} docs, median {np.median(x) if x.size else 0:,.0f}",
                      height=320, margin=dict(l=50, r=20, t=50, b=40), bargap=0)
    return fig


def zipf_data(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank, frequency) of token ids, most frequent first, zero counts left out."""
    return S.rank_frequency(S.token_counts(ids, vocab_size))


def zipf_plot(ids: np.ndarray, vocab_size: int, tokenizer=None, label_top: int = 8):
    """Token frequency against rank on log-log axes, with the ideal Zipf line f(r) = f(1)/r."""
    counts = S.token_counts(ids, vocab_size)
    rank, freq = S.rank_frequency(counts)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rank, y=freq, mode="lines", name="tokens"))
    fig.add_trace(go.Scatter(x=rank, y=freq[0] / rank, mode="lines", name="Zipf 1/rank", line=dict(dash="dot")))
    if tokenizer is not None and label_top:
        top = np.argsort(counts)[::-1][:label_top]
        fig.add_trace(go.Scatter(x=np.arange(1, len(top) + 1), y=counts[top], mode="markers+text",
                                 text=[repr(tokenizer.decode([int(t)])) for t in top], textposition="middle right",
                                 name="top tokens"))
    fig.update_xaxes(type="log", title="rank")
    fig.update_yaxes(type="log", title="count")
    fig.update_layout(title=f"Zipf plot: {int(freq.sum()):,} tokens, {rank.size:,} distinct", height=360,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


def steps_funnel(report):
    """Documents and MB left after each cleaning step of a PreprocessReport."""
    names = [s.name for s in report.steps]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("documents out", "MB out"))
    fig.add_trace(go.Bar(x=names, y=[s.docs_out for s in report.steps], name="docs",
                         text=[f"-{s.removed}" if s.removed else "" for s in report.steps]), 1, 1)
    fig.add_trace(go.Bar(x=names, y=[s.bytes_out / 1e6 for s in report.steps], name="MB"), 1, 2)
    fig.update_layout(height=340, showlegend=False, margin=dict(l=40, r=20, t=50, b=80), title="cleaning steps")
    return fig


def duplicates_plot(report):
    """The duplicates found: how many per kind, and near-duplicate similarity."""
    kinds = ["exact_dedup", "near_dedup"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("duplicates removed", "near-duplicate similarity"))
    fig.add_trace(go.Bar(x=kinds, y=[sum(d["kind"] == k for d in report.duplicates) for k in kinds]), 1, 1)
    sims = [d["similarity"] for d in report.duplicates if d["kind"] == "near_dedup"]
    fig.add_trace(go.Histogram(x=sims, nbinsx=20), 1, 2)
    fig.update_layout(height=320, showlegend=False, margin=dict(l=40, r=20, t=50, b=40),
                      title=f"{len(report.duplicates)} duplicates of {report.steps[0].docs_out} documents")
    return fig


def duplicates_table(report, limit: int = 10) -> str:
    """The first duplicates as text lines: removed <- kept (similarity)."""
    rows = [f"{d['kind']:<12} {d['similarity']:.2f}  {_short(d['id'])}  duplicates  {_short(d['duplicate_of'])}"
            for d in report.duplicates[:limit]]
    return "\n".join(rows) or "no duplicates found"


def _short(path: str, keep: int = 2) -> str:
    return "/".join(str(path).split("/")[-keep:])


def try_text(text: str, normalisers: Sequence[str], tokenizer=None) -> dict:
    """Run chosen normalisers (names in ``labkit.data.clean.NORMALISERS``) and a tokenizer on ``text``."""
    out = C.apply_normalisers(text, normalisers)
    pieces = []
    if tokenizer is not None and out:
        pieces = [(i, tokenizer.decode([i])) for i in tokenizer.encode(out).ids]
    n_bytes = len(out.encode("utf-8"))
    return {"text": out, "pieces": pieces, "bytes": n_bytes, "tokens": len(pieces),
            "bytes_per_token": n_bytes / len(pieces) if pieces else float("nan")}


def pieces_html(pieces: Sequence[tuple[int, str]]) -> str:
    """Tokens as coloured chips (hover shows the id), whitespace made visible."""
    chips = []
    for k, (i, p) in enumerate(pieces):
        shown = html.escape(p).replace(" ", "␣").replace("\n", "↵<br>").replace("\t", "→")
        chips.append(f'<span title="id {i}" style="background:{PALETTE[k % len(PALETTE)]};'
                     f'font-family:monospace;padding:1px 2px;margin:1px;border-radius:3px">{shown}</span>')
    return "".join(chips)


def playground(tokenizers: Mapping[str, object], text: str = "ﬁnal  ＴＥＳＴ\r\nmail: a.b@example.org\x07  \n\n\n\nend"):
    """A widget to try normalisers and tokenizers on your own text (ipywidgets; never blocks)."""
    area = W.Textarea(value=text, layout=W.Layout(width="100%", height="90px"))
    boxes = {n: W.Checkbox(value=n != "scrub_pii", description=n, indent=False, layout=W.Layout(width="120px"))
             for n in C.NORMALISERS}
    choice = W.Dropdown(options=list(tokenizers), description="tokenizer")
    out = W.HTML()

    def render(*_):
        r = try_text(area.value, [n for n, b in boxes.items() if b.value], tokenizers[choice.value])
        out.value = (f"<pre style='white-space:pre-wrap'>{html.escape(repr(r['text']))}</pre>"
                     f"<div>{r['tokens']} tokens, {r['bytes']} bytes, {r['bytes_per_token']:.2f} bytes/token</div>"
                     + pieces_html(r["pieces"]))

    for w in [area, choice, *boxes.values()]:
        w.observe(render, names="value")
    render()
    return W.VBox([area, W.HBox(list(boxes.values()) + [choice]), out])


def compare_table(rows: Sequence[Mapping]) -> str:
    """compare_vocab_sizes rows as text."""
    lines = [f"{'vocab':>7} {'bytes/token':>12}"]
    lines += [f"{r['vocab_size']:>7} {r['bytes_per_token']:>12.2f}" for r in rows]
    return "\n".join(lines)


def live_rates(title: str = "preprocessing throughput") -> Callable:
    """A LivePlot for ``preprocess(..., on_event=...)``: docs/s and tokens/s per stage."""
    return LivePlot(metrics=("docs_per_s", "tokens_per_s"), x="seconds", group="stage", kinds=("data",), title=title)
