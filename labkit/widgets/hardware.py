"""Views of labkit.hardware: tables of the cluster's hardware, roofline and bus-bandwidth charts
against the catalog peaks, and a live estimator panel for sizing a training run.

Everything renders as a widget in Jupyter and as plain text elsewhere (terminal, tests, CI).
"""

from __future__ import annotations

import contextlib
import html
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import ipywidgets as w
import plotly.graph_objects as go
from IPython.display import display
from plotly.subplots import make_subplots

from labkit.hardware.catalog import catalog, gpu as find_gpu, network as find_network, networks
from labkit.hardware.estimate import GPT_PRESETS, GPTConfig, RunPlan, plan_run
from labkit.hardware.inspect import WorkerHardware, inspect_cluster
from labkit.hardware.measure import (AllReducePoint, ClusterMeasurement, DeviceBench, compare_with_catalog, fit_allreduce,
                                     ratios)

from .live_plot import in_jupyter_kernel


# ---------------------------------------------------------------------------------------------- tables

@dataclass
class Table:
    """Rows of strings under named columns; text with ``str()``, HTML in Jupyter, ``.widget()`` for ipywidgets."""

    columns: list[str]
    rows: list[list[str]]
    title: str = ""

    def __str__(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = ([self.title] if self.title else []) + [line(self.columns), line("-" * w for w in widths)]
        return "\n".join(out + [line(r) for r in self.rows])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in self.rows)
        cap = f"<caption style='text-align:left'><b>{html.escape(self.title)}</b></caption>" if self.title else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def widget(self) -> Any:
        return w.HTML(self._repr_html_())


def hardware_table(rows: Sequence[WorkerHardware]) -> Table:
    """One line per worker: host, CPU, cores, RAM, GPUs, Slurm job and partition."""
    out = []
    for r in rows:
        gpus = "; ".join(f"{g.name} ({g.memory_bytes / 2**30:.0f} GiB, sm {g.capability})" for g in r.gpus)
        if not gpus:
            gpus = f"none usable (CUDA_VISIBLE_DEVICES={r.cuda_visible_devices})" if r.cuda_visible_devices else "none"
        out.append([r.worker or "(this process)", r.host, r.cpu_model, f"{r.cores}/{r.host_cpus}",
                    f"{r.ram_bytes / 2**30:.1f} GiB", gpus, r.slurm_job_id or "-", r.slurm_partition or "-"])
    return Table(["worker", "host", "CPU", "cores (usable/host)", "RAM", "GPUs", "Slurm job", "partition"], out,
                 title="Workers and their hardware")


def measurement_table(m: ClusterMeasurement, peaks: dict[str, float] | None = None) -> Table:
    """Measured matmul GFLOP/s per dtype and copy GB/s per worker, with the fraction of ``peaks`` when given."""
    dtypes = sorted({x.dtype for d in m.devices for x in d.matmul}, key=["fp64", "fp32", "tf32", "fp16", "bf16"].index)
    rows = []
    for d in m.devices:
        cells = [d.worker or d.host, d.device_name, str(d.threads)]
        fractions = ratios(d, peaks) if peaks else {}
        for dt in dtypes:
            f = d.flops(dt)
            frac = f" ({fractions[dt]:.0%})" if f and dt in fractions else ""
            cells.append(f"{f / 1e9:.1f}{frac}" if f else "-")
        cells.append(f"{d.copy.bytes_per_s / 1e9:.1f}")
        h2d = f"{d.host_to_device.bytes_per_s / 1e9:.1f}" if d.host_to_device else "-"
        cells.append(h2d)
        rows.append(cells)
    cols = ["worker", "device", "threads"] + [f"{dt} GFLOP/s" for dt in dtypes] + ["copy GB/s", "H2D GB/s"]
    return Table(cols, rows, title="Measured (fraction of peak in brackets)" if peaks else "Measured")


def comparison_table(m: ClusterMeasurement) -> Table:
    """Each worker's matmul and copy bandwidth as a fraction of its catalog entry: a GPU's datasheet, or for
    a CPU the catalog's generic ``CPU-node`` (a reference node, not this machine's datasheet)."""
    pct = lambda x: f"{100 * x:.3g}%"
    rows, generic = [], False
    for d in m.devices:
        ref = compare_with_catalog(d)
        who = d.worker or d.host
        if ref is None:
            rows.append([who, f"{d.device_name}: not in the catalog", "-", "-", "-", "-"])
            continue
        generic |= ref.generic
        name = f"{ref.reference} (generic)" if ref.generic else ref.reference
        for dt, frac in ref.flops.items():
            rows.append([who, name, f"{dt} matmul", f"{d.flops(dt) / 1e9:.1f} GFLOP/s",
                         f"{ref.peak_flops[dt] / 1e9:.0f} GFLOP/s", pct(frac)])
        rows.append([who, name, "memory copy", f"{d.copy.bytes_per_s / 1e9:.1f} GB/s",
                     f"{ref.memory_bw / 1e9:.0f} GB/s", pct(ref.memory)])
    title = "Measured vs the catalog"
    if generic:
        title += (" (CPU workers: against the catalog's CPU-node, a generic dual-socket reference node, "
                  "not this machine's datasheet)")
    return Table(["worker", "catalog entry", "what", "measured", "catalog peak", "fraction"], rows, title=title)


def catalog_table(names: Sequence[str] | None = None) -> Table:
    """The catalog's accelerators: dense peaks, memory, bandwidth, links, TDP."""
    accs = [find_gpu(n) for n in names] if names else catalog()
    rows = []
    for a in accs:
        peaks = lambda dt: f"{a.peak_tflops[dt]:g}" if dt in a.peak_tflops else "-"
        rows.append([a.name, peaks("fp32"), peaks("tf32"), peaks("bf16"), peaks("fp16"), peaks("fp8"),
                     f"{a.memory_GB:g}", f"{a.memory_bw_GBs:g}", f"Gen{a.pcie_gen}",
                     f"{a.link_bw_GBs:g}" if a.link_bw_GBs else "-", f"{a.tdp_W:g}"])
    return Table(["accelerator", "fp32", "tf32", "bf16", "fp16", "fp8", "GB", "GB/s", "PCIe", "link GB/s", "TDP W"],
                 rows, title="Catalog: dense peak TFLOP/s, memory, links (sources in labkit/hardware/catalog.yaml)")


class HardwarePanel:
    """The workers' hardware table with an "Inspect again" button that re-runs ``inspect(client)``
    (``labkit.hardware.inspect_cluster``), e.g. after the cluster scaled; plain text outside Jupyter."""

    def __init__(self, client: Any, rows: Sequence[WorkerHardware] | None = None, mode: str = "auto",
                 inspect: Any = inspect_cluster) -> None:
        self.client = client
        self._inspect = inspect
        self.mode = ("widget" if in_jupyter_kernel() else "text") if mode == "auto" else mode
        self.rows: list[WorkerHardware] = []
        self.status = ""
        self.widget = self._build() if self.mode == "widget" else None
        if rows is None:
            self.refresh()
        else:
            self.rows = list(rows)
            self.status = f"{len(self.rows)} worker(s)"
            self._render()

    @property
    def table(self) -> Table:
        return hardware_table(self.rows)

    def refresh(self) -> list[WorkerHardware]:
        """Inspect every worker again and redraw; errors propagate (the button shows them instead)."""
        start = time.perf_counter()
        self.rows = list(self._inspect(self.client))
        self.status = (f"{len(self.rows)} worker(s), inspected at {time.strftime('%H:%M:%S')} "
                       f"in {time.perf_counter() - start:.1f} s")
        self._render()
        return self.rows

    def _clicked(self, _button: Any = None) -> None:
        self._button.disabled = True
        try:
            self.refresh()
        except Exception as exc:     # shown in the panel: a callback's exception would vanish into the log
            self.status = (f"inspection failed: {exc!r}; the table shows the previous one. Check the cluster "
                           "(client.nthreads() lists its workers) and press again")
            self._render()
        finally:
            self._button.disabled = False

    def _render(self) -> None:
        if self.widget is not None:
            self._table.value = self.table._repr_html_()
            self._status.value = html.escape(self.status)

    def _build(self) -> Any:
        self._button = w.Button(description="Inspect again", icon="refresh",
                                tooltip="re-run labkit.hardware.inspect_cluster(client)")
        self._button.on_click(self._clicked)
        self._status = w.HTML()
        self._table = w.HTML()
        return w.VBox([w.HBox([self._button, self._status]), self._table])

    def __str__(self) -> str:
        return f"{self.table}\n({self.status}; call .refresh() to inspect again)"

    __repr__ = __str__

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """The live widget in Jupyter; the table as HTML and text for viewers without widgets."""
        bundle = {"text/plain": str(self), "text/html": self.table._repr_html_()}
        if self.widget is not None:
            bundle["application/vnd.jupyter.widget-view+json"] = \
                self.widget._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
        return bundle


# ---------------------------------------------------------------------------------------------- charts

def plotly_bundle(fig: Any) -> dict[str, Any]:
    """The mimebundle JupyterLab's plotly renderer draws, built without plotly.io's renderer machinery
    (which imports nbformat and jsonschema: seconds per kernel)."""
    title = fig.layout.title.text or "plotly figure"
    return {"application/vnd.plotly.v1+json": {**json.loads(fig.to_json()), "config": {"responsive": True}},
            "text/plain": f"<{title}: {len(fig.data)} traces>"}


class Chart:
    """A plotly figure that displays quickly in Jupyter (``plotly_bundle``); every other attribute is the
    figure's (``chart.data``, ``chart.update_layout(...)``, ``chart.figure.show()``)."""

    def __init__(self, figure: Any) -> None:
        self.figure = figure

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):      # never the figure's _ipython_display_ / _repr_*_: they load plotly.io
            raise AttributeError(name)
        return getattr(self.figure, name)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return plotly_bundle(self.figure)


def roofline_figure(devices: Sequence[DeviceBench] = (), gpus: Sequence[str] = ("A100-80GB", "H100-SXM", "MI300X"),
                    local_peaks: dict[str, float] | None = None, dtype: str = "auto") -> Any:
    """Roofline: attainable FLOP/s = min(peak, intensity x bandwidth) for catalog GPUs (solid), each
    measured worker (dashed: best matmul and copy bandwidth) and its matmul points; optional local CPU peak."""
    xs = [10 ** (k / 10) for k in range(-20, 41)]          # 0.01 .. 10^4 FLOP/byte
    fig = go.Figure()
    for name in gpus:
        a = find_gpu(name)
        peak = a.peak_flops(dtype)
        fig.add_trace(go.Scatter(x=xs, y=[min(peak, x * a.memory_bw) for x in xs], mode="lines",
                                 name=f"{a.name} ({a.training_dtype if dtype == 'auto' else dtype} peak)"))
    for d in devices:
        label = d.worker or d.host
        best, bw = d.best_flops(), d.copy.bytes_per_s
        fig.add_trace(go.Scatter(x=xs, y=[min(best, x * bw) for x in xs], mode="lines", line={"dash": "dash"},
                                 name=f"measured {label}"))
        fig.add_trace(go.Scatter(x=[m.intensity for m in d.matmul], y=[m.flops_per_s for m in d.matmul],
                                 mode="markers+text", text=[m.dtype for m in d.matmul], textposition="top center",
                                 name=f"matmul {label}"))
    if local_peaks:
        fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[local_peaks["fp32"]] * 2, mode="lines",
                                 line={"dash": "dot"}, name="this CPU, fp32 peak (estimated)"))
    fig.update_layout(title="Roofline: catalog peaks vs measured", xaxis_type="log", yaxis_type="log",
                      xaxis_title="arithmetic intensity (FLOP/byte)", yaxis_title="FLOP/s", height=450)
    return Chart(fig)


def busbw_figure(points: Sequence[AllReducePoint], nets: Sequence[str] = ("IB-HDR-200", "IB-NDR-400", "RoCE-100GbE"),
                 nvlink_of: str | None = "H100-SXM") -> Any:
    """Bus bandwidth vs message size: measured all-reduce, the alpha-beta model ``fit_allreduce`` fits to
    it, and the catalog's links as horizontal lines."""
    fig = go.Figure()
    if points:
        sizes = [p.n_bytes for p in points]
        fig.add_trace(go.Scatter(x=sizes, y=[p.bus_bandwidth for p in points], mode="lines+markers",
                                 name=f"measured ({points[0].backend}, {points[0].world_size} ranks)"))
        if points[0].world_size > 1:
            fit = fit_allreduce(points)
            fig.add_trace(go.Scatter(x=sizes, y=[fit.bus_bandwidth_at(s) for s in sizes], mode="lines",
                                     line={"dash": "dot"}, name=f"model: latency {fit.latency_s * 1e6:.0f} µs/step, "
                                                               f"{fit.bus_bandwidth / 1e9:.2f} GB/s"))
    lines = [(find_network(n).name, find_network(n).bandwidth) for n in nets]
    if nvlink_of:
        a = find_gpu(nvlink_of)
        lines.append((f"{a.name} {a.link} (per direction)", a.link_bw))
    for name, bw in lines:
        fig.add_hline(y=bw, line_dash="dash", annotation_text=name, annotation_position="top left")
    fig.update_layout(title="All-reduce bus bandwidth vs message size", xaxis_type="log", yaxis_type="log",
                      xaxis_title="message size (bytes)", yaxis_title="bus bandwidth (bytes/s)", height=420)
    return Chart(fig)


def plan_figure(plan: RunPlan) -> Any:
    """Two stacked bars: training memory per GPU by part against the GPU's memory (does it fit?), and one
    step's time: compute vs the gradient all-reduce, hidden behind backward or exposed (what dominates?)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("memory per GPU (GB)", "one step (ms)"))
    for part, b in plan.memory.parts().items():
        fig.add_trace(go.Bar(x=["memory"], y=[b / 1e9], name=part, legendgroup="memory"), row=1, col=1)
    if plan.memory.gpu_memory_bytes:
        fig.add_hline(y=plan.memory.gpu_memory_bytes / 1e9, line_dash="dash", row=1, col=1,
                      annotation_text=f"{plan.time.gpu} memory")
    sync = plan.sync
    step = {"compute (fwd+bwd)": plan.step_compute_s, "all-reduce, hidden": sync.seconds - sync.exposed_s,
            "all-reduce, exposed": sync.exposed_s}
    for part, sec in step.items():
        fig.add_trace(go.Bar(x=["step"], y=[sec * 1e3], name=part, legendgroup="time"), row=1, col=2)
    fig.update_layout(barmode="stack", height=380, title="Does it fit? What dominates a step?")
    return fig


# ---------------------------------------------------------------------------------------------- estimator panel

def plan_summary(plan: RunPlan) -> Table:
    """The figures of a plan that answer: does it fit, how long, what does it cost, what dominates."""
    return Table(["", "estimate"], [list(r) for r in plan.summary_rows()],
                 title=f"{plan.cfg.n_layer} layers x {plan.cfg.n_embd}, {plan.n_tokens:.3g} tokens")


class EstimatorPanel:
    """Controls for model, tokens, GPU type and count, network, ZeRO stage and MFU; the estimates and the
    memory chart update on every change. ``set(...)`` changes values from code; ``plan`` is the latest."""

    DEFAULTS = dict(model="gpt2-xl", tokens=30e9, gpu="A100-SXM4-80GB", n_gpus=8, network="IB-HDR-200",
                    zero_stage=1, mfu=0.4, micro_batch=4, checkpointing=False)

    def __init__(self, mode: str = "auto", figure_widget: bool = False, **values: Any) -> None:
        unknown = set(values) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; valid: {', '.join(self.DEFAULTS)}")
        self.values = self._canonical({**self.DEFAULTS, **values})
        self.mode = ("widget" if in_jupyter_kernel() else "text") if mode == "auto" else mode
        self.plan: RunPlan | None = None
        self._figure_widget = figure_widget
        self._controls: dict[str, Any] = {}
        self.widget = self._build() if self.mode == "widget" else None
        self.update()

    def set(self, **values: Any) -> RunPlan:
        """Change settings and recompute (the widgets follow)."""
        unknown = set(values) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; valid: {', '.join(self.DEFAULTS)}")
        values = self._canonical(values)
        self.values.update(values)
        for k, v in values.items():
            if k in self._controls:
                self._controls[k].value = v      # triggers update through observe
        return self.update()

    @staticmethod
    def _canonical(values: dict[str, Any]) -> dict[str, Any]:
        """Catalog names as the dropdowns list them ("H100-SXM" -> "H100-SXM5-80GB"); bad names raise here."""
        out = dict(values)
        if "gpu" in out:
            out["gpu"] = find_gpu(out["gpu"]).name
        if "network" in out:
            out["network"] = find_network(out["network"]).name
        if "model" in out:
            GPTConfig.preset(out["model"])
        return out

    def update(self, *_: Any) -> RunPlan:
        v = self.values
        cfg = GPTConfig.preset(v["model"])
        self.plan = plan_run(cfg, float(v["tokens"]), v["gpu"], int(v["n_gpus"]), mfu=float(v["mfu"]),
                             zero_stage=int(v["zero_stage"]), network=v["network"],
                             micro_batch=int(v["micro_batch"]), checkpointing=bool(v["checkpointing"]))
        if self.widget is not None:
            self._summary.value = plan_summary(self.plan)._repr_html_()
            fig = plan_figure(self.plan)
            with self._fig.batch_update():
                self._fig.data = []
                self._fig.layout.shapes = []
                self._fig.layout.annotations = []
                self._fig.add_traces(list(fig.data))
                self._fig.update_layout(fig.layout)
        return self.plan

    def __str__(self) -> str:
        return str(plan_summary(self.plan))

    __repr__ = __str__

    def _ipython_display_(self) -> None:
        display(self.widget if self.widget is not None else Table(["", ""], [], str(self)))

    def _build(self) -> Any:
        v = self.values
        c = self._controls
        c["model"] = w.Dropdown(options=list(GPT_PRESETS), value=v["model"], description="model")
        c["tokens"] = w.FloatLogSlider(value=v["tokens"], base=10, min=8, max=13.3, step=0.1, description="tokens",
                                       readout_format=".2e")
        c["gpu"] = w.Dropdown(options=[a.name for a in catalog()], value=v["gpu"], description="GPU")
        c["n_gpus"] = w.Dropdown(options=[2**k for k in range(15)], value=v["n_gpus"], description="GPUs")
        c["network"] = w.Dropdown(options=[n.name for n in networks()], value=v["network"], description="network")
        c["zero_stage"] = w.Dropdown(options=[0, 1, 2, 3], value=v["zero_stage"], description="ZeRO stage")
        c["mfu"] = w.FloatSlider(value=v["mfu"], min=0.05, max=0.75, step=0.05, description="MFU")
        c["micro_batch"] = w.IntSlider(value=v["micro_batch"], min=1, max=64, description="micro-batch")
        c["checkpointing"] = w.Checkbox(value=v["checkpointing"], description="activation checkpointing")
        for key, ctl in c.items():
            ctl.observe(lambda change, key=key: self._changed(key, change["new"]), names="value")
        self._summary = w.HTML()
        # a plotly FigureWidget updates in place but costs seconds to load; by default the chart is
        # redrawn into an ipywidgets Output, which looks the same
        self._fig = go.FigureWidget() if self._figure_widget else _StaticFigure()
        controls = w.VBox(list(c.values()))
        return w.VBox([w.HBox([controls, self._summary]), self._fig if isinstance(self._fig, w.DOMWidget)
                       else self._fig.output])

    def _changed(self, key: str, value: Any) -> None:
        if self.values.get(key) != value:
            self.values[key] = value
            self.update()


class _StaticFigure:
    """Stands in for a FigureWidget: redraws a static plotly figure into an ipywidgets Output."""

    def __init__(self) -> None:
        self.output = w.Output()
        self._fig = go.Figure()

    @property
    def data(self) -> tuple:
        return self._fig.data

    @data.setter
    def data(self, value: Any) -> None:
        self._fig.data = value

    @property
    def layout(self) -> Any:
        return self._fig.layout

    def batch_update(self):
        return contextlib.nullcontext()

    def add_traces(self, traces: list) -> None:
        self._fig.add_traces(traces)

    def update_layout(self, layout: Any) -> None:
        self._fig.update_layout(layout)
        self.output.clear_output(wait=True)
        with self.output:
            display(plotly_bundle(self._fig), raw=True)
