"""Sentence embeddings for ``POST /embed`` from the packaged all-MiniLM-L6-v2, loaded on first use."""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch


class MiniLMEmbedder:
    """Loads MiniLM lazily (the first /embed call pays a few seconds) and embeds one call at a time."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from labkit.pretrained import load_bert

        self._model, self._tokenizer = load_bert()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector per text."""
        from labkit.pretrained import embed

        with self._lock, torch.inference_mode():
            if self._model is None:
                self._load()
            vecs = embed(list(texts), model=self._model, tokenizer=self._tokenizer)
        return [[float(x) for x in row] for row in torch.as_tensor(vecs).float()]
