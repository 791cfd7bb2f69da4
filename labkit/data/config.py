"""Preprocessing settings per scale, and where a scale's shards live by default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from labkit.config import ScaleSettings, load_config, runs_dir

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, corpus_bytes=300_000, partition_bytes=60_000, shard_tokens=1 << 16,
                 num_perm=64, tokenizer_train_bytes=300_000, val_fraction=0.1),
    "binder": dict(vocab_size=2048, corpus_bytes=3_000_000, partition_bytes=500_000, shard_tokens=1 << 20),
    "workshop": dict(vocab_size=8192, corpus_bytes=None, partition_bytes=1_000_000, shard_tokens=1 << 22,
                     tokenizer_train_bytes=12_000_000),
    "full": dict(vocab_size=16384, corpus_bytes=None, partition_bytes=2_000_000,
                 tokenizer_train_bytes=32_000_000),
}


class DataConfig(ScaleSettings):
    """Everything that decides the output bytes (so it goes into meta.json)."""

    section = noun = "data"
    presets = _PRESETS

    vocab_size: int = 2048
    corpus_bytes: int | None = 3_000_000      # budget for the "stdlib" corpus (None = all of it)
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05  # share of bytes in val: whole documents, by content hash
    # cleaning
    nfkc: bool = True
    strip_control: bool = True
    normalise_whitespace: bool = True
    scrub_pii: bool = False
    min_chars: int = 64
    max_chars: int = 2_000_000
    max_nontext: float = 0.30
    dedup_exact: bool = True
    near_dup: bool = True
    near_dup_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.8
    num_perm: int = 128
    ngram: int = 5
    # bad-input limits
    max_file_bytes: int = 64_000_000
    max_line_bytes: int = 100_000
    text_field: str = "text"
    # execution (partitions depend on the data only, never on the number of workers)
    partition_bytes: int = 1_000_000
    shard_tokens: int = 1 << 24
    tokenizer_train_bytes: int = 4_000_000
    seed: int = 0


def repo_root() -> Path | None:
    """The labkit checkout this package runs from (has pyproject.toml), or None when installed."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "labkit").is_dir() else None


def default_shard_dir(scale: str | None = None, root: str | Path | None = None) -> Path:
    """Where notebooks keep shards of a scale: ``<runs>/shards-<scale>``.

    ``<runs>`` is ``root/runs`` when ``root`` is given, else ``labkit.config.runs_dir()``
    (``$LABKIT_RUN_DIR``, else ``runs/`` of the labkit checkout). Notebook 03 writes there and
    notebook 06 (training) reads from there.
    """
    if scale is None:
        scale = load_config().scale().name
    base = Path(root) / "runs" if root is not None else runs_dir()
    return base / f"shards-{scale}"
