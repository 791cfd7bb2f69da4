"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes its shard.

A checkpoint is a folder ``step_<8 digits>.dcp`` holding DCP's files (one ``__<rank>_0.distcp``
per rank that wrote, and ``.metadata``, the map from each tensor's slices to files) and
``labkit.json``, the manifest: step, world size, strategy, the run's settings, the model's shape,
the tokenizer, and the size and SHA-256 of every file. Because DCP stores where each slice of a
tensor lies, a run saved on 4 ranks loads on 2, or on 1 process without a process group: each
reader asks for the slices its own (sharded or whole) tensors cover ("resharding at load").

Atomic: the ranks write into ``.step_<step>.dcp.partial``; only when all have finished does rank
0 hash the files, write the manifest and rename the folder into place. A folder without a manifest,
or whose files do not match it, is never taken as a checkpoint (``latest`` skips it).

Encrypted (``encryption=``): DCP writes and reads through a file system whose streams seal and
open AES-256-GCM files (``labkit.core.crypto``) as they go, so no plaintext of a shard ever lands on
disk, not even in the partial folder; the manifest is encrypted too (it holds the tokenizer). The
manifest's hashes are of the files as stored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# torch.distributed.checkpoint (with DTensor and sympy) adds ~45 MiB to every process that imports it;
# it is imported where a sharded checkpoint is written or read, so DDP runs and Binder's 1.5 GB never pay it

from labkit.core.crypto import Encryption, EncryptionKeyError, IntegrityError, open_read, open_write
from labkit.model import GPT, GPTConfig

from .files import FORMAT, CheckpointError, FileCheckpointer, Resume, fsync_dir, list_checkpoints, read_sealed

SHARDED_RE = re.compile(r"^step_(\d{8})\.dcp$")
MANIFEST = "labkit.json"


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns when it runs without a process group; for a world of one that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@contextlib.contextmanager
def _corrupt_is_checkpoint_error():
    """A chunk of an encrypted file that fails its check while DCP reads is a CheckpointError, a key
    problem an EncryptionKeyError, also when DCP wraps them in its CheckpointException."""
    try:
        yield
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        inner = [f[0] if isinstance(f, tuple) else f for f in getattr(exc, "failures", {}).values()] + [exc]
        for cause in inner:
            if isinstance(cause, IntegrityError):
                raise CheckpointError(f"{cause}; use an earlier checkpoint") from None
            if isinstance(cause, EncryptionKeyError):
                raise cause from None
        raise


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _sealed_stream(path: str | os.PathLike, mode: str, *, encryption: Encryption | None) -> Any:
    """DCP's ``FileSystem.create_stream``, sealing what is written and opening what is read."""
    f = open_write(path, encryption) if "w" in mode else open_read(path, encryption)
    with f:
        yield f


def _storage(folder: str | os.PathLike, encryption: Encryption | None, write: bool) -> Any:
    """A DCP ``FileSystemWriter`` or ``FileSystemReader`` of ``folder`` whose files are encrypted."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # lazy: see the top of this module

    storage = FileSystemWriter(folder) if write else FileSystemReader(folder)
    storage.fs.create_stream = functools.partial(_sealed_stream, encryption=encryption)
    return storage


def _dcp_io(folder: str | os.PathLike, encryption: Encryption | None, write: bool) -> dict[str, Any]:
    """The keyword arguments of ``dcp.save``/``dcp.load`` for ``folder``: a plain path, or encrypted storage."""
    if encryption is None:
        return {"checkpoint_id": str(folder)}
    key = "storage_writer" if write else "storage_reader"
    return {"checkpoint_id": str(folder), key: _storage(folder, encryption, write)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file DCP wrote in ``folder`` (the manifest left out)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def list_sharded(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The finished sharded checkpoints (``step_<8 digits>.dcp`` folders) in a folder, oldest first."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if SHARDED_RE.match(p.name) and p.is_dir())


def read_manifest(folder: str | os.PathLike, verify: bool = True, encryption: Encryption | None = None) -> dict[str, Any]:
    """The manifest of a sharded checkpoint, after checking every file against it (``verify``);
    ``encryption``: the key of an encrypted checkpoint."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(read_sealed(path, encryption))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} is not a finished sharded checkpoint ({MANIFEST} unreadable: {exc}); "
                              "use an earlier checkpoint") from None
    if manifest.get("format") != FORMAT or manifest.get("layout") != "sharded":
        raise CheckpointError(f"{folder} holds no sharded GPT checkpoint (manifest format {manifest.get('format')!r})")
    if verify:
        for name, want in manifest["files"].items():
            f = folder / name
            if not f.is_file() or f.stat().st_size != want["bytes"]:
                raise CheckpointError(f"{f} is missing or truncated; use an earlier checkpoint")
            if _sha256(f) != want["sha256"]:
                raise CheckpointError(f"{f} is corrupt (checksum mismatch); use an earlier checkpoint")
    return manifest


def _states(run: Any) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name, as this rank holds them (shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict  # lazy: see top

    return {"model": get_model_state_dict(run.wrapped),
            "optim": get_optimizer_state_dict(run.wrapped, run.optimizer)}


def load_sharded_model(folder: str | os.PathLike, map_location: str | torch.device = "cpu",
                       encryption: Encryption | None = None) -> tuple[Any, dict]:
    """The whole model of a sharded checkpoint in this one process (no process group needed), and
    its manifest: for export, serving or evaluation after an FSDP run."""
    import torch.distributed.checkpoint as dcp  # lazy: see the top of this module

    manifest = read_manifest(folder, encryption=encryption)
    model = GPT(GPTConfig.from_saved(manifest["model_config"]))
    state = {"model": model.state_dict()}
    with _one_process_is_fine(), _corrupt_is_checkpoint_error():
        dcp.load(state, **_dcp_io(folder, encryption, write=False))
    model.load_state_dict(state["model"])
    return model.to(map_location), manifest


@dataclass
class ShardedCheckpointer:
    """Training checkpoints as ``step_<step>.dcp`` folders in ``directory``, written by every rank
    together (collective: all ranks call ``save`` and ``restore``); the last ``keep_last`` kept.

    ``run`` is the loop's ``labkit.train.Run`` (``wrapped``, ``optimizer``, ``rank``,
    ``world_size``, ``strategy``, ``config``, ``model_config``, ``tokenizer_json``).
    ``encryption``: every rank seals its files as DCP writes them (and the manifest), and reads with that key."""

    directory: str
    keep_last: int = 2
    encryption: Encryption | None = None

    def save(self, run: Any, step: int) -> str | None:
        """Write the checkpoint of ``step``; its folder on rank 0, None on the others."""
        import torch.distributed.checkpoint as dcp  # lazy: see the top of this module

        d = Path(self.directory)
        final, partial = d / f"step_{step:08d}.dcp", d / f".step_{step:08d}.dcp.partial"
        if run.rank == 0:  # a partial folder of an earlier crash is not mixed into this one
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        with _one_process_is_fine():
            # each rank its shard; rank 0 the metadata
            dcp.save(_states(run), **_dcp_io(partial, self.encryption, write=True))
        if run.rank == 0:
            manifest = {"format": FORMAT, "layout": "sharded", "step": step, "world_size": run.world_size,
                        "strategy": run.strategy.name, "train_config": run.config.to_dict(),
                        "model_config": run.model_config.to_dict(), "tokenizer": run.tokenizer_json,
                        "files": _files(partial)}
            with open_write(partial / MANIFEST, self.encryption) as f:
                f.write(json.dumps(manifest).encode())
            for f in partial.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            fsync_dir(d)
            for old in list_sharded(d)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()  # no rank goes on (or stops) before the checkpoint is in place
        return str(final) if run.rank == 0 else None

    def load_latest(self) -> Resume | None:
        """The newest intact sharded checkpoint in ``directory`` (broken ones skipped), or None."""
        for folder in reversed(list_sharded(self.directory)):
            try:
                m = read_manifest(folder, encryption=self.encryption)
            except CheckpointError:
                continue
            return Resume(step=int(m["step"]), world_size=m.get("world_size"),
                          grad_accum=(m.get("train_config") or {}).get("grad_accum"),
                          model_config=m["model_config"], payload=m, where=str(folder))
        return None

    def restore(self, run: Any, resume: Resume) -> None:
        """Load model and optimizer state into the run's (possibly differently) sharded tensors."""
        import torch.distributed.checkpoint as dcp  # lazy: see the top of this module
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = _states(run)  # the target layout; the optimizer's state exists after this
        with _one_process_is_fine(), _corrupt_is_checkpoint_error():
            dcp.load(state, **_dcp_io(resume.where, self.encryption, write=False))
        set_model_state_dict(run.wrapped, state["model"])
        set_optimizer_state_dict(run.wrapped, run.optimizer, state["optim"])


def default_checkpointer(directory: str, keep_last: int = 2, fmt: str = "auto", sharded: bool = False,
                         encryption: Encryption | None = None) -> Any:
    """The checkpointer ``TrainConfig.checkpoint_format`` names: ``"auto"`` is sharded for a sharded
    strategy (``sharded``) or when ``directory``'s newest checkpoint is sharded, else one file."""
    if fmt == "auto":
        newest_sharded = max((int(SHARDED_RE.match(p.name).group(1)) for p in list_sharded(directory)), default=-1)
        newest_file = max((int(p.name[5:13]) for p in list_checkpoints(directory)), default=-1)
        fmt = "sharded" if sharded or newest_sharded > newest_file else "file"
    if fmt == "file" and sharded:
        raise ValueError("an FSDP run keeps its optimizer state in shards: use checkpoint_format='sharded' "
                         "(or 'auto'), not 'file'")
    cls = ShardedCheckpointer if fmt == "sharded" else FileCheckpointer
    return cls(directory, keep_last, encryption)
