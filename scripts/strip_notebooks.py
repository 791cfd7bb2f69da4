"""Strip outputs and execution counts from the lab's notebooks (they are stored clean).

    python scripts/strip_notebooks.py [notebooks/*.ipynb]
"""

import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Clear one notebook's outputs in place; True when it changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.outputs or cell.execution_count is not None:
                changed = True
            cell.outputs = []
            cell.execution_count = None
    if changed:
        nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path("notebooks").glob("*.ipynb"))
    for p in paths:
        if strip(p):
            print(f"stripped {p}")
