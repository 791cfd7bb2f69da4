"""Pruning: smaller models, what it costs in quality and what it gains in speed.

- ``magnitude`` / ``sparsity``: unstructured magnitude pruning (zeros in place) and its report.
- ``prune_heads`` / ``prune_ffn`` / ``prune_structured``: remove heads and FFN neurons; the result
  is a smaller dense GPT (or BERT) that runs faster on ordinary kernels.
- ``labkit.prune.bert``: head pruning on the pretrained MiniLM, judged by embedding cosine.
- ``labkit.prune.speed``: latency/throughput side by side, and when sparse (CSR) kernels pay.
- ``labkit.prune.evaluate`` / ``schedule`` / ``sweep``: perplexity curves, prune -> fine-tune
  schedules, and sparsity sweeps on Dask workers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .unstructured import magnitude, penalty, sparsity, hold_zeros, prunable_layers, SparsityReport
from .structured import prune_heads, prune_ffn, prune_structured, head_importance, ffn_importance, shrink, select

_LAZY = {
    "time_models": "speed", "speedups": "speed", "sparse_kernel_study": "speed", "to_sparse": "speed",
    "head_curve": "bert", "load_minilm": "bert", "prune_bert": "bert",
}

__all__ = [
    "magnitude", "penalty", "sparsity", "hold_zeros", "prunable_layers", "SparsityReport",
    "prune_heads", "prune_ffn", "prune_structured", "head_importance", "ffn_importance", "shrink", "select",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
