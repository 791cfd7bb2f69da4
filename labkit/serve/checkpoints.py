"""Find and load the checkpoint to serve: a path, or the newest one of a run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from labkit.checkpoint import SHARDED_RE, CheckpointError, load, verify
from labkit.core.crypto import Encryption

from .demo import demo_generator
from .engine import ByteTokenizer, ModelGenerator

CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")


class NoCheckpoint(FileNotFoundError):
    """No checkpoint where one was expected; the message says how to get one."""


class NoTokenizer(ValueError):
    """A checkpoint that carries no tokenizer and is not byte-level: its ids cannot be turned into text."""


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the ``encode(text) -> ids`` / ``decode(ids)`` interface."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def checkpoints_newest_first(run_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Checkpoints under ``run_dir`` (one folder or several, searched recursively), newest first: files
    (``.pt``, ``.safetensors``, ...) and sharded checkpoint folders (``step_*.dcp`` of an FSDP run)."""
    roots = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir)
    found = [p for root in map(Path, roots) if root.is_dir() for p in root.rglob("*")
             if not p.name.startswith(".") and ((p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
                                                or (SHARDED_RE.match(p.name) and p.is_dir()))]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_checkpoint(run_dir: str | os.PathLike | Sequence[str | os.PathLike],
                      encryption: Encryption | None = None) -> Path:
    """The most recently written checkpoint under ``run_dir`` (or several folders) that passes its checksum
    (``encryption``: the key of encrypted ones; without it an encrypted one is an ``EncryptionKeyError``)."""
    found = checkpoints_newest_first(run_dir)
    for path in found:
        try:
            verify(path, encryption)
        except CheckpointError:
            continue  # a broken or half-copied file: fall back to the one before
        return path
    where = run_dir if isinstance(run_dir, (str, os.PathLike)) else ", ".join(map(str, run_dir)) or "(no folder)"
    what = f"{len(found)} checkpoint file(s), none intact," if found else f"no checkpoint (*{', *'.join(CHECKPOINT_SUFFIXES)})"
    raise NoCheckpoint(
        f"{what} under {where}; train one first (notebook 06_distributed_training, or "
        "labkit.train.train(..., checkpoint_dir=...)), pass a checkpoint path, or use --demo for a tiny random model"
    )


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu",
                   encryption: Encryption | None = None) -> ModelGenerator:
    """A ``ModelGenerator`` for a checkpoint written by ``labkit.checkpoint.save`` (pruned or not);
    an encrypted one is decrypted in memory with ``encryption``."""
    path = Path(path)
    if path.is_dir() and not SHARDED_RE.match(path.name):
        path = newest_checkpoint(path, encryption)
    if not path.exists():
        raise NoCheckpoint(f"no checkpoint at {path}; pass an existing file, a run directory, or use --demo")
    ckpt = load(path, map_location=device, encryption=encryption)
    tok = ckpt.tokenizer()
    if tok is not None:
        tokenizer: Any = HFTokenizer(tok)
    elif ckpt.config.vocab_size == 256:
        tokenizer = ByteTokenizer()
    else:
        raise NoTokenizer(
            f"{path} carries no tokenizer and its vocabulary ({ckpt.config.vocab_size}) is not bytes (256); "
            "save it again with labkit.checkpoint.save(model, path, tokenizer=...), "
            "e.g. the tokenizer of the shards it trained on (ShardReader(shards_dir, 'train').tokenizer())"
        )
    return ModelGenerator(ckpt.model, tokenizer, device=device, name=path.name)


def pick_generator(checkpoint: str | os.PathLike | None = None,
                   run_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   device: str = "cpu") -> tuple[ModelGenerator, str]:
    """What to serve and why: ``checkpoint`` if given, else the newest intact checkpoint under
    ``run_dir`` (one folder or several), else the demo model. Returns the generator and a one-line
    description of the choice."""
    if checkpoint is not None:
        gen = load_generator(checkpoint, device=device)
        return gen, f"checkpoint {checkpoint}"
    if run_dir is not None:
        try:
            path = newest_checkpoint(run_dir)
        except NoCheckpoint:
            pass
        else:
            return load_generator(path, device=device), f"the newest checkpoint: {path}"

    where = "no checkpoint found" if run_dir is not None else "no checkpoint given"
    return demo_generator(device=device), f"{where}: the demo model (tiny GPT, random weights, byte tokens)"
