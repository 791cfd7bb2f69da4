"""End to end in a real browser: JupyterLab on localhost, Debian's Chromium driven by Playwright.

For every notebook of the lab (and a small live-widgets notebook of the tests), open it, run all
cells at ``tiny`` scale (the server's ``LABKIT_SCALE``; the ``scale = None`` parameter resolves to
it), wait for the kernel to go idle, and check what a learner sees: no error output, plotly figures
and widgets rendered where the notebook's code makes them, and a live plot that grows while the
kernel is still running. Screenshots go to ``screenshots/browser/`` (git-ignored).

Skips only when Chromium or Playwright is missing, and never in CI (``CI`` set): there it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from labkit.lab.notebooks import list_notebooks
from conftest import skip_unless_ci

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
SHOTS = REPO / "screenshots" / "browser"
LIVE_SOURCE = REPO / "tests" / "notebooks" / "live_widgets.py"
LIVE_NAME = "zz_live_widgets.ipynb"  # sorts after the lab's notebooks
NOTEBOOK_TIMEOUT = float(os.environ.get("LABKIT_BROWSER_TIMEOUT", "240"))
START_GRACE = 30.0  # seconds after Run All for some cell to show [*] or [n]
TOKEN = "labkit-browser-test"

# JupyterLab user settings for the test server: start the notebook's kernel without asking, keep
# every cell in the DOM, and never reach out for news or updates.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "autoStartDefaultKernel": True, "windowingMode": "none",
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False,
    },
}

# Evaluated in the page: the state of the notebook that is on screen.
PAGE_STATE_JS = """() => {
  const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden'));
  if (!panel) return null;
  const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
  const plots = [...panel.querySelectorAll('.js-plotly-plot')];
  const points = plots.map(p => (p.data || []).reduce((n, t) => n + ((t.x || t.y || []).length || 0), 0));
  return {
    status: indicator ? indicator.dataset.status : null,
    prompts: prompts,
    plots: plots.length,
    points: points.reduce((a, b) => a + b, 0),
    points_each: points,
    // ipywidgets views carry .jupyter-widgets; anywidget views (plotly's FigureWidget) sit directly in a
    // widget output, which JupyterLab leaves without a data-mime-type
    widgets: panel.querySelectorAll('.jupyter-widgets, .jp-OutputArea-output:not([data-mime-type]) > .lm-Widget').length,
    widget_errors: [...panel.querySelectorAll('.jp-OutputArea-output')].filter(o => /Error displaying widget|Failed to load model class/.test(o.textContent)).length,
    outputs: panel.querySelectorAll('.jp-OutputArea-output').length,
  };
}"""


@dataclass
class Expect:
    """What a notebook should show in the browser, decided from its code (or its metadata)."""

    plotly: bool
    widgets: bool
    live: bool


def expectations(nb: nbformat.NotebookNode, name: str) -> Expect:
    """Plots when the code makes a FigureWidget or a LivePlot; widgets for those and ipywidgets;
    a plot that changes during the run for live plots of training. ``metadata.labkit.browser``
    (``{"plotly": .., "widgets": .., "live": ..}``) overrides the guess."""
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    live_plot = bool(re.search(r"\bLivePlot\b", code))
    plotly = live_plot or bool(re.search(r"\bFigureWidget\b", code))
    widgets = plotly or bool(re.search(r"\bipywidgets\b|\bwidgets\.[A-Z]\w+\(", code))
    live = (live_plot and "train" in name) or name == LIVE_NAME
    override = nb.metadata.get("labkit", {}).get("browser", {})
    return Expect(
        plotly=override.get("plotly", plotly), widgets=override.get("widgets", widgets),
        live=override.get("live", live),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on localhost serving a temporary copy of the notebooks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.notebooks = root / "notebooks"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def api(self, path: str, method: str = "GET", tries: int = 3) -> object:
        """Call the server's REST API with the token; a GET is retried when a busy machine makes it time out."""
        sep = "&" if "?" in path else "?"
        tries = tries if method == "GET" else 1
        for attempt in range(1, tries + 1):
            req = urllib.request.Request(f"{self.base}{path}{sep}token={TOKEN}", method=method)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    body = r.read()
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code != 400 or attempt == tries:
                    raise AssertionError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
                time.sleep(1)
                continue
            except (urllib.error.URLError, TimeoutError):
                if attempt == tries:
                    raise
                time.sleep(1)
        return json.loads(body) if body else None

    def start(self) -> None:
        self.notebooks.mkdir(parents=True)
        for path in list_notebooks():
            shutil.copy(path, self.notebooks / path.name)
        build_live_notebook(self.notebooks / LIVE_NAME)
        settings = self.root / "settings"
        for rel, values in LAB_SETTINGS.items():
            (settings / rel).parent.mkdir(parents=True, exist_ok=True)
            (settings / rel).write_text(json.dumps(values))
        cfg = self.root / "config"
        cfg.mkdir()
        for layer in ("user.yaml", "site.yaml"):
            (cfg / layer).write_text("")
        env = dict(os.environ)
        env.pop("LABKIT_PROFILE", None)
        env.update(
            JUPYTER_TOKEN=TOKEN, JUPYTER_RUNTIME_DIR=str(self.root / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(self.root / "workspaces"),
            LABKIT_SCALE="tiny", LABKIT_USER_CONFIG=str(cfg / "user.yaml"), LABKIT_SITE_CONFIG=str(cfg / "site.yaml"),
            PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", BROWSER="true",
        )
        cmd = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}",
            "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", f"--notebook-dir={self.notebooks}",
        ]
        if os.getuid() == 0:
            cmd.append("--allow-root")
        log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited early:\n{(self.root / 'server.log').read_text()[-3000:]}")
            try:
                self.api("/api/status", tries=1)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("JupyterLab did not answer within 90 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def session(self, name: str) -> dict | None:
        for s in self.api("/api/sessions"):
            if s["path"].endswith(name):
                return s
        return None

    def shutdown_kernel(self, name: str) -> None:
        s = self.session(name)
        if s:
            self.api(f"/api/sessions/{s['id']}", method="DELETE")


def build_live_notebook(dest: Path) -> None:
    """Build the test notebook from its percent-format source with the lab's own authoring script."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from build_notebook import build
    finally:
        sys.path.pop(0)
    nbformat.write(build(LIVE_SOURCE.read_text()), dest)


@pytest.fixture(scope="module")
def chromium_browser():
    """Debian's Chromium under Playwright (Playwright's own download does not work here)."""
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: apt-get install chromium (scripts/install-system.sh)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright not installed: pip install -c constraints.txt '.[test]'"
    if reason:
        skip_unless_ci(reason)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("lab"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def wait_for_kernel_idle(lab: Lab, name: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = lab.session(name)
        if s and s["kernel"]["execution_state"] == "idle":
            return
        time.sleep(0.25)
    raise AssertionError(f"{name}: the kernel did not start and go idle within {timeout:.0f} s")


def click_menu(page, menu: str, item: str) -> None:
    page.click(f'.lm-MenuBar-itemLabel:text-is("{menu}")')
    page.click(f'.lm-Menu-itemLabel:text-matches("^{item}$")')


def run_all_and_watch(page, lab: Lab, name: str, sample_every: float = 0.15) -> tuple[dict, list[dict]]:
    """Run all cells; sample the page until the kernel is idle with no cell pending. Returns (final, samples)."""
    click_menu(page, "Run", "Run All Cells")
    clicked = time.time()
    samples: list[dict] = []
    settled = 0
    started = False
    deadline = time.time() + NOTEBOOK_TIMEOUT
    while time.time() < deadline:
        state = page.evaluate(PAGE_STATE_JS)
        state["t"] = time.time()
        samples.append(state)
        # a prompt shows [*] (queued or running) or [n] (ran) once Run All has taken; before that the
        # idle page would look "settled" and the run would be judged on cells that never started
        started = started or any(re.search(r"\[(\*|\d+)\]", p) for p in state["prompts"])
        if not started:
            if time.time() - clicked > START_GRACE:
                page.screenshot(path=str(SHOTS / f"{Path(name).stem}-not-started.png"))
                raise AssertionError(f"{name}: Run All did not start any cell within {START_GRACE:.0f} s (page {state})")
            if len(samples) % 40 == 0:  # about every 6 s: the menu click can be lost on a page still settling
                click_menu(page, "Run", "Run All Cells")
            time.sleep(sample_every)
            continue
        busy = any("*" in p for p in state["prompts"]) or state["status"] != "idle"
        if not busy:
            s = lab.session(name)
            busy = not s or s["kernel"]["execution_state"] != "idle"
        settled = 0 if busy else settled + 1
        if settled >= 3 and len(samples) > 3:
            return state, samples
        time.sleep(sample_every)
    page.screenshot(path=str(SHOTS / f"{Path(name).stem}-timeout.png"))
    raise AssertionError(f"{name}: still running after {NOTEBOOK_TIMEOUT:.0f} s (last state {samples[-1]})")


def executed_cells(nb: nbformat.NotebookNode) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" and c.get("execution_count"))


def read_from_disk(path: Path) -> nbformat.NotebookNode | None:
    """The notebook file as it is on disk now, or None while a save is half-way through writing it.

    Not through the contents API: a GET that meets a half-written file makes jupyter_server move
    that file aside and restore its backup, racing the save still in progress, which can leave
    the notebook missing (404) or unreadable (500). Both were seen in CI. Reading the file has no
    side effects."""
    try:
        return nbformat.read(path, as_version=4)
    except (OSError, ValueError):  # missing for a moment, or truncated JSON mid-write
        return None


def saved_notebook(page, lab: Lab, name: str, executed: int) -> nbformat.NotebookNode:
    """Save from the browser (File > Save, then Ctrl+S if that did not take) and read back what
    JupyterLab wrote, waiting until the file holds the ``executed`` cells the page shows as run
    (an autosave of an earlier state can land first)."""
    nb = None
    for attempt in range(3):
        page.keyboard.press("Escape")
        if attempt == 0:
            click_menu(page, "File", "Save( Notebook)?")
        else:
            page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").first.click(position={"x": 5, "y": 5})
            page.keyboard.press("Control+s")
        deadline = time.time() + 20
        while time.time() < deadline:
            nb = read_from_disk(lab.notebooks / name) or nb
            if nb is not None and executed_cells(nb) >= executed:
                return nb
            time.sleep(0.5)
    page.screenshot(path=str(SHOTS / f"{Path(name).stem}-unsaved.png"))
    assert nb is not None, f"{name}: JupyterLab left no readable notebook on disk after saving"
    # judging a stale file would report cells as "did not run" that the page shows as run
    assert executed_cells(nb) >= executed, (
        f"{name}: the page shows {executed} executed cells, the file JupyterLab saved holds "
        f"{executed_cells(nb)} after three saves (see {SHOTS}/{Path(name).stem}-unsaved.png)"
    )
    return nb


def growth(samples: list[dict], plot: int) -> list[int]:
    """The distinct, increasing point counts of one plot seen while cells were still running."""
    seen: list[int] = []
    for s in samples:
        running = any("*" in p for p in s["prompts"])
        n = s["points_each"][plot] if plot < len(s["points_each"]) else 0
        if running and n > 0 and (not seen or n > seen[-1]):
            seen.append(n)
    return seen


def timeline(samples: list[dict]) -> list[tuple[float, list[int], bool]]:
    """(seconds since Run All, points per plot, some cell pending) at each change, to explain a failure."""
    out: list[tuple[float, list[int], bool]] = []
    for s in samples:
        row = (round(s["t"] - samples[0]["t"], 1), s["points_each"], any("*" in p for p in s["prompts"]))
        if not out or out[-1][1:] != row[1:]:
            out.append(row)
    return out


def move_slider_and_expect_title(page) -> None:
    """Browser -> kernel -> browser: a slider key press makes the kernel retitle the figure."""
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(t => t.textContent === 'power 2')",
        timeout=20000,
    )


NOTEBOOKS = [p.name for p in list_notebooks()] + [LIVE_NAME]


def open_and_run(page, lab: Lab, name: str) -> tuple[dict, list[dict], nbformat.NotebookNode]:
    """Open a notebook in JupyterLab, run all cells, save it; the final page state, the samples, the saved notebook."""
    page.goto(f"{lab.base}/lab/tree/{name}?reset&token={TOKEN}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60000)
    wait_for_kernel_idle(lab, name)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=30000)
    final, samples = run_all_and_watch(page, lab, name)
    page.screenshot(path=str(SHOTS / f"{Path(name).stem}-end.png"))
    shown = sum(1 for p in final["prompts"] if re.search(r"\[\d+\]", p))
    return final, samples, saved_notebook(page, lab, name, shown)


PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def sent_outputs(saved: nbformat.NotebookNode) -> dict[str, int]:
    """How many outputs of each rich type the kernel sent (plotly figures, widget views)."""
    counts = {PLOTLY_MIME: 0, WIDGET_MIME: 0}
    for c in saved.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            for mime in counts:
                counts[mime] += mime in o.get("data", {})
    return counts


def problems(saved: nbformat.NotebookNode) -> list[str]:
    """Error outputs and cells that never ran (Run All stops at the first error)."""
    code = [(i, c) for i, c in enumerate(saved.cells) if c.cell_type == "code"]
    found = [
        f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
        for i, c in code for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    unrun = [i for i, c in code if not c.get("execution_count")]
    if unrun:
        found.append(f"cells {unrun} did not run")
    return found


@pytest.fixture
def page(chromium_browser, lab):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = chromium_browser.new_page(viewport={"width": 1400, "height": 1000})
    page.js_errors = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    yield page
    for s in lab.api("/api/sessions"):
        try:
            lab.api(f"/api/sessions/{s['id']}", method="DELETE")
        except OSError:
            pass
    page.close()


@pytest.mark.parametrize("name", NOTEBOOKS, ids=lambda n: Path(n).stem)
def test_notebook_in_jupyterlab(name, lab, page, executed_notebooks):
    stem = Path(name).stem
    expect = expectations(nbformat.read(lab.notebooks / name, as_version=4), name)
    final, samples, saved = open_and_run(page, lab, name)

    assert not problems(saved), f"{name}: in the browser: {problems(saved)}"
    assert not any("*" in p for p in final["prompts"])
    assert not final["widget_errors"], f"{name}: a widget failed to render in the page"
    # every plotly figure the kernel sent must be drawn, and some widget view if widgets were sent
    sent = sent_outputs(saved)
    assert final["plots"] >= sent[PLOTLY_MIME], (
        f"{name}: {sent[PLOTLY_MIME]} plotly figures in the outputs, {final['plots']} drawn (.js-plotly-plot)"
    )
    if sent[WIDGET_MIME]:
        assert final["widgets"] > 0, f"{name}: {sent[WIDGET_MIME]} widget outputs, none rendered"
    if expect.plotly:
        assert final["plots"] > 0, f"{name}: the code makes a plotly figure, but none rendered (.js-plotly-plot)"
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / f"{stem}-plot.png"))
    if expect.widgets:
        assert final["widgets"] > 0, f"{name}: the code displays widgets, but none rendered (.jupyter-widgets)"
    if expect.live:
        seen = [growth(samples, i) for i in range(final["plots"])]
        live_plots = [i for i, g in enumerate(seen) if len(g) >= 2]
        if name == LIVE_NAME:  # both its FigureWidget and its LivePlot grow while the kernel runs
            assert live_plots == [0, 1], f"live plots {live_plots}; timeline: {timeline(samples)}"
        assert live_plots, (
            f"{name}: the live plot did not change while the kernel ran (points seen while busy: {seen}; "
            f"final {final['points']}); timeline (s, points per plot, busy): {timeline(samples)}"
        )
    if name == LIVE_NAME:
        # the slider's FigureWidget has its 60 points; LivePlot drew 2 ranks x 30 steps
        assert final["points_each"] == [60, 60], final["points_each"]
        move_slider_and_expect_title(page)
        page.screenshot(path=str(SHOTS / f"{stem}-slider.png"))
    assert not page.js_errors, f"{name}: JavaScript errors in the page: {page.js_errors[:3]}"
    executed_notebooks[stem] = saved  # test_notebooks.py checks its outputs rather than run it again


def test_browser_run_reports_an_error(lab, page):
    """The checks above can fail: a cell error in the browser is seen, and the cells after it did not run."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in ("x = 1", "1 / 0", "y = 2")]
    nbformat.write(nb, lab.notebooks / "zz_broken.ipynb")
    final, _, saved = open_and_run(page, lab, "zz_broken.ipynb")
    found = problems(saved)
    assert any("ZeroDivisionError" in p for p in found), (found, final)
    assert any("cells [2] did not run" in p for p in found), (found, final)
    assert final["plots"] == 0


def test_expectations_follow_the_code():
    """The per-notebook checks are decided from code; a wrong guess would skip a real check."""
    def nb(code: str, **meta) -> nbformat.NotebookNode:
        n = nbformat.v4.new_notebook()
        n.cells = [nbformat.v4.new_code_cell(code)]
        n.metadata.update(meta)
        return n

    assert expectations(nb("print(1)"), "00_welcome.ipynb") == Expect(False, False, False)
    assert expectations(nb("plot = LivePlot(metrics=('loss',))"), "06_distributed_training.ipynb") == Expect(True, True, True)
    assert expectations(nb("plot = LivePlot()"), "07_pruning.ipynb") == Expect(True, True, False)
    assert expectations(nb("import ipywidgets as w"), "04_attention_math.ipynb") == Expect(False, True, False)
    assert expectations(nb("fig = go.FigureWidget()"), "02_hardware.ipynb") == Expect(True, True, False)
    override = nb("print(1)", labkit={"browser": {"plotly": True}})
    assert expectations(override, "05_bert.ipynb").plotly
