"""Find and load the checkpoint to serve: a path, or the newest one of a run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from labkit.model import load

from .engine import ByteTokenizer, ModelGenerator

CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth")


class NoCheckpoint(FileNotFoundError):
    """No checkpoint where one was expected; the message says how to get one."""


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the ``encode(text) -> ids`` / ``decode(ids)`` interface."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def newest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The most recently written checkpoint file under ``run_dir`` (searched recursively)."""
    root = Path(run_dir)
    found = [p for p in root.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()
             and not p.name.startswith(".")] if root.is_dir() else []
    if not found:
        raise NoCheckpoint(
            f"no checkpoint (*{', *'.join(CHECKPOINT_SUFFIXES)}) under {root}; train one first "
            "(notebook 06 or `labkit train`), pass a checkpoint path, or use --demo for a tiny random model"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelGenerator:
    """A ``ModelGenerator`` for a checkpoint written by ``labkit.model.save`` (pruned or not)."""
    path = Path(path)
    if path.is_dir():
        path = newest_checkpoint(path)
    if not path.is_file():
        raise NoCheckpoint(f"no checkpoint at {path}; pass an existing file, a run directory, or use --demo")
    ckpt = load(path, map_location=device)
    tok = ckpt.tokenizer()
    if tok is not None:
        tokenizer: Any = HFTokenizer(tok)
    elif ckpt.config.vocab_size == 256:
        tokenizer = ByteTokenizer()
    else:
        raise ValueError(
            f"{path} carries no tokenizer and its vocabulary ({ckpt.config.vocab_size}) is not bytes (256); "
            "save it with labkit.model.save(model, path, tokenizer=...)"
        )
    return ModelGenerator(ckpt.model, tokenizer, device=device, name=path.name)
