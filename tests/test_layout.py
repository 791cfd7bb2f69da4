"""The package's shape, read from the source with ``ast`` (nothing is imported, but in (d)):

(a) the module-level imports between labkit modules form no cycle;
(b) only labkit/lab (the tooling) imports labkit.lab;
(c) an import inside a function of a module outside labkit is a deliberate lazy one: it carries a
    ``# lazy:`` comment (on its line or the line above) that names the dependency and why;
(d) one test imports: DDP training, pruning and serving leave FSDP and DCP unloaded (memory).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "labkit"

# (module, imported top-level package) pairs allowed inside functions without a `# lazy:` comment
ALLOWED_LAZY: set[tuple[str, str]] = set()
# above everything: `python -m labkit` runs the lab's command line
ENTRY_POINTS = {"__main__.py"}


@dataclass(frozen=True)
class Import:
    """One import statement: who imports, what (absolute module names), where, and at what level."""

    module: str
    targets: tuple[str, ...]
    line: int
    end_line: int
    in_function: bool
    type_checking: bool


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``labkit/lab/cli.py`` -> ``labkit.lab.cli``; ``labkit/core/__init__.py`` -> ``labkit.core``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, known: set[str], root: Path = PACKAGE) -> list[Import]:
    """Every import statement of one file; ``from pkg import name`` counts ``pkg.name`` when that is
    a module in ``known`` (e.g. ``from . import slurmcli``)."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_checking or (isinstance(child, ast.If) and _is_type_checking(child.test))
            if isinstance(child, ast.Import):
                targets = tuple(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                subs = tuple(f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known)
                targets = (base, *subs)
            else:
                visit(child, func, tc)
                continue
            out.append(Import(module, targets, child.lineno, child.end_lineno or child.lineno, in_function, type_checking))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the labkit modules its module-level imports run (a package's ``__init__`` included:
    importing ``labkit.cluster.errors`` runs ``labkit/cluster/__init__.py`` first)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    top = root.name
    for mod, path in files.items():
        own = set(_ancestors(mod)) | ({mod} if path.name == "__init__.py" else set())
        for imp in imports_of(path, known, root):
            if imp.in_function or imp.type_checking:
                continue
            for target in imp.targets:
                if target != top and not target.startswith(top + "."):
                    continue
                # the importer's own packages are already being imported: no edge to them
                for dep in [*_ancestors(target), target]:
                    if dep in known and dep != mod and dep not in own:
                        graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        "import cycle among labkit modules: " + " -> ".join(cycle) + ". Move the piece both sides need into "
        "a module lower down (e.g. labkit/core), rather than hiding the import inside a function")


def imports_of_the_lab_from_outside(root: Path = PACKAGE) -> list[str]:
    """``file:line imports X`` for each import of ``<root>.lab`` by a module outside ``<root>/lab``."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in files}
    lab_dir, lab = root / "lab", f"{root.name}.lab"
    return [
        f"{p.relative_to(root.parent)}:{imp.line} imports {t}"
        for p in files if lab_dir not in p.parents and p.relative_to(root).as_posix() not in ENTRY_POINTS
        for imp in imports_of(p, known, root) for t in imp.targets
        if t == lab or t.startswith(lab + ".")
    ]


def unmarked_function_imports(root: Path = PACKAGE, allowed: set[tuple[str, str]] = ALLOWED_LAZY) -> list[str]:
    """``file:line (package)`` for each import of a non-labkit module inside a function that has no
    ``# lazy:`` comment on its lines or the line above, and is not in ``allowed``."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in files}
    top = root.name
    bad = []
    for p in files:
        lines = p.read_text(encoding="utf-8").splitlines()
        for imp in imports_of(p, known, root):
            external = [t for t in imp.targets if t and t != top and not t.startswith(top + ".")]
            if not imp.in_function or not external:
                continue
            dist = external[0].split(".")[0]
            if (imp.module, dist) in allowed:
                continue
            if not any("# lazy:" in line for line in lines[max(imp.line - 2, 0): imp.end_line]):
                bad.append(f"{p.relative_to(root.parent)}:{imp.line} ({dist})")
    return bad


def test_only_the_lab_imports_the_lab():
    bad = imports_of_the_lab_from_outside()
    assert not bad, ("labkit/lab is the tooling on top; learning modules and labkit/core must not import it: "
                     + "; ".join(bad) + ". Move what they need out of labkit/lab (e.g. into labkit/core)")


def test_function_level_imports_are_marked_lazy():
    bad = unmarked_function_imports()
    assert not bad, (
        "imports inside functions without a reason: " + ", ".join(bad) + ". Move each to the top of its module, "
        "or, for a heavy or optional dependency, add a comment on that line or the one above, e.g. "
        "'# lazy: transformers (~1 s import) only when a BERT is loaded'")


# the checker itself, on a small made-up package


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "fake"
    for name, text in files.items():
        f = pkg / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return pkg


def test_checker_finds_a_cycle_through_relative_and_package_imports(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from .sub import b\n",
        "sub/__init__.py": "from . import b\n",
        "sub/b.py": "from ..a import x\n",
        "c.py": "def f():\n    from . import a\n",  # inside a function: not an edge
    })
    graph = import_graph(pkg)
    assert graph["fake.c"] == set()
    assert find_cycle(graph) is not None


def test_checker_sees_no_cycle_from_a_module_to_its_own_package(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from .b import x\n",
        "sub/b.py": "from . import c\n",
        "sub/c.py": "import os\n",
    })
    assert find_cycle(import_graph(pkg)) is None


@pytest.mark.parametrize("text, lazy", [
    ("def f():\n    import torch  # lazy: torch (2 s) only here\n", True),
    ("def f():\n    # lazy: torch (2 s) only here\n    import torch\n", True),
    ("def f():\n    import torch\n", False),
    ("def f():\n    from . import m\n", True),  # labkit's own modules are not asked for a reason
])
def test_checker_reads_the_lazy_comment(tmp_path, text, lazy):
    pkg = _write(tmp_path, {"__init__.py": "", "m.py": text})
    assert (unmarked_function_imports(pkg, set()) == []) is lazy


def test_checker_finds_an_import_of_the_lab_from_outside(tmp_path):
    pkg = _write(tmp_path, {"__init__.py": "", "lab/__init__.py": "", "lab/cli.py": "from ..core import ev\n",
                            "core/__init__.py": "", "core/ev.py": "def f():\n    from fake.lab import cli\n"})
    assert imports_of_the_lab_from_outside(pkg) == ["fake/core/ev.py:2 imports fake.lab", "fake/core/ev.py:2 imports fake.lab.cli"]


def test_ddp_training_and_pruning_do_not_load_fsdp_or_distributed_checkpoint():
    """FSDP and DCP (with DTensor and sympy) cost ~45 MiB per process: only FSDP runs may import them,
    or Binder's 1.5 GB is spent on workers and kernels that never shard (07 went over by it)."""
    import subprocess
    import sys

    code = ("import sys, labkit.train, labkit.prune.sweep, labkit.checkpoint, labkit.strategy, labkit.serve\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch.distributed.fsdp', "
            "'torch.distributed.checkpoint', 'sympy')))[:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
