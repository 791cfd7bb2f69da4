"""Single-file checkpoints of labkit's GPT: the file format, the names and the rotation.

A checkpoint is one file: a header line ``LABKIT-CKPT 1 sha256=<hex> length=<n>``, then a
``torch.save`` payload of plain types and tensors (loadable with ``weights_only=True``)::

    {"format": "labkit.gpt", "config": GPTConfig.to_dict(), "state_dict": {...}  # lm_head.weight
     "tokenizer": <tokenizers JSON or None>, "extra": {...}}                     # is tied, left out

It is written to a temporary file and renamed into place, so a process killed mid-save leaves
either the old file or none, never a bad one. With ``encryption=`` (``labkit.core.crypto``) the
whole file, header and payload, is stored AES-256-GCM encrypted; reading needs the same key, a
changed byte is a ``CheckpointError`` like any corruption, and plaintext files read as before.

- ``save(model, path, tokenizer=None, **extra)`` / ``load(path)``: one model (pruned ones too).
- ``FileCheckpointer(directory, keep_last)``: what training writes, ``step_<8 digits>.pt`` with the
  optimizer and step in ``extra``, keeping the last ``keep_last``; ``latest`` skips broken files.
  A training run takes any object with its ``save(run, step)``, ``load_latest()`` and
  ``restore(run, resume)`` (``labkit.train.run_loop``'s ``checkpointer=``); the sharded one
  (``torch.distributed.checkpoint``) is ``labkit.checkpoint.sharded.ShardedCheckpointer``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer

from labkit.core.crypto import Encryption, EncryptedWriter, IntegrityError, read_bytes
from labkit.model import GPT, GPTConfig

MAGIC = b"LABKIT-CKPT 1"
FORMAT = "labkit.gpt"
STEP_RE = re.compile(r"^step_(\d{8})\.pt$")
TIED = ("lm_head.weight",)  # tied to transformer.wte.weight: never stored twice


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a labkit checkpoint."""


# ------------------------------------------------------------------------------ checked files


def write_checked(path: str | os.PathLike, obj: Any, encryption: Encryption | None = None) -> Path:
    """Write ``obj`` (tensors and plain Python types) atomically with a SHA-256 checksum (encrypted
    with ``encryption`` when given)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    header = MAGIC + b" sha256=%s length=%d\n" % (hashlib.sha256(payload).hexdigest().encode(), len(payload))
    return write_atomic(path, header, payload, encryption=encryption)


def write_atomic(path: str | os.PathLike, *parts: bytes, encryption: Encryption | None = None) -> Path:
    """Write ``parts`` to ``path`` (sealed with ``encryption`` when given) through a temporary file
    renamed into place: a process killed mid-write leaves the old file or none, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            out = f if encryption is None else EncryptedWriter(f, encryption, close_raw=False)
            for part in parts:
                out.write(part)
            if out is not f:
                out.close()  # seals the last chunk; f stays open
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename into ``folder`` durable (where the file system allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read_sealed(path: Path, encryption: Encryption | None) -> bytes:
    """A checkpoint file's bytes, decrypted when it is encrypted; a failed check is a CheckpointError
    (a missing or wrong key an ``EncryptionKeyError``: it is not a broken file to skip)."""
    try:
        return read_bytes(path, encryption)
    except IntegrityError as exc:
        raise CheckpointError(f"{exc}; use an earlier checkpoint") from None


def read_checked(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                 encryption: Encryption | None = None) -> Any:
    """Read what ``write_checked`` wrote, after checking its length and checksum (``encryption``: the
    key of an encrypted file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    blob = memoryview(read_sealed(path, encryption))
    end = bytes(blob[:256]).find(b"\n") + 1 or min(len(blob), 256)
    header, payload = bytes(blob[:end]), blob[end:]
    parts = header.strip().split(b" ")
    if not header.startswith(MAGIC) or len(parts) != 4:
        raise CheckpointError(f"{path} is not a labkit checkpoint (bad header); save it with labkit.checkpoint.save")
    fields = dict(p.split(b"=", 1) for p in parts[2:])
    if int(fields[b"length"]) != len(payload):
        raise CheckpointError(
            f"{path} is truncated ({len(payload)} of {int(fields[b'length'])} bytes); use an earlier checkpoint"
        )
    if hashlib.sha256(payload).hexdigest().encode() != fields[b"sha256"]:
        raise CheckpointError(f"{path} is corrupt (checksum mismatch); use an earlier checkpoint")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


# ------------------------------------------------------------------------------- the payload


def tokenizer_json(tokenizer: Any) -> str | None:
    """A tokenizer as JSON text: a ``tokenizers.Tokenizer``, an object with ``to_str()``, JSON text or a path."""
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    if hasattr(tokenizer, "backend_tokenizer"):  # transformers' fast tokenizers
        return tokenizer.backend_tokenizer.to_str()
    if isinstance(tokenizer, os.PathLike) or (isinstance(tokenizer, str) and not tokenizer.lstrip().startswith("{")):
        return Path(tokenizer).read_text()
    if isinstance(tokenizer, str):
        return tokenizer
    raise TypeError(f"cannot store a tokenizer of type {type(tokenizer).__name__}; pass a tokenizers.Tokenizer, JSON or a path")


def write_model(path: str | os.PathLike, config: GPTConfig, state_dict: dict[str, torch.Tensor],
                tokenizer: Any = None, extra: dict[str, Any] | None = None, encryption: Encryption | None = None) -> Path:
    """Write one model's checkpoint (its config, its full state dict, its tokenizer, ``extra``)."""
    state = {k: v.detach().cpu() for k, v in state_dict.items() if k not in TIED}
    return write_checked(path, {"format": FORMAT, "config": config.to_dict(), "state_dict": state,
                                "tokenizer": tokenizer_json(tokenizer), "extra": dict(extra or {})}, encryption)


def read_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                 encryption: Encryption | None = None) -> dict[str, Any]:
    """The checked payload of a GPT checkpoint; ``CheckpointError`` when it holds something else."""
    obj = read_checked(path, map_location=map_location, encryption=encryption)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} holds no GPT (format {obj.get('format') if isinstance(obj, dict) else None!r})")
    return obj


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: Any = "the checkpoint") -> None:
    """Load a stored state dict into ``model`` (the tied head comes with the embedding)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in TIED]
    if missing or unexpected:
        raise CheckpointError(f"{where}: state does not fit the config (missing {missing}, unexpected {unexpected})")


class Checkpoint(NamedTuple):
    """What ``load`` returns; unpacks as ``model, extra = load(path)``."""

    model: GPT
    extra: dict[str, Any]

    @property
    def config(self) -> GPTConfig:
        """The model's shape."""
        return self.model.config

    @property
    def tokenizer_json(self) -> str | None:
        """The stored tokenizer's JSON text (None if none was saved)."""
        return self.extra.get("tokenizer")

    def tokenizer(self) -> Any:
        """The tokenizer the model was trained with, as a ``tokenizers.Tokenizer`` (None if none was saved)."""
        text = self.tokenizer_json
        if text is None:
            return None
        return Tokenizer.from_str(text)


def save(model: GPT, path: str | os.PathLike, tokenizer: Any = None, *, encryption: Encryption | None = None,
         **extra: Any) -> Path:
    """Save ``model`` with its config, its tokenizer and ``extra`` (plain types, tensors) atomically,
    encrypted with ``encryption`` when given."""
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    if not isinstance(model, GPT):
        raise TypeError(f"labkit.checkpoint.save expects a GPT, got {type(model).__name__}")
    return write_model(path, model.config, model.state_dict(), tokenizer, extra, encryption)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         encryption: Encryption | None = None) -> Checkpoint:
    """Load a checkpoint written by ``save`` or by training: ``(model, extra)``, ``extra["tokenizer"]`` the JSON."""
    obj = read_payload(path, map_location=map_location, encryption=encryption)
    model = GPT(GPTConfig.from_saved(obj["config"]))
    load_model_state(model, obj["state_dict"], path)
    model.to(map_location)
    extra = dict(obj.get("extra") or {})
    extra["tokenizer"] = obj.get("tokenizer")
    return Checkpoint(model, extra)


# ------------------------------------------------------------------------- training's files


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The training checkpoints (``step_<8 digits>.pt``) in a folder, oldest first."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if STEP_RE.match(p.name))


def latest_checkpoint(checkpoint_dir: str | os.PathLike,
                      encryption: Encryption | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint that passes its checksum, with its contents; broken ones are skipped
    (one that needs a key not given is an error, not skipped)."""
    for path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            return path, read_checked(path, encryption=encryption)
        except CheckpointError:
            continue
    return None


@dataclass
class Resume:
    """What a run resumes from: the step, and what the loop needs before it builds the model."""

    step: int
    world_size: int | None          # of the run that wrote it (None: not recorded)
    grad_accum: int | None
    model_config: dict[str, Any]
    payload: Any = None             # the checkpointer's own, for its ``restore``
    where: str = ""


@dataclass
class FileCheckpointer:
    """Training checkpoints as ``step_<step>.pt`` files in ``directory``: model, optimizer, step and
    the run's settings, written by rank 0, the last ``keep_last`` kept.

    ``run`` is the loop's ``labkit.train.Run`` (its ``strategy``, ``wrapped``, ``optimizer``,
    ``rank``, ``world_size``, ``config``, ``model_config``, ``tokenizer_json``).
    ``encryption``: write the files encrypted and read them with that key."""

    directory: str
    keep_last: int = 2
    encryption: Encryption | None = None

    def save(self, run: Any, step: int) -> str | None:
        """Write the checkpoint of ``step`` (on the rank the strategy names; None elsewhere)."""
        strategy = run.strategy
        model_state = strategy.model_state(run.wrapped)
        optimizer_state = strategy.optimizer_state(run.wrapped, run.optimizer)
        if not strategy.writes_checkpoint(run.rank):
            return None
        d = Path(self.directory)
        path = write_model(d / f"step_{step:08d}.pt", run.model_config, model_state, run.tokenizer_json, {
            "step": step, "optimizer": optimizer_state, "train_config": run.config.to_dict(),
            "world_size": run.world_size}, self.encryption)
        for old in list_checkpoints(d)[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return str(path)

    def load_latest(self) -> Resume | None:
        """The newest intact checkpoint in ``directory``, or None when there is none."""
        found = latest_checkpoint(self.directory, self.encryption)
        if found is None:
            return None
        path, obj = found
        extra = obj["extra"]
        return Resume(step=int(extra["step"]), world_size=extra.get("world_size"),
                      grad_accum=(extra.get("train_config") or {}).get("grad_accum"),
                      model_config=obj["config"], payload=obj, where=str(path))

    def restore(self, run: Any, resume: Resume) -> None:
        """Load the model and optimizer state of ``resume`` into the run (after the strategy wrapped it)."""
        run.strategy.load_model_state(run.wrapped, resume.payload["state_dict"], resume.where)
        run.strategy.load_optimizer_state(run.wrapped, run.optimizer, resume.payload["extra"]["optimizer"])
