"""The notebook harness: stored clean, one `parameters` cell, every notebook runs at tiny scale."""

import json
import re

import nbformat
import pytest

from labkit.lab.notebooks import execute_notebook, list_notebooks, parameters_cells

NOTEBOOKS = list_notebooks()


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names and names[0] == "00_welcome.ipynb"
    assert all(re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", n) for n in names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run: python scripts/strip_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    idx = parameters_cells(nb)
    assert len(idx) == 1, f"{path.name}: {len(idx)} cells tagged 'parameters', need exactly 1"
    assert re.search(r"^scale\s*=", nb.cells[idx[0]].source, re.M), "the parameters cell must set `scale`"


# What a notebook's prose promises the learner will see, checked in its outputs at tiny scale
PROMISED = {
    "01_cluster": ["the scheduler holds it as 'no-worker'"],     # a request no worker can satisfy just waits
    "02_hardware": [
        "compute-optimal ~",                                      # Chinchilla's rule, computed
        "cap: out of memory: ",                                   # the OOM predicted by training_memory is seen ...
        "cap: the step ran",                                      # ... and goes away with room for the prediction
    ],
    "03_preprocessing": [
        "same merges as Hugging Face: True",                 # BPE by hand learns what tokenizers learns
        "is corrupt: its sha256 does not match meta.json",    # a flipped bit in a shard is caught
    ],
    "04_attention_math": [
        "each row of weights sums to tensor([1., 1., 1.])",  # the worked example's softmax
        "online_softmax: not yet",  # the exercises ship unsolved and their checks run
    ],
    "05_bert": [
        "| bert-base-uncased (BertConfig() defaults) | 12 | 768 | 12 | 64 | 3072 | 109.5 M |",  # the shape table
        "TensorFlow BERT in transformers: False",  # PyTorch only, as the prose says
        "largest difference over 6 layers x 12 heads:",  # the one measured figure the recap points to
    ],
    "06_distributed_training": [
        "on Slurm's warning signal before walltime",              # the warned run stopped cleanly ...
        "losses equal the uninterrupted run's, bit for bit: True",  # ... and resumed exactly
    ],
    "07_pruning": ["torch threads"],                                   # the thread count the timings ran with
    "08_serving": [
        "gave the same text alone and inside a batch",             # concurrent requests, batched, same text
        "seed 123 twice:",
        "joined == the answer above: True",                         # the stream is the answer, piece by piece
    ],
    "09_finetune_bert": [
        "all ranks hold bit-identical weights: True",   # DDP kept the ranks together
        "fine-tuned beats the majority class: True",    # on held-out modules, at tiny scale
    ],
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_tiny_scale(path, tmp_path, executed_notebooks):
    """Every notebook runs at tiny scale and shows what its prose promises. Where test_browser.py ran it
    in JupyterLab this session (at the server's tiny scale, always in CI), its saved copy is checked;
    otherwise it runs here, headless, with ``scale="tiny"`` injected into its parameters cell."""
    notebook = executed_notebooks.get(path.stem)
    if notebook is None:
        run = execute_notebook(path, {"scale": "tiny"}, timeout=600)
        if not run.ok:
            # keep the executed copy for a human to look at
            nbformat.write(run.notebook, tmp_path / path.name)
        assert run.ok, f"{path.name} failed after {run.seconds:.0f} s:\n{run.error[-3000:]}"
        notebook = run.notebook
    outputs = json.dumps([c.get("outputs", []) for c in notebook.cells])
    assert "Traceback" not in outputs
    missing = [line for line in PROMISED.get(path.stem, []) if line not in outputs]
    assert not missing, f"{path.name}: its prose promises output it did not print: {missing}"
    # the notebook ships unsolved: no exercise's check may pass before the learner has written anything
    passed = [m.group(1) for m in PASSED_CHECK_RE.finditer(html_outputs(notebook))]
    assert not passed, f"{path.name}: exercises pass unchanged, with the starter code: {passed}"


PASSED_CHECK_RE = re.compile(r'<div class="labkit-check" style="color:#1a7f37[^>]*>✅ <code>([^<]*)</code>')


def html_outputs(nb: nbformat.NotebookNode) -> str:
    """The HTML of every output (where a checker's Result shows its verdict)."""
    return "\n".join("".join(out.get("data", {}).get("text/html", ""))
                     for c in nb.cells if c.cell_type == "code" for out in c.get("outputs", []))


def test_the_unchanged_exercise_scan_sees_a_pass():
    from labkit.check import Result

    def notebook_showing(result: Result) -> nbformat.NotebookNode:
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("check(...)")
        cell.outputs = [nbformat.v4.new_output("execute_result", {"text/html": result._repr_html_()}, execution_count=1)]
        nb.cells = [cell]
        return nb

    found = PASSED_CHECK_RE.findall(html_outputs(notebook_showing(Result(True, "right", name="softmax"))))
    assert found == ["softmax"]
    for other in (Result(False, "wrong", "x", name="softmax"), Result(None, "not yet", name="softmax")):
        assert not PASSED_CHECK_RE.findall(html_outputs(notebook_showing(other)))


def test_harness_catches_a_failing_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("scale = None")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("assert scale == 'tiny'\nraise RuntimeError('boom')")]
    path = tmp_path / "99_bad.ipynb"
    nbformat.write(nb, path)
    run = execute_notebook(path, {"scale": "tiny"}, timeout=120)
    assert not run.ok and "boom" in run.error


def test_welcome_starts_a_local_cluster_even_where_the_lab_uses_slurm():
    """00 starts "a first local Dask cluster": with profile = None it stays on this machine, even when
    the lab's profile is slurm (no Slurm job is submitted, so this runs anywhere)."""
    path = next(p for p in NOTEBOOKS if p.name == "00_welcome.ipynb")
    run = execute_notebook(path, {"scale": "tiny"}, timeout=600, env={"LABKIT_PROFILE": "slurm"})
    assert run.ok, run.error[-3000:]
    outputs = json.dumps([c.get("outputs", []) for c in run.notebook.cells])
    assert "profile: local (local" in outputs
    assert "starting a local cluster with profile 'local'" in outputs, outputs[-2000:]
