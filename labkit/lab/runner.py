"""`labkit run`: execute the lab's notebooks headless, as an instructor does before a workshop.

Each notebook runs in a fresh kernel with ``scale`` / ``profile`` injected after its
``parameters`` cell; the executed copies and an HTML report (time, peak memory of the kernel and
the processes it started, errors) go to one output folder. The exit status is non-zero when a
notebook fails, or goes over a time or memory budget given on the command line.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import html
import json
import os
import platform
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nbformat

from labkit.config import ConfigError, load_config, run_stamp, runs_dir
from labkit.lab.memwatch import TreeMemoryWatch
from labkit.lab.notebooks import NOTEBOOK_DIR, execute_notebook, inject_parameters, list_notebooks
from labkit.settings import Memory

MiB = 1024 * 1024
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class RunResult:
    """One notebook's run: where its executed copy is, how long it took, its peak memory, its error."""

    name: str
    source: str
    executed: str
    seconds: float
    peak_bytes: int
    peak_rss_bytes: int
    memory_measure: str
    processes: int
    cpu_seconds: float = 0.0
    error: str | None = None
    over_budget: list[str] = field(default_factory=list)
    nudges: list[str] = field(default_factory=list)  # cells whose late reply the watchdog had to wake

    @property
    def ok(self) -> bool:
        return self.error is None and not self.over_budget

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MiB


def default_output(now: _dt.datetime | None = None) -> Path:
    """Where a run's copies and report go without ``--output``: ``<runs>/run-<date>-<time>``, under
    ``labkit.config.runs_dir()`` (``$LABKIT_RUN_DIR``, else the lab's ``runs/``), wherever you start it."""
    return runs_dir() / f"run-{run_stamp(now)}"


@dataclass
class RunOptions:
    """What `labkit run` was asked to do."""

    scale: str | None = None
    profile: str | None = None
    output: Path = field(default_factory=default_output)
    timeout: int = 900
    kernel_name: str = "python3"
    max_seconds: float | None = None
    max_memory: int | None = None
    fail_fast: bool = False
    sample_interval: float = 0.2
    html: bool = False  # also write NAME.html beside each executed copy, for previews without a kernel


def resolve_notebooks(names: Sequence[str], directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """Turn paths, file names, stems (``03_preprocessing``) or number prefixes (``03``) into notebook paths.

    No names means every notebook of the lab, in order.
    """
    available = list_notebooks(directory)
    if not names:
        if not available:
            raise SystemExit(f"no notebooks found in {directory}: run from the labkit checkout, or name the "
                             "notebooks to run (paths, or stems such as 03_preprocessing)")
        return available
    found: list[Path] = []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb" and p.is_file():
            found.append(p.resolve())
            continue
        stem = p.name[: -len(".ipynb")] if p.name.endswith(".ipynb") else p.name
        matches = [a for a in available if a.stem == stem or a.stem.split("_", 1)[0] == stem]
        if len(matches) != 1:
            choices = ", ".join(a.stem for a in available) or "(none)"
            raise SystemExit(f"labkit run: no single notebook matches {name!r}; choose from: {choices}")
        found.append(matches[0])
    return found


def run_one(path: Path, opts: RunOptions, out_dir: Path) -> RunResult:
    """Execute one notebook with the run's parameters, watching its kernel's memory; write the executed copy."""
    params = {k: v for k, v in (("scale", opts.scale), ("profile", opts.profile)) if v}
    try:
        inject_parameters(nbformat.read(path, as_version=4), params)  # a malformed notebook: its own error row
    except (ValueError, OSError, nbformat.reader.NotJSONError) as exc:
        return RunResult(name=path.stem, source=str(path), executed="", seconds=0.0, peak_bytes=0,
                         peak_rss_bytes=0, memory_measure="not run", processes=0, error=f"not run: {exc}")
    watch = TreeMemoryWatch(interval=opts.sample_interval)
    started = time.monotonic()

    def over_budget() -> str | None:  # polled while the notebook runs: a budget stops it at once
        took = time.monotonic() - started
        if opts.max_seconds is not None and took > opts.max_seconds:
            return f"ran {took:.0f} s, over --max-seconds {opts.max_seconds:g}"
        if opts.max_memory is not None and watch.peak > opts.max_memory:
            return f"peak memory {watch.peak / MiB:.0f} MiB, over --max-memory {opts.max_memory / MiB:.0f} MiB"
        return None

    with watch:
        run = execute_notebook(
            path, params, timeout=opts.timeout, kernel_name=opts.kernel_name, on_kernel_start=watch.watch,
            should_stop=over_budget,
        )
    executed = out_dir / path.name
    nbformat.write(run.notebook, executed)
    if opts.html:
        write_preview(run.notebook, out_dir / f"{path.stem}.html", source_dir=path.parent)
    stopped_by_budget = bool(run.stopped and run.stopped.startswith("NotebookStopped"))
    error = ANSI_RE.sub("", run.error) if run.error and not stopped_by_budget else None
    result = RunResult(
        name=path.stem, source=str(path), executed=str(executed), seconds=round(run.seconds, 2),
        peak_bytes=watch.peak, peak_rss_bytes=watch.peak_rss, memory_measure=watch.measure,
        processes=watch.peak_processes, cpu_seconds=round(watch.cpu_seconds, 2), error=error,
        nudges=list(run.nudges),
    )
    if stopped_by_budget:
        result.over_budget.append(run.stopped.split(": ", 1)[1])
    else:  # a budget crossed in the last half second, after the watchdog's final look
        if opts.max_seconds is not None and result.seconds > opts.max_seconds:
            result.over_budget.append(f"took {result.seconds:.0f} s, over --max-seconds {opts.max_seconds:g}")
        if opts.max_memory is not None and result.peak_bytes > opts.max_memory:
            result.over_budget.append(
                f"peak memory {result.peak_mib:.0f} MiB, over --max-memory {opts.max_memory / MiB:.0f} MiB")
    return result


PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ('<p class="labkit-widget-note"><em>Here the notebook shows a live widget (a plot that follows the '
               "work, or controls): it needs a running kernel. Run the notebook to see it.</em></p>")


def _plotly_as_html(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose plotly figures also carry HTML (nbconvert draws no plotly JSON): plotly.js
    comes once per page from plotly's CDN, so a page stays small; offline, the rest of it still reads.
    A live widget's output becomes a short note: without a kernel it cannot draw."""
    import plotly.io as pio  # lazy: plotly only for a run that writes previews

    nb = copy.deepcopy(nb)
    # live widgets' saved state carries each widget's JavaScript (plotly's FigureWidget: all of plotly.js,
    # megabytes a widget); a page without a kernel cannot run them anyway, so they show their text form
    nb.metadata.pop("widgets", None)
    first = True
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data:  # its text form is the widget's repr (a FigureWidget's: pages of dict)
                out["data"] = {"text/html": WIDGET_NOTE, "text/plain": "(a live widget: run the notebook to see it)"}
                continue
            if PLOTLY_MIME in data and "text/html" not in data:
                fig = pio.from_json(json.dumps(data[PLOTLY_MIME]), skip_invalid=True)
                data["text/html"] = pio.to_html(fig, full_html=False, include_plotlyjs="cdn" if first else False)
                first = False
    return nb


def source_digest(nb: nbformat.NotebookNode) -> str:
    """A hash of a notebook's cells as written (outputs and injected parameters left out): a preview
    carries the digest of what it was run from, so a stale preview can be told from a fresh one."""
    cells = [(c.cell_type, c.source) for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()[:16]


def write_preview(nb: nbformat.NotebookNode, target: Path, source_dir: Path = NOTEBOOK_DIR) -> Path:
    """Write an executed notebook as one self-contained HTML page (figures embedded), readable with no kernel.

    Markdown images (``figures/*.svg``) are embedded as data, so the page works offline and moved
    anywhere; widgets that need a live kernel show their text fallback."""
    from nbconvert import HTMLExporter  # lazy: nbconvert only for a run that asks for previews

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(_plotly_as_html(nb), resources={"metadata": {"path": str(source_dir)}})
    body = body.replace("<head>", f'<head>\n<meta name="labkit-source" content="{source_digest(nb)}">', 1)
    target.write_text(body, encoding="utf-8")
    return target


def run_notebooks(
    paths: Sequence[Path], opts: RunOptions, progress: Callable[[RunResult], None] | None = None
) -> list[RunResult]:
    """Run notebooks one after the other (one kernel at a time, so each peak is its own); write the reports."""
    out_dir = Path(opts.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    for path in paths:
        result = run_one(Path(path), opts, out_dir)
        results.append(result)
        if progress:
            progress(result)
        write_reports(results, opts, out_dir)
        if opts.fail_fast and not result.ok:
            break
    return results


def _context(opts: RunOptions) -> dict[str, str]:
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "scale": opts.scale or os.environ.get("LABKIT_SCALE") or "(config default)",
        "profile": opts.profile or os.environ.get("LABKIT_PROFILE") or "(config default)",
        "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
    }


def write_reports(results: Sequence[RunResult], opts: RunOptions, out_dir: Path) -> Path:
    """Write ``report.html`` (for people) and ``report.json`` (for scripts) into ``out_dir``."""
    ctx = _context(opts)
    data = {"context": ctx, "results": [dict(asdict(r), ok=r.ok) for r in results]}
    (out_dir / "report.json").write_text(json.dumps(data, indent=2))
    path = out_dir / "report.html"
    path.write_text(render_html(results, ctx))
    return path


def render_html(results: Sequence[RunResult], ctx: dict[str, str]) -> str:
    """A self-contained HTML page: one row per notebook, errors folded under each failing row."""
    e = html.escape
    failed = sum(not r.ok for r in results)
    rows = []
    for r in results:
        status = "ok" if r.ok else ("error" if r.error else "over budget")
        problems = ""
        if r.over_budget:
            problems += "<br>".join(e(x) for x in r.over_budget)
        if r.error:
            problems += f"<details><summary>error</summary><pre>{e(r.error[-6000:])}</pre></details>"
        link = f'<a href="{e(Path(r.executed).name)}">{e(r.name)}</a>' if r.executed else e(r.name)
        preview = Path(r.executed).with_suffix(".html") if r.executed else None
        if preview is not None and preview.exists():
            link += f' (<a href="{e(preview.name)}">HTML</a>)'
        rows.append(
            f'<tr class="{status.replace(" ", "-")}"><td>{link}</td>'
            f"<td>{status}</td><td>{r.seconds:.1f}</td><td>{r.peak_mib:.0f}</td>"
            f"<td>{r.cpu_seconds:.1f}</td><td>{r.processes}</td><td>{problems}</td></tr>"
        )
    measure = results[0].memory_measure.upper() if results else "PSS"
    total = sum(r.seconds for r in results)
    peak = max((r.peak_mib for r in results), default=0.0)
    cpu = sum(r.cpu_seconds for r in results)
    meta = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in ctx.items())
    verdict = "all notebooks passed" if not failed else f"{failed} of {len(results)} notebooks failed"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>labkit run: {e(verdict)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .3em .6em; vertical-align: top; }}
td:nth-child(3), td:nth-child(4), td:nth-child(5), td:nth-child(6) {{ text-align: right; }}
tr.ok td:nth-child(2) {{ color: #1a7f37; }} tr.error td:nth-child(2), tr.over-budget td:nth-child(2) {{ color: #cf222e; font-weight: bold; }}
pre {{ max-width: 60em; white-space: pre-wrap; font-size: .85em; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }} dt {{ font-weight: bold; }}
</style></head><body>
<h1>labkit run: {e(verdict)}</h1>
<dl>{meta}</dl>
<table>
<thead><tr><th>notebook</th><th>status</th><th>time (s)</th><th>peak memory, kernel + children ({measure}, MiB)</th><th>CPU time (s)</th><th>processes</th><th>problems</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
<tfoot><tr><th>total</th><th></th><th>{total:.1f}</th><th>{peak:.0f} (max)</th><th>{cpu:.1f}</th><th></th><th></th></tr></tfoot>
</table>
</body></html>
"""


def format_table(results: Sequence[RunResult]) -> str:
    """A plain-text table of the results, for terminals and benchmarks."""
    lines = [f"{'notebook':<28} {'status':<11} {'time s':>8} {'cpu s':>8} {'peak MiB':>9} {'procs':>5}"]
    for r in results:
        status = "ok" if r.ok else ("error" if r.error else "over budget")
        lines.append(f"{r.name:<28} {status:<11} {r.seconds:>8.1f} {r.cpu_seconds:>8.1f} {r.peak_mib:>9.0f} {r.processes:>5}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebooks", nargs="*", help="notebook paths, names or numbers (default: all in notebooks/)")
    parser.add_argument("--scale", help="scale injected into each notebook: tiny, binder, workshop, full")
    parser.add_argument("--profile", help="profile injected into each notebook: local, binder, slurm, ...")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="folder for executed copies and report.html (default: run-<date>-<time> in the lab's runs "
                             "folder: $LABKIT_RUN_DIR, else runs/ of the labkit checkout; labkit doctor shows it)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one cell may take (default 900)")
    parser.add_argument("--kernel", default="python3", help="kernel name (default python3; see labkit install-kernel)")
    parser.add_argument("--max-seconds", type=float, default=None, help="fail a notebook that takes longer")
    parser.add_argument("--max-memory", default=None, help="fail a notebook whose peak memory is higher, e.g. 1.5GB")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing notebook")
    parser.add_argument("--html", action="store_true",
                        help="also write each executed notebook as a self-contained NAME.html to preview without a kernel")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Validate the command line into :class:`RunOptions` (bad scale/profile names fail here, in seconds)."""
    cfg = load_config()
    if args.scale:
        cfg.scale(args.scale)
    if args.profile:
        cfg.profile(args.profile)
    output = args.output or default_output()
    return RunOptions(
        scale=args.scale, profile=args.profile, output=output, timeout=args.timeout, kernel_name=args.kernel,
        max_seconds=args.max_seconds,
        max_memory=Memory(args.max_memory, "--max-memory").bytes if args.max_memory else None,
        fail_fast=args.fail_fast, html=args.html,
    )


def cli(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
    except ConfigError as exc:
        print(f"labkit run: {exc}", file=sys.stderr)
        return 2
    paths = resolve_notebooks(args.notebooks)
    print(f"labkit run: {len(paths)} notebook(s) -> {opts.output}", flush=True)

    def progress(r: RunResult) -> None:
        status = "ok" if r.ok else ("FAILED" if r.error else "OVER BUDGET: " + "; ".join(r.over_budget))
        print(f"  {r.name:<28} {r.seconds:7.1f} s {r.peak_mib:7.0f} MiB  {status}", flush=True)

    results = run_notebooks(paths, opts, progress)
    failed = [r for r in results if not r.ok]
    print(format_table(results))
    print(f"report: {Path(opts.output) / 'report.html'}")
    for r in failed:
        if r.error:
            print(f"\n--- {r.name} failed ---\n{r.error[-2000:]}", file=sys.stderr)
    return 1 if failed or len(results) < len(paths) else 0
