"""A trained GPT as one ``.safetensors`` file: the weights, with the shape and tokenizer in its header.

The format inference servers load (no pickle: reading it runs no code). The header's metadata
holds ``format`` (``labkit.gpt``), ``config`` (``GPTConfig.to_dict`` as JSON), ``tokenizer``
(JSON, or empty) and ``sha256`` of the tensor bytes, checked on reading, so a truncated or
corrupt export is an error naming the file rather than a model with damaged weights. With
``encryption=`` the whole file is stored AES-256-GCM encrypted (``labkit.core.crypto``) and
decrypted in memory when read (``labkit serve --key-file``); it is then no longer a safetensors
file to other tools until decrypted.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from labkit.core.crypto import Encryption
from labkit.model import GPT, GPTConfig

from .files import FORMAT, TIED, Checkpoint, CheckpointError, load_model_state, read_sealed, tokenizer_json, write_atomic


def _data_sha256(blob: bytes) -> str:
    """SHA-256 of the tensor bytes of a safetensors blob (everything after its JSON header)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def export_safetensors(model: GPT, path: str | os.PathLike, tokenizer: Any = None,
                       encryption: Encryption | None = None) -> Path:
    """Write ``model`` (tied head stored once) to ``path`` atomically, with its shape and tokenizer
    (encrypted with ``encryption`` when given)."""
    model = getattr(model, "module", model)
    if not isinstance(model, GPT):
        raise TypeError(f"export_safetensors expects a labkit GPT, got {type(model).__name__}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in TIED}
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "tokenizer": tokenizer_json(tokenizer) or ""}
    meta["sha256"] = _data_sha256(save(tensors, metadata=meta))  # the tensor bytes do not depend on the header
    return write_atomic(path, save(tensors, metadata=meta), encryption=encryption)


def read_safetensors(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                     encryption: Encryption | None = None) -> Checkpoint:
    """Load an ``export_safetensors`` file as ``(model, extra)`` after checking its checksum
    (``encryption``: the key of an encrypted export, decrypted in memory)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    blob = read_sealed(path, encryption)
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8:8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (bad header); export it again") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} holds no labkit GPT (metadata format {meta.get('format')!r}); "
                              "export one with labkit.checkpoint.export_safetensors")
    if _data_sha256(blob) != meta.get("sha256"):
        raise CheckpointError(f"{path} is truncated or corrupt (checksum mismatch); export it again")
    model = GPT(GPTConfig.from_saved(json.loads(meta["config"])))
    load_model_state(model, load(blob), path)
    return Checkpoint(model.to(map_location), {"tokenizer": meta.get("tokenizer") or None, "format": "safetensors"})
