"""How the ranks of a training run share the work: the seam a new parallelism (e.g. FSDP) enters by.

``labkit.train.run_loop`` never names DDP. It asks its strategy to ``wrap`` the model, to skip the
gradient sync on all but the last micro-batch (``no_sync``), to average a tensor over the ranks
(``all_mean``), to clip the gradient norm, and to hand out and take back the model and optimizer
state for checkpoints. ``SingleProcess`` is a world of one; ``DDP`` is PyTorch's
DistributedDataParallel over the process group ``labkit.core.ranks.run_ranks`` set up. A sharded
strategy overrides the same methods (and brings a checkpointer of its own, see
``labkit.checkpoint``); the loop stays as it is.

Strategies are small picklable objects with no state of their own, so one built in the notebook
travels to every Dask worker with the task.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from labkit.checkpoint import load_model_state


@dataclass(frozen=True)
class SingleProcess:
    """One process, one model: nothing to wrap, nothing to reduce."""

    name: str = "single"

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the loop calls forward and backward on."""
        return model

    def unwrap(self, wrapped: torch.nn.Module) -> torch.nn.Module:
        """The plain model inside (for evaluation, samples and the result)."""
        return getattr(wrapped, "module", wrapped)

    def no_sync(self, wrapped: torch.nn.Module) -> ContextManager:
        """A context in which backward leaves the gradients local (micro-batches before the last)."""
        return contextlib.nullcontext()

    def all_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over all ranks (in place where it can); here: itself."""
        return tensor

    def clip_grad_norm(self, wrapped: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients to ``max_norm`` and return their norm before clipping (on the device)."""
        return torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)

    def model_state(self, wrapped: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full model state dict, as a checkpoint stores it."""
        return self.unwrap(wrapped).state_dict()

    def load_model_state(self, wrapped: torch.nn.Module, state: dict[str, torch.Tensor], where: Any = "") -> None:
        """Load a full model state dict (from ``model_state``) into the wrapped model."""
        load_model_state(self.unwrap(wrapped), state, where or "the checkpoint")

    def optimizer_state(self, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state, as a checkpoint stores it."""
        return optimizer.state_dict()

    def load_optimizer_state(self, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        """Load what ``optimizer_state`` gave."""
        optimizer.load_state_dict(state)

    def writes_checkpoint(self, rank: int) -> bool:
        """Whether this rank writes the (full) checkpoint file."""
        return rank == 0


@dataclass(frozen=True)
class DDP(SingleProcess):
    """Data parallel: every rank holds the whole model; gradients are averaged in backward."""

    name: str = "ddp"

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model inside ``DistributedDataParallel`` (the process group must be up)."""
        if not dist.is_initialized():
            raise RuntimeError("the DDP strategy needs a process group; run it through labkit.train.train_distributed "
                               "(or torchrun), or use SingleProcess() for a world of one")
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, wrapped: torch.nn.Module) -> ContextManager:
        """DDP's own ``no_sync``: the all-reduce waits for the last micro-batch."""
        return wrapped.no_sync()

    def all_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce and divide by the world size, in place."""
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
        return tensor


def default_strategy(world_size: int) -> SingleProcess:
    """``DDP()`` for more than one rank, else ``SingleProcess()``."""
    return DDP() if world_size > 1 else SingleProcess()
