"""labkit.data: raw text -> cleaned documents -> byte-level BPE -> packed token shards.

Public names load lazily (``import labkit.data`` does not import Dask or torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ShardReader": "shards", "ShardWriter": "shards", "ShardError": "shards", "write_shards": "shards",
    "make_tiny_shards": "shards", "dtype_for_vocab": "shards", "sha256_file": "shards", "verify_shards": "shards",
    "token_counts": "shards", "rank_frequency": "shards",
    "train_bpe": "tokenizer", "save_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "show_split": "tokenizer", "bytes_per_token": "tokenizer", "compare_vocab_sizes": "tokenizer",
    "EOT": "tokenizer",
    "preprocess": "pipeline", "PreprocessReport": "pipeline",
    "DataConfig": "config", "default_shard_dir": "config",
    "StdlibSource": "sources", "HFSource": "sources", "SourceError": "sources", "list_sources": "sources",
    "MinHasher": "clean", "near_duplicates": "clean", "find_near_duplicates": "clean", "exact_duplicates": "clean",
    "make_messy_corpus": "demo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"labkit.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'labkit.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
