"""Presets of the pruning notebook per scale, with site/user overrides from the ``prune`` section."""

from __future__ import annotations

from typing import Any

from labkit.config import ScaleSettings

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(train_steps=15, amounts=(0.0, 0.5, 0.75), val_windows=4, finetune_steps=3, rounds=2,
                 regularisation_steps=4, minilm_amounts=(0.0, 0.1, 0.3), minilm_sentences=6, minilm_draws=2,
                 latency_repeats=5, sparse_size=256, sparse_sparsities=(0.0, 0.9, 0.99)),
    "binder": dict(train_steps=60, val_windows=8, finetune_steps=8, rounds=3, regularisation_steps=15,
                   minilm_draws=8, latency_repeats=5, sparse_size=512),
    "workshop": dict(train_steps=300, amounts=(0.0, 0.2, 0.4, 0.6, 0.8), val_windows=32, finetune_steps=30, rounds=4),
    "full": dict(train_steps=2000, amounts=(0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), val_windows=128,
                 finetune_steps=200, rounds=6, latency_repeats=20),
}


class PruneConfig(ScaleSettings):
    """How big the pruning lab is: the GPT it trains, the sparsities it tries, the MiniLM study."""

    section = noun = "prune"
    presets = _PRESETS

    train_steps: int = 40                 # steps of labkit.train for the GPT that gets pruned
    amounts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    val_windows: int = 16                 # validation windows for perplexity
    finetune_steps: int = 10              # per round of prune -> fine-tune
    rounds: int = 3
    regularisation_steps: int = 20
    minilm_amounts: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    minilm_sentences: int = 24            # how many of labkit's fixed sentences judge quality
    minilm_draws: int = 16                # random directions for gradient head importance
    latency_repeats: int = 10
    sparse_size: int = 1024               # the weight matrix of the CSR study
    sparse_sparsities: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
