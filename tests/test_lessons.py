"""Lessons, not demos: every notebook ends with check questions, its diagrams are real SVG that render on
GitHub and offline, and no exercise passes before the learner has written anything."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from labkit.lab.notebooks import NOTEBOOK_DIR, list_notebooks

NOTEBOOKS = list_notebooks()
FIGURES = NOTEBOOK_DIR / "figures"
IMAGE_RE = re.compile(r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?\s*\)")
CHECK_RE = re.compile(r"^#{2,4}\s*check yourself\b", re.I | re.M)
DETAILS_RE = re.compile(r"<details>\s*<summary>[^<]+</summary>(.*?)</details>", re.S)
# Diagrams the lessons lean on (issue 17): the pipeline, ring all-reduce, DDP vs ZeRO/FSDP, attention shapes
REQUIRED = ("pipeline.svg", "ring_allreduce.svg", "ddp_vs_fsdp.svg", "attention_shapes.svg")
SVG = "{http://www.w3.org/2000/svg}"
MAX_SVG_BYTES = 30_000


def closing_markdown(nb: nbformat.NotebookNode) -> str:
    """The markdown after the last code cell."""
    last = max((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), default=-1)
    return "\n\n".join(c.source for c in nb.cells[last + 1:] if c.cell_type == "markdown")


def check_yourself_problems(nb: nbformat.NotebookNode) -> list[str]:
    """The recap must hold a 'Check yourself' part: 3 to 5 questions, each answer folded in <details>."""
    end = closing_markdown(nb)
    m = CHECK_RE.search(end)
    if not m:
        return ["no '### Check yourself' part in the recap"]
    part = end[m.end():]
    nxt = re.search(r"^#{1,4}\s", part, re.M)
    part = part[: nxt.start()] if nxt else part
    answers = DETAILS_RE.findall(part)
    found = []
    if not 3 <= len(answers) <= 5:
        found.append(f"'Check yourself' has {len(answers)} answered questions, need 3 to 5 (<details><summary>...)")
    if any(len(a.strip()) < 20 for a in answers):
        found.append("an answer in 'Check yourself' is empty or a single word; say why")
    return found


def svg_problems(path: Path) -> list[str]:
    """A diagram must be well-formed SVG with a viewBox, self-contained (no scripts, no external
    references) and small, so it renders the same on GitHub, in JupyterLab and offline."""
    data = path.read_bytes()
    found = []
    if len(data) > MAX_SVG_BYTES:
        found.append(f"{path.name}: {len(data)} bytes, over {MAX_SVG_BYTES}")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        return found + [f"{path.name}: not well-formed XML ({exc})"]
    if root.tag != f"{SVG}svg":
        found.append(f"{path.name}: the root is {root.tag}, not an SVG element in the SVG namespace")
    if not root.get("viewBox"):
        found.append(f"{path.name}: no viewBox, so it does not scale")
    tags = {el.tag.removeprefix(SVG) for el in root.iter()}
    for bad in sorted(tags & {"script", "foreignObject", "image", "iframe"}):
        found.append(f"{path.name}: has <{bad}> (GitHub strips it or it needs a file beside it)")
    for el in root.iter():
        for key, value in el.attrib.items():
            if key.endswith("href") and not value.startswith("#"):
                found.append(f"{path.name}: refers to {value!r}; keep everything inside the file")
    if "text" not in tags:
        found.append(f"{path.name}: no <text>: label the diagram")
    return found


def images(nb: nbformat.NotebookNode) -> list[str]:
    return [t for c in nb.cells if c.cell_type == "markdown" for _, t in IMAGE_RE.findall(c.source)]


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name != "00_welcome.ipynb"] or NOTEBOOKS,
                         ids=lambda p: p.stem)
def test_recap_has_check_questions(path):
    problems = check_yourself_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}: {problems}"


def test_welcome_has_check_questions_too():
    assert not check_yourself_problems(nbformat.read(NOTEBOOK_DIR / "00_welcome.ipynb", as_version=4))


@pytest.mark.parametrize("path", sorted(FIGURES.glob("*.svg")), ids=lambda p: p.stem)
def test_diagrams_are_self_contained_svg(path):
    problems = svg_problems(path)
    assert not problems, problems


def test_the_diagrams_the_lessons_need_are_drawn_and_shown():
    shown = {Path(t).name for p in NOTEBOOKS for t in images(nbformat.read(p, as_version=4))
             if t.startswith("figures/")}
    on_disk = {p.name for p in FIGURES.glob("*.svg")}
    assert set(REQUIRED) <= on_disk, f"missing diagrams: {sorted(set(REQUIRED) - on_disk)}"
    assert set(REQUIRED) <= shown, f"diagrams no notebook shows: {sorted(set(REQUIRED) - shown)}"
    assert not on_disk - shown, f"SVG files in notebooks/figures that no notebook shows: {sorted(on_disk - shown)}"
    alt = [(p.name, t) for p in NOTEBOOKS for c in nbformat.read(p, as_version=4).cells if c.cell_type == "markdown"
           for a, t in IMAGE_RE.findall(c.source) if len(a.strip()) < 10]
    assert not alt, f"images without a real alt text (a reader without the picture needs it): {alt}"


def test_the_checks_catch_what_they_claim(tmp_path):
    def nb(*md: str) -> nbformat.NotebookNode:
        book = nbformat.v4.new_notebook()
        book.cells = [nbformat.v4.new_code_cell("x = 1")] + [nbformat.v4.new_markdown_cell(s) for s in md]
        return book

    qa = "\n".join(f"{i}. Q{i}?\n   <details><summary>Answer</summary>\n\n   because of reason {i}, at length\n   </details>"
                   for i in range(1, 4))
    assert check_yourself_problems(nb("## Recap\n- a", f"### Check yourself\n{qa}\n\nNext: ...")) == []
    assert check_yourself_problems(nb("## Recap\n- a")) == ["no '### Check yourself' part in the recap"]
    two = "\n".join(qa.splitlines()[:10])
    assert "has 2 answered" in check_yourself_problems(nb(f"### Check yourself\n{two}"))[0]
    empty = "### Check yourself\n" + "\n".join("1. Q?\n<details><summary>Answer</summary>yes</details>" for _ in range(3))
    assert "empty or a single word" in check_yourself_problems(nb(empty))[0]
    # questions after the next heading do not count
    assert check_yourself_problems(nb(f"### Check yourself\n\n### What could go wrong\n{qa}"))

    good = tmp_path / "ok.svg"
    good.write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><text x="1" y="5">a</text></svg>')
    assert svg_problems(good) == []
    bad = tmp_path / "bad.svg"
    bad.write_text('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
                   '<script>alert(1)</script><image xlink:href="http://x/y.png"/></svg>')
    found = " | ".join(svg_problems(bad))
    assert "viewBox" in found and "<script>" in found and "<image>" in found and "http://x/y.png" in found
    broken = tmp_path / "broken.svg"
    broken.write_text("<svg><text>unclosed</svg>")
    assert "not well-formed" in svg_problems(broken)[0]


PREVIEWS = NOTEBOOK_DIR.parent / "docs" / "preview"
DIGEST_RE = re.compile(r'<meta name="labkit-source" content="([0-9a-f]+)">')


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_preview_is_of_the_notebook_as_it_is(path):
    """docs/preview/ holds an executed HTML copy of every notebook, made from the notebook as it is now
    (an instructor must not read a lesson that has since changed)."""
    from labkit.lab.runner import source_digest

    page = PREVIEWS / f"{path.stem}.html"
    assert page.exists(), f"no preview {page.relative_to(NOTEBOOK_DIR.parent)}: run `make previews`"
    m = DIGEST_RE.search(page.read_text(encoding="utf-8", errors="replace")[:4000])
    assert m, f"{page.name} carries no labkit-source digest: make it with `make previews`"
    assert m.group(1) == source_digest(nbformat.read(path, as_version=4)), (
        f"{page.name} was made from an older {path.name}: run `make previews` and commit docs/preview/")
    assert "Traceback" not in page.read_text(encoding="utf-8", errors="replace"), f"{page.name} shows an error"


def test_no_preview_without_its_notebook():
    stems = {p.stem for p in NOTEBOOKS}
    extra = sorted(p.name for p in PREVIEWS.glob("*.html") if p.stem not in stems)
    assert not extra, f"previews of notebooks that are gone: {extra}"
