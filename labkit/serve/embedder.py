"""Sentence embeddings for ``POST /embed`` and ``POST /v1/embeddings``: the packaged all-MiniLM-L6-v2 via
``labkit.pretrained``."""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from labkit.pretrained import embed, load_bert


class MiniLMEmbedder:
    """Loads MiniLM on first use (that call pays a few seconds) and embeds one call at a time."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        if self._model is None:
            # sdpa: serving needs no attention probabilities, so the fused kernel may run
            model, self._tokenizer = load_bert(attn_implementation="sdpa")
            self._model = model.to(self.device)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector per text (mean pooling, as sentence-transformers does)."""
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """``embed(texts)`` and how many tokens the texts are (for the usage of ``/v1/embeddings``)."""
        with self._lock, torch.inference_mode():
            self._load()
            vecs = embed(list(texts), model=self._model, tokenizer=self._tokenizer)
            ids = self._tokenizer(list(texts), truncation=True, max_length=256)["input_ids"]  # as embed() reads them
        return [[float(x) for x in row] for row in vecs], sum(len(i) for i in ids)
