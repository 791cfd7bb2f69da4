"""The README and docs/ cite tests as their evidence (``test_x.py::test_name``); each cited test must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `tests/test_x.py::name`, `test_x.py::name`, or `::name` continuing the file cited last
CITATION = re.compile(r"`(?:tests/)?(test_\w+\.py)?::(\w+)`?")
FILE = re.compile(r"`(?:tests/)?(test_\w+\.py)`")


def citations(text: str) -> list[tuple[str | None, str]]:
    """(file, name) for each test cited in ``text``; a bare ``::name`` belongs to the file cited before it."""
    out, last = [], None
    for m in CITATION.finditer(text):
        last = m.group(1) or last
        out.append((last, m.group(2)))
    return out


def test_citations_are_read_with_the_file_before_them():
    text = "see `test_a.py::test_one`, `::test_two` and `tests/test_b.py::test_three`"
    assert citations(text) == [("test_a.py", "test_one"), ("test_a.py", "test_two"), ("test_b.py", "test_three")]


def test_every_cited_test_exists():
    missing, seen = [], 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for name in FILE.findall(text):
            if not (ROOT / "tests" / name).is_file():
                missing.append(f"{doc.name}: tests/{name}")
        for file, name in citations(text):
            seen += 1
            path = ROOT / "tests" / (file or "")
            source = path.read_text(encoding="utf-8") if file and path.is_file() else ""
            if not re.search(rf"^\s*(?:async )?(?:def|class) {name}\b", source, re.M):
                missing.append(f"{doc.name}: {file}::{name}")
    assert seen >= 10, "the docs cite their tests; the pattern no longer finds them"
    assert not missing, f"tests cited in the docs that do not exist (renamed or removed?): {missing}"
