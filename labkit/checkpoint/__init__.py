"""Checkpoints of labkit's GPT: the one package that knows their formats.

- ``files``: one checksummed file per checkpoint (``save``/``load``, ``FileCheckpointer``: DDP and
  single-process training, pruned models);
- ``sharded``: ``torch.distributed.checkpoint`` folders, each rank its shard, loadable on any
  number of ranks (``ShardedCheckpointer``: FSDP training);
- ``safetensors_file``: the final model as ``.safetensors`` for serving (``export_safetensors``).

``load(path)`` opens any of the three as ``(model, extra)``; ``export_safetensors`` takes a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from labkit.core.crypto import Encryption

from .files import (FORMAT, MAGIC, STEP_RE, TIED, Checkpoint, CheckpointError, FileCheckpointer, Resume,
                    latest_checkpoint, list_checkpoints, load_model_state, read_checked, read_payload, save,
                    tokenizer_json, write_checked, write_model)
from .files import load as load_file
from .safetensors_file import export_safetensors, read_safetensors
from .sharded import (SHARDED_RE, ShardedCheckpointer, default_checkpointer, list_sharded, load_sharded_model,
                      read_manifest)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         encryption: Encryption | None = None) -> Checkpoint:
    """A GPT and its ``extra`` (``extra["tokenizer"]`` the JSON) from a checkpoint file (``.pt``),
    a sharded checkpoint folder (``step_*.dcp``) or a ``.safetensors`` export; ``encryption`` is the
    key of an encrypted one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, map_location, encryption)
    if path.is_dir() and (path / "labkit.json").is_file():
        model, manifest = load_sharded_model(path, map_location, encryption)
        return Checkpoint(model, {"tokenizer": manifest.get("tokenizer"), "step": manifest["step"],
                                  "format": "sharded"})
    return load_file(path, map_location, encryption)


def verify(path: str | os.PathLike, encryption: Encryption | None = None) -> None:
    """Raise ``CheckpointError`` unless ``path`` is an intact checkpoint of any of the three formats
    (``EncryptionKeyError`` when it is encrypted and ``encryption`` is not its key)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        read_safetensors(path, encryption=encryption)
    elif path.is_dir():
        read_manifest(path, encryption=encryption)
    else:
        read_checked(path, encryption=encryption)


__all__ = ["FORMAT", "MAGIC", "STEP_RE", "SHARDED_RE", "TIED", "Checkpoint", "CheckpointError", "FileCheckpointer",
           "Resume", "ShardedCheckpointer", "default_checkpointer", "export_safetensors", "latest_checkpoint",
           "list_checkpoints", "list_sharded", "load", "load_file", "load_model_state", "load_sharded_model",
           "read_checked", "read_manifest", "read_payload", "read_safetensors", "save", "tokenizer_json", "verify",
           "write_checked", "write_model"]
