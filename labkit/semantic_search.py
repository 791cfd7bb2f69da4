"""A small semantic search over the docstrings of Python's standard library, with BERT sentence embeddings.

The docstrings are collected here with ``ast`` (no import of the modules, nothing downloaded);
each is embedded by mean pooling (:func:`labkit.pretrained.embed`), and a query is answered by
cosine similarity: meaning, not shared words.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from labkit.config import ScaleSettings
from labkit.data.sources import stdlib_root
from labkit.pretrained import embed

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter", "turtledemo",
             "__pycache__", "ensurepip", "venv", "config-3"}


@dataclass(frozen=True)
class Doc:
    """One docstring: where it comes from (``module.Class.function``) and its first paragraph."""

    name: str
    text: str


class SearchConfig(ScaleSettings):
    """How many docstrings to index, per scale."""

    section = noun = "semantic_search"
    presets = {"tiny": dict(max_docs=48, per_module=3), "binder": dict(max_docs=400),
               "workshop": dict(max_docs=2000, per_module=20), "full": dict(max_docs=10000, per_module=100)}

    max_docs: int = 300
    per_module: int = 4
    min_chars: int = 40


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _candidate_files(root: Path) -> list[Path]:
    """Public top-level modules and packages of the stdlib (``json.py``, ``email/__init__.py``, ...)."""
    files = [p for p in root.glob("*.py") if not p.name.startswith("_")]
    files += [p / "__init__.py" for p in root.iterdir()
              if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith(("_", "config-"))
              and (p / "__init__.py").is_file()]
    return sorted(files)


def stdlib_docstrings(max_docs: int = 300, per_module: int = 6, min_chars: int = 40,
                      root: str | Path | None = None) -> list[Doc]:
    """Docstrings (first paragraphs) of public modules, classes and functions of the stdlib, at most
    ``per_module`` per module, from modules spread evenly over the alphabet; stable order."""
    root = Path(root) if root else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib folder {root} not found; pass root= to a folder of .py files")
    files = _candidate_files(root)
    n_files = min(len(files), max(1, 2 * -(-max_docs // per_module)))  # some modules have few docstrings
    picked = [files[round(i * (len(files) - 1) / max(1, n_files - 1))] for i in range(n_files)]
    docs: list[Doc] = []
    for path in dict.fromkeys(picked):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        nodes = [(module, tree)] + [
            (f"{module}.{n.name}", n) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")
        ]
        taken = 0
        for name, node in nodes:
            doc = ast.get_docstring(node)
            text = _first_paragraph(doc) if doc else ""
            if len(text) >= min_chars:
                docs.append(Doc(name, text))
                taken += 1
                if taken >= per_module:
                    break
    if len(docs) > max_docs:  # thin out evenly, so every part of the alphabet stays represented
        docs = [docs[round(i * (len(docs) - 1) / (max_docs - 1))] for i in range(max_docs)] if max_docs > 1 else docs[:1]
    return docs


@dataclass
class SemanticIndex:
    """Docs and their L2-normalised embeddings; :meth:`search` ranks them by cosine similarity."""

    docs: list[Doc]
    embeddings: torch.Tensor
    model: object = None
    tokenizer: object = None

    @classmethod
    def build(cls, docs: Sequence[Doc], model=None, tokenizer=None) -> "SemanticIndex":
        """Embed every doc's text (``module.name: text``) with the sentence model."""
        texts = [f"{d.name}: {d.text}" for d in docs]
        return cls(list(docs), embed(texts, model, tokenizer, max_length=64), model, tokenizer)

    def search(self, query: str, k: int = 5) -> list[tuple[float, Doc]]:
        """The ``k`` docs closest in meaning to ``query``, best first, with their cosine similarity."""
        if not self.docs:
            raise ValueError("the index is empty; build it from at least one Doc")
        q = embed([query], self.model, self.tokenizer)[0]
        scores = self.embeddings @ q
        top = scores.topk(min(k, len(self.docs)))
        return [(float(s), self.docs[i]) for s, i in zip(top.values, top.indices.tolist())]
