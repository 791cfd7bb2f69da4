"""`labkit run`: executed copies, an HTML report with time, peak memory (kernel + children) and errors."""

import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from labkit.lab.cli import main
from labkit.lab.memwatch import TreeMemoryWatch, tree_memory
from labkit.lab.notebooks import NOTEBOOK_DIR
from labkit.lab.runner import RunOptions, resolve_notebooks, run_notebooks, source_digest

MiB = 1024 * 1024

# The kernel starts a child process that holds 300 MiB, spins 1 s of CPU and sleeps 3 s: the peak
# memory and the CPU time must include it.
CHILD_HOG = """
import subprocess, sys
code = ("b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time\\n"
        "while time.process_time() < 1.0: pass\\n"
        "time.sleep(3)")
subprocess.run([sys.executable, "-c", code], check=True)
print("scale in kernel:", scale)
"""


def make_notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("scale = None\nprofile = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_tree_memory_counts_children():
    code = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"]
    )
    try:
        with TreeMemoryWatch(parent.pid, interval=0.1) as watch:
            deadline = time.time() + 20
            while time.time() < deadline and watch.peak < 200 * MiB:
                time.sleep(0.2)
        assert watch.peak >= 200 * MiB, f"peak {watch.peak / MiB:.0f} MiB misses the child's 200 MiB"
        assert watch.peak_processes == 2
        assert watch.samples >= 2
    finally:
        children = psutil.Process(parent.pid).children(recursive=True)
        for proc in children:
            proc.kill()
        parent.kill()
        parent.wait()
        psutil.wait_procs(children, timeout=10)
    gone = tree_memory(parent.pid)
    assert gone.processes == 0


def test_labkit_run_writes_copies_and_report(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = make_notebook(src / "01_good.ipynb", CHILD_HOG)
    bad = make_notebook(src / "02_bad.ipynb", "print('before')", "raise RuntimeError('boom in cell 3')")
    out = tmp_path / "out"
    rc = main(["run", "--scale", "tiny", "--output", str(out), str(good), str(bad)])
    assert rc == 1, "a failing notebook must make `labkit run` exit non-zero"
    printed = capsys.readouterr()
    assert "boom in cell 3" in printed.err

    report = json.loads((out / "report.json").read_text())
    by_name = {r["name"]: r for r in report["results"]}
    assert report["context"]["scale"] == "tiny"
    assert by_name["01_good"]["ok"] and not by_name["02_bad"]["ok"]
    assert "boom in cell 3" in by_name["02_bad"]["error"]
    assert "\x1b[" not in by_name["02_bad"]["error"], "colour codes must not reach the report"
    # the kernel's child process (300 MiB) is part of the peak
    assert by_name["01_good"]["peak_bytes"] >= 300 * MiB
    assert by_name["01_good"]["processes"] >= 2
    assert by_name["01_good"]["seconds"] >= 3
    assert by_name["01_good"]["cpu_seconds"] >= 1.0

    executed = nbformat.read(out / "01_good.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "scale = 'tiny'" in injected[0].source
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    assert "scale in kernel: tiny" in text
    # the source notebook stays clean
    assert not any(c.get("outputs") for c in nbformat.read(good, as_version=4).cells if c.cell_type == "code")

    page = (out / "report.html").read_text()
    assert "1 of 2 notebooks failed" in page
    assert "01_good" in page and "02_bad" in page and "boom in cell 3" in page
    assert 'href="01_good.ipynb"' in page


def test_memory_budget_fails_the_run(tmp_path):
    nb = make_notebook(tmp_path / "hog.ipynb", CHILD_HOG)
    opts = RunOptions(scale="tiny", output=tmp_path / "out", max_memory=150 * MiB, max_seconds=600)
    [result] = run_notebooks([nb], opts)
    assert result.error is None
    assert not result.ok
    assert any("peak memory" in p for p in result.over_budget)
    assert "over budget" in (tmp_path / "out" / "report.html").read_text()


def test_bad_scale_fails_fast_with_choices(tmp_path, capsys):
    start = time.monotonic()
    rc = main(["run", "--scale", "huge", "--output", str(tmp_path), "00"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "huge" in err and "tiny" in err and "binder" in err
    assert time.monotonic() - start < 10
    assert not (tmp_path / "report.html").exists()


def test_resolve_notebooks_by_number_name_and_path():
    first = resolve_notebooks([])[0]
    assert first.name == "00_welcome.ipynb"
    assert resolve_notebooks(["00"]) == [first]
    assert resolve_notebooks(["00_welcome"]) == [first]
    assert resolve_notebooks([str(NOTEBOOK_DIR / "00_welcome.ipynb")]) == [first]
    with pytest.raises(SystemExit, match="choose from: 00_welcome"):
        resolve_notebooks(["99_nothing"])


def test_default_output_is_under_the_runs_folder_not_cwd(tmp_path, monkeypatch):
    from labkit.lab.cli import build_parser
    from labkit.lab.runner import options_from_args

    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path / "..")  # somewhere else: the default must not follow the current folder
    opts = options_from_args(build_parser().parse_args(["run", "--scale", "tiny", "00"]))
    assert opts.output.parent == tmp_path / "runs" and opts.output.name.startswith("run-")
    assert RunOptions().output.parent == tmp_path / "runs"
    given = options_from_args(build_parser().parse_args(["run", "--output", str(tmp_path / "x")]))
    assert given.output == tmp_path / "x"


def test_a_notebook_without_parameters_cell_is_a_failed_row_not_a_crash(tmp_path):
    """The run goes on and the report says how to tag the cell; the next notebook still runs."""
    bad = tmp_path / "00_untagged.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("scale = None")]
    nbformat.write(nb, bad)
    good = make_notebook(tmp_path / "01_fine.ipynb", "print('ok')")
    results = run_notebooks([bad, good], RunOptions(scale="tiny", output=tmp_path / "out"))
    assert [r.name for r in results] == ["00_untagged", "01_fine"]
    assert not results[0].ok and "add the tag 'parameters'" in results[0].error
    assert results[1].ok
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Property Inspector" in page and 'href="01_fine.ipynb"' in page


def test_html_previews_carry_outputs_and_embedded_figures(tmp_path):
    """`labkit run --html` writes a page per notebook that shows outputs and its SVG figures with no kernel
    and no files beside it (the figure is embedded, so the page can be mailed or moved)."""
    src = tmp_path / "src"
    (src / "figures").mkdir(parents=True)
    (src / "figures" / "box.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><text x="1" y="5">marker-in-svg</text></svg>')
    plots = ("import plotly.graph_objects as go\n"
             "for n in (2, 3):\n    go.Figure(go.Bar(y=list(range(n)))).show()")
    nb = make_notebook(src / "01_fig.ipynb", "print('printed', 6 * 7)", plots)
    book = nbformat.read(nb, as_version=4)
    book.cells.insert(0, nbformat.v4.new_markdown_cell("# A figure\n\n![a box](figures/box.svg)"))
    nbformat.write(book, nb)
    out = tmp_path / "out"
    [result] = run_notebooks([nb], RunOptions(scale="tiny", output=out, html=True))
    assert result.ok, result.error
    page = (out / "01_fig.html").read_text()
    assert "printed 42" in page
    assert "data:image/svg+xml" in page and "figures/box.svg" not in page
    # plotly figures are drawn (nbconvert alone would drop their JSON), plotly.js fetched once per page
    assert page.count("Plotly.newPlot") == 2 and page.count('src="https://cdn.plot.ly/') == 1
    assert 'href="01_fig.html"' in (out / "report.html").read_text()
    # the page names the notebook it ran from: the digest of the cells as written, outputs aside
    digest = source_digest(nbformat.read(nb, as_version=4))
    assert f'name="labkit-source" content="{digest}"' in page
    assert source_digest(nbformat.read(out / "01_fig.ipynb", as_version=4)) == digest
    book.cells[-1].source += "\nprint('changed')"
    assert source_digest(book) != digest
    # without the flag, no page
    [again] = run_notebooks([nb], RunOptions(scale="tiny", output=tmp_path / "plain"))
    assert again.ok and not (tmp_path / "plain" / "01_fig.html").exists()


def test_preview_leaves_out_saved_widget_state(tmp_path):
    """Saved widget state carries each widget's JavaScript (megabytes for a plotly FigureWidget) that a
    page without a kernel cannot run: the preview leaves it out and keeps the outputs."""
    from labkit.lab.runner import write_preview

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("w")
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "shown-in-text"}, execution_count=1)]
    widget = nbformat.v4.new_code_cell("plot")
    widget.outputs = [nbformat.v4.new_output("display_data", {
        "text/plain": "FigureWidget({'data': [], 'layout': WIDGET-REPR-DUMP})",
        "application/vnd.jupyter.widget-view+json": {"model_id": "m", "version_major": 2, "version_minor": 0}})]
    nb.cells = [cell, widget]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
        "version_major": 2, "version_minor": 0, "state": {"m": {"model_name": "x", "model_module": "y",
                                                                 "model_module_version": "1", "state": {"_esm": "ESM-CODE-BLOB"}}}}}
    page = write_preview(nb, tmp_path / "p.html").read_text()
    assert "shown-in-text" in page and "ESM-CODE-BLOB" not in page
    assert "WIDGET-REPR-DUMP" not in page and "needs a running kernel" in page  # a note, not the repr
    assert "widgets" in nb.metadata  # the executed copy itself is left as it was
