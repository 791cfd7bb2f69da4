"""Author a notebook from percent-format text (an authoring aid; the .ipynb is what is stored).

    python scripts/build_notebook.py SOURCE.py notebooks/NN_name.ipynb

Cells start at lines "# %% [markdown]" (markdown; following lines lose their leading "# ")
or "# %%" (code). "# %% parameters" makes the code cell tagged `parameters`.
"""

import sys
from pathlib import Path

import nbformat


def build(text: str) -> nbformat.NotebookNode:
    """Turn percent-format text into a clean notebook (no outputs)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    kind, tags, buf = None, [], []

    def flush():
        if kind is None:
            return
        body = "\n".join(buf).strip("\n")
        if kind == "markdown":
            lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines()]
            cell = nbformat.v4.new_markdown_cell("\n".join(lines))
        else:
            cell = nbformat.v4.new_code_cell(body)
            if tags:
                cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            rest = line[4:].strip()
            buf = []
            if rest.startswith("[markdown]"):
                kind, tags = "markdown", []
            else:
                kind, tags = "code", (["parameters"] if rest == "parameters" else [])
            continue
        buf.append(line)
    flush()
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    nbformat.write(build(src.read_text()), dst)
    print(f"wrote {dst}")
