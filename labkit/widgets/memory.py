"""Views of labkit.train_memory: memory per rank measured under DDP and FSDP beside the ZeRO estimate,
as a table (text or HTML) and a grouped bar chart."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import plotly.graph_objects as go

from .hardware import Chart, Table

MiB = 2**20


def _mib(v: float) -> str:
    return f"{v / MiB:.1f}"


def memory_table_view(rows: Sequence[Mapping[str, Any]]) -> Table:
    """One line per (ranks, strategy): model states, activations and step peak in MiB, measured /
    predicted (ratio), and FSDP's figures as a fraction of DDP's."""
    out = []
    for r in rows:
        cells = [str(r["ranks"]), f"{r['strategy']} (ZeRO-{r['zero_stage']})"]
        for k in ("states", "activations", "peak"):
            cells.append(f"{_mib(r[k + '_measured'])} / {_mib(r[k + '_predicted'])} ({r[k + '_ratio']:.2f})")
        cells.append(f"{r['states_vs_ddp']:.2f} / {r['peak_vs_ddp']:.2f}" if "states_vs_ddp" in r else "")
        out.append(cells)
    n = rows[0]["n_params"] if rows else 0
    return Table(["ranks", "strategy", "model states MiB", "activations MiB", "step peak MiB", "FSDP/DDP states / peak"],
                 out, title=f"memory per rank, measured / predicted (ratio); GPT of {n:,} parameters")


def memory_figure(rows: Sequence[Mapping[str, Any]]) -> Chart:
    """Measured (solid) and predicted (hatched) model states and step peak per rank, for each strategy
    and rank count: predicted in 02 with training_memory, measured here."""
    labels = [f"{r['strategy']} x{r['ranks']}" for r in rows]
    fig = go.Figure()
    for key, name in (("states", "model states"), ("peak", "step peak")):
        fig.add_trace(go.Bar(x=labels, y=[r[key + "_measured"] / MiB for r in rows], name=f"{name}, measured"))
        fig.add_trace(go.Bar(x=labels, y=[r[key + "_predicted"] / MiB for r in rows], name=f"{name}, predicted",
                             marker_pattern_shape="/"))
    fig.update_layout(barmode="group", height=380, yaxis_title="MiB per rank",
                      title="Memory per rank: predicted (training_memory, ZeRO-0 / ZeRO-3) vs measured")
    return Chart(fig)
