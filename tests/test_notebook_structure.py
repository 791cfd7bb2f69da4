"""Every notebook opens with learning goals, closes with a recap and a link onward, and its links work."""

from __future__ import annotations

import io
import os
import re
import tokenize
from pathlib import Path

import nbformat
import pytest

from labkit.lab.notebooks import NOTEBOOK_DIR, list_notebooks

NOTEBOOKS = list_notebooks()
GOALS_RE = re.compile(r"learning goals|you will learn|what you will learn|by the end of this notebook", re.I)
RECAP_RE = re.compile(r"^\s*(#+\s*|\*\*)(recap|summary|what you learned|key takeaways)\b", re.I | re.M)
LIST_RE = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S", re.M)
MD_LINK_RE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK_RE = re.compile(r"""href=["']([^"']+)["']""")
NUMBER_RE = re.compile(r"^(\d\d)_")


def markdown(nb: nbformat.NotebookNode) -> list[tuple[int, str]]:
    return [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"]


def opening(nb: nbformat.NotebookNode) -> str:
    """The markdown before the first code cell (the notebook's introduction)."""
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
    return "\n\n".join(src for i, src in markdown(nb) if i < first_code)


def closing(nb: nbformat.NotebookNode) -> str:
    """The markdown after the last code cell (the notebook's ending)."""
    last_code = max((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), default=-1)
    return "\n\n".join(src for i, src in markdown(nb) if i > last_code)


def links(text: str) -> list[str]:
    """Link targets in markdown and inline HTML."""
    return MD_LINK_RE.findall(text) + HTML_LINK_RE.findall(text)


def heading_anchors(nb: nbformat.NotebookNode) -> set[str]:
    """Anchors JupyterLab gives headings (text with spaces as '-'), compared case- and punctuation-blind."""
    out = set()
    for _, src in markdown(nb):
        for m in re.finditer(r"^#+\s+(.+?)\s*#*\s*$", src, re.M):
            out.add(_norm_anchor(m.group(1).replace(" ", "-")))
    return out


def _norm_anchor(text: str) -> str:
    return re.sub(r"[^\w-]", "", text.replace("`", "")).lower()


def goals_problems(nb: nbformat.NotebookNode) -> list[str]:
    intro = opening(nb)
    m = GOALS_RE.search(intro)
    if not m:
        return ["no learning goals before the first code cell (a 'Learning goals' list in the introduction)"]
    if not LIST_RE.search(intro[m.end():]):
        return ["the learning goals are not followed by a list"]
    return []


def recap_problems(nb: nbformat.NotebookNode, next_number: str | None) -> list[str]:
    end = closing(nb)
    found = []
    m = RECAP_RE.search(end)
    if not m:
        found.append("no recap after the last code cell (a '## Recap' with a list)")
    elif not LIST_RE.search(end[m.end():]):
        found.append("the recap has no list")
    if next_number is not None:
        onward = [t for t in links(end) if Path(t.split("#")[0]).name.startswith(f"{next_number}_")]
        if not onward:
            found.append(f"the ending does not link to the next notebook ({next_number}_*.ipynb)")
    return found


def link_problems(nb: nbformat.NotebookNode, directory: Path) -> list[str]:
    """Relative links must reach a file; links to notebooks must reach one of the lab's notebooks,
    and an anchor must name a heading in it."""
    found = []
    for _, src in markdown(nb):
        for target in links(src):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s):, mailto:, in-page anchors
            path, _, anchor = target.partition("#")
            dest = (directory / path).resolve()
            if not dest.exists():
                found.append(f"link to {target!r}: {path} does not exist")
                continue
            if dest.suffix == ".ipynb" and anchor:
                if _norm_anchor(anchor) not in heading_anchors(nbformat.read(dest, as_version=4)):
                    found.append(f"link to {target!r}: {dest.name} has no heading #{anchor}")
    return found


SOLUTION_CALL_RE = re.compile(r"\b(?:solution|solved|show_solution|solution_function)\s*\(")


def solved_exercises(nb: nbformat.NotebookNode) -> list[int]:
    """Code cells that run a reference solution (outside comments): an exercise that ships solved."""
    found = []
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        try:
            code = " ".join(t.string for t in tokenize.generate_tokens(io.StringIO(c.source).readline)
                            if t.type not in (tokenize.COMMENT, tokenize.STRING))
        except (tokenize.TokenError, SyntaxError):
            code = c.source
        if SOLUTION_CALL_RE.search(code):
            found.append(i)
    return found


def _next_number(path: Path) -> str | None:
    numbers = sorted(NUMBER_RE.match(p.name).group(1) for p in NOTEBOOKS if NUMBER_RE.match(p.name))
    mine = NUMBER_RE.match(path.name)
    later = [n for n in numbers if mine and n > mine.group(1)]
    return f"{int(mine.group(1)) + 1:02d}" if later else None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_opens_with_learning_goals(path):
    assert not goals_problems(nbformat.read(path, as_version=4)), f"{path.name}: {goals_problems(nbformat.read(path, as_version=4))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_closes_with_recap_and_next_link(path):
    problems = recap_problems(nbformat.read(path, as_version=4), _next_number(path))
    assert not problems, f"{path.name}: {problems}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cross_references_resolve(path):
    problems = link_problems(nbformat.read(path, as_version=4), NOTEBOOK_DIR)
    missing = [p for p in problems if re.search(r"\d\d_\w+\.ipynb does not exist$", p)]
    if problems and problems == missing and not os.environ.get("CI"):
        # a branch that holds only some notebooks; in CI (and on main) a missing notebook fails
        pytest.xfail(f"{path.name}: links to notebooks not on this branch: {missing}")
    assert not problems, f"{path.name}: {problems}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_ship_unsolved(path):
    cells = solved_exercises(nbformat.read(path, as_version=4))
    assert not cells, (f"{path.name}: code cells {cells} call a reference solution; leave a stub that raises "
                       "NotImplementedError and mention solution(name) in the text")


def test_welcome_links_every_notebook():
    welcome = nbformat.read(NOTEBOOK_DIR / "00_welcome.ipynb", as_version=4)
    targets = {Path(t.split("#")[0]).name for _, src in markdown(welcome) for t in links(src)}
    missing = [p.name for p in NOTEBOOKS if p.name not in targets]
    assert not missing, f"00_welcome.ipynb's table does not link to {missing}"


def _bound_names(source: str) -> set[str]:
    """Names a code cell binds (imports, assignments, defs); magics and shell lines are skipped."""
    import ast

    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def hint_problems(nb: nbformat.NotebookNode) -> list[str]:
    """A hint such as `print(solution("x"))` in markdown must run where the reader pastes it: after the
    exercise's code cell, so every name in it must be bound by then."""
    import ast
    import builtins

    found = []
    for i, src in markdown(nb):
        for span in re.findall(r"`([^`]*solution\([^`]*)`", src):
            try:
                call = ast.parse(span.strip(), mode="eval").body
            except SyntaxError:
                found.append(f"cell {i}: hint `{span}` is not Python")
                continue
            upto = next((j for j in range(i + 1, len(nb.cells)) if nb.cells[j].cell_type == "code"), len(nb.cells))
            bound = set().union(*(_bound_names(c.source) for c in nb.cells[:upto + 1] if c.cell_type == "code"))
            for name in sorted({n.id for n in ast.walk(call) if isinstance(n, ast.Name)} - bound - set(dir(builtins))):
                found.append(f"cell {i}: hint `{span}` uses {name!r}, which no cell up to the exercise's defines")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_solution_hints_run_where_they_are_given(path):
    problems = hint_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}: {problems}"


def _nb(*cells: tuple[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(s) if k == "md" else nbformat.v4.new_code_cell(s) for k, s in cells]
    return nb


def test_the_checks_catch_what_they_claim(tmp_path):
    good = _nb(
        ("md", "# 01 · Cluster\n\n**Learning goals**\n1. start workers"),
        ("code", "scale = None"),
        ("md", "## Recap\n\n- workers start\n\nNext: [02](02_next.ipynb#Measure-it) and [home](00_a.ipynb)"),
    )
    nbformat.write(_nb(("md", "# 02\n\n## Measure it\n")), tmp_path / "02_next.ipynb")
    nbformat.write(_nb(("md", "# 00")), tmp_path / "00_a.ipynb")
    assert goals_problems(good) == [] and recap_problems(good, "02") == [] and link_problems(good, tmp_path) == []

    no_goals = _nb(("md", "# 01\nSome intro."), ("code", "x = 1"), ("md", "Learning goals\n- late"))
    assert goals_problems(no_goals)
    no_recap = _nb(("md", "Learning goals\n- a"), ("code", "x = 1"), ("md", "## Recap\nprose only, no list"))
    assert recap_problems(no_recap, None) == ["the recap has no list"]
    assert "does not link to the next notebook" in recap_problems(good, "03")[0]
    solved = _nb(("code", "def f(c, x):\n    return solution('t')(c, x)"),
                 ("code", "# print(solution('t'))\nprint('solution(\"t\")')"))
    assert solved_exercises(solved) == [0]
    broken = _nb(("md", "See [x](09_missing.ipynb), [y](02_next.ipynb#nowhere), [w](https://example.org)"))
    found = link_problems(broken, tmp_path)
    assert len(found) == 2 and "09_missing.ipynb does not exist" in found[0] and "no heading #nowhere" in found[1]


def test_hint_check_catches_an_unbound_name():
    hint = ("md", 'Exercise. Stuck? `print(labkit.check.prune.solution("x"))`.')
    assert "'labkit'" in hint_problems(_nb(hint, ("code", "from labkit.check.prune import check_x")))[0]
    assert hint_problems(_nb(hint, ("code", "import labkit.check.prune\ncheck_x()"))) == []
    late = _nb(("md", 'Stuck? `print(solution("x"))`'), ("code", "check()"), ("code", "from m import solution"))
    assert hint_problems(late)  # bound only after the exercise's cell: too late


# Calls that can block for ever on a busy partition or an unsatisfiable request unless given a timeout.
# (a training run's .result() is not one: it is busy, and its ranks fail on their own when a peer is lost)
UNBOUNDED_WAIT_RE = re.compile(r"\b(wait_for_workers|wait_url|wait)\(([^()]*)\)")


def unbounded_waits(source: str) -> list[str]:
    """The blocking calls in ``source`` that pass no timeout."""
    return [m.group(0) for m in UNBOUNDED_WAIT_RE.finditer(source) if "timeout" not in m.group(2)]


def test_the_wait_scanner_catches_a_bare_wait():
    assert unbounded_waits("cluster.scale(4)\nclient.wait_for_workers(4)\n") == ["wait_for_workers(4)"]
    assert unbounded_waits("client.wait_for_workers(4, timeout=300)\njob.wait_url(timeout=60)") == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_wait_without_a_timeout(path):
    """A notebook never waits for workers or a job without a timeout (a busy partition would hang it)."""
    nb = nbformat.read(path, as_version=4)
    bad = [(i, w) for i, c in enumerate(nb.cells) if c.cell_type == "code" for w in unbounded_waits(c.source)]
    assert not bad, f"{path.name}: waits without a timeout (give timeout=..., e.g. cluster.scale(n, wait=True, timeout=300)): {bad}"
