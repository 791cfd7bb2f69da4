"""labkit: a Jupyter lab for building large language models on HPC clusters.

Layers (imports point down only; tests/test_layout.py checks it): notebooks -> widgets -> check ->
learning modules (attention, attention_cost, model, checkpoint, strategy, train, pretrained,
semantic_search; the packages data, hardware, prune, serve) -> cluster -> core (events, ranks) and config.
``labkit.lab`` (the ``labkit`` command, doctor, notebook runner) is tooling on top, beside the
notebooks: nothing else in the package imports it.
Names below are imported lazily so that ``import labkit`` stays fast in a notebook.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    "load_config": "labkit.config:load_config",
    "get_profile": "labkit.config:get_profile",
    "get_scale": "labkit.config:get_scale",
    "run_doctor": "labkit.lab.doctor:run_doctor",
    "preprocess": "labkit.data.pipeline:preprocess",
    "GPT": "labkit.model:GPT",
    "GPTConfig": "labkit.model:GPTConfig",
    "start_server": "labkit.serve.server:start",
    "MultiHeadAttention": "labkit.attention:MultiHeadAttention",
    "load_bert": "labkit.pretrained:load_bert",
    "embed": "labkit.pretrained:embed",
    "TrainConfig": "labkit.train:TrainConfig",
    "train": "labkit.train:train",
    "train_distributed": "labkit.train:train_distributed",
    "start_cluster": "labkit.cluster:start_cluster",
    "plan_run": "labkit.hardware.estimate:plan_run",
    "inspect_cluster": "labkit.hardware.inspect:inspect_cluster",
    "measure_cluster": "labkit.hardware.measure:measure_cluster",
    "prune_heads": "labkit.prune:prune_heads",
    "prune_ffn": "labkit.prune:prune_ffn",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
