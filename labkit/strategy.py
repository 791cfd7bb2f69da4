"""How the ranks of a training run share the work: one process, DDP replicas, or FSDP shards.

``labkit.train.run_loop`` never names DDP. It asks its strategy to ``wrap`` the model, to skip the
gradient sync on all but the last micro-batch (``no_sync``), to average a tensor over the ranks
(``all_mean``), to clip the gradient norm, and to hand out and take back the model and optimizer
state for checkpoints. ``SingleProcess`` is a world of one; ``DDP`` is PyTorch's
DistributedDataParallel over the process group ``labkit.core.ranks.run_ranks`` set up: every rank
holds the whole model, gradients are all-reduced. ``FSDP`` is PyTorch's ``fully_shard`` (FSDP2):
each rank keeps 1/world of every parameter, gradient and optimizer state; a block's full weights
are all-gathered just before its forward and backward and freed after, and gradients are
reduce-scattered, so the model states per rank shrink with the number of ranks (ZeRO stage 3).
A sharded strategy saves with ``labkit.checkpoint.ShardedCheckpointer`` (each rank its shard).

Strategies are small picklable objects with no state of their own, so one built in the notebook
travels to every Dask worker with the task.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

# torch.distributed.fsdp and .checkpoint (with DTensor and sympy) add ~45 MiB to every process that
# imports them; FSDP's methods import them when an FSDP run uses them, so DDP and Binder never pay it
from torch.nn.parallel import DistributedDataParallel

from labkit.checkpoint import load_model_state
from labkit.model import GPT, bf16_is_fast

STRATEGIES = ("auto", "single", "ddp", "fsdp")
MIXED_PRECISIONS = ("auto", "float32", "bfloat16")


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

    def full_model(self, wrapped: torch.nn.Module, rank: int) -> torch.nn.Module | None:
        """The whole model as a plain module on rank 0 (None elsewhere), for samples and the result.
        Every rank must call it (a sharded strategy gathers the weights)."""
        return self.unwrap(wrapped) if rank == 0 else None

    @property
    def sharded(self) -> bool:
        """Whether each rank holds only a shard of the model (its checkpoints are sharded too)."""
        return False


@dataclass(frozen=True)
class DDP(SingleProcess):
    """Data parallel: every rank holds the whole model; gradients are averaged in backward."""

    name: str = "ddp"

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model inside ``DistributedDataParallel`` (the process group must be up)."""
        _need_group("DDP")
        # gradients live in DDP's all-reduce buckets: no second copy of them (4 bytes per parameter)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)

    def no_sync(self, wrapped: torch.nn.Module) -> ContextManager:
        """DDP's own ``no_sync``: the all-reduce waits for the last micro-batch."""
        return wrapped.no_sync()

    def all_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce and divide by the world size, in place."""
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
        return tensor


def _need_group(name: str) -> None:
    if not dist.is_initialized():
        raise RuntimeError(f"the {name} strategy needs a process group; run it through "
                           "labkit.train.train_distributed (or torchrun), or use SingleProcess() for a world of one")


@dataclass(frozen=True)
class FSDP(SingleProcess):
    """Fully sharded data parallel (PyTorch's ``fully_shard``, FSDP2): each transformer block is one
    unit whose weights are gathered for its forward and backward, the embeddings and head are the
    root unit. ``mixed_precision``: ``"auto"`` computes in bfloat16 (gradients reduced in float32)
    where the device has fast bf16, else float32; ``reshard_after_forward=False`` keeps gathered
    weights from forward to backward (less communication, more memory: ZeRO-2 like)."""

    name: str = "fsdp"
    mixed_precision: str = "auto"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"FSDP(mixed_precision={self.mixed_precision!r}); valid: {', '.join(MIXED_PRECISIONS)}")

    def param_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype the gathered weights compute in: bf16 under mixed precision, None = float32."""
        if self.mixed_precision == "bfloat16" or (self.mixed_precision == "auto" and bf16_is_fast(device)):
            return torch.bfloat16
        return None

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Shard ``model`` in place: one FSDP unit per block (``transformer.h``), then the root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # lazy: see the top

        _need_group("FSDP")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        dtype = self.param_dtype(device)
        if self.mixed_precision == "auto":
            # each rank measured its own CPU (labkit.model.cpu_bf16_speedup): the shards' dtype must be
            # one, so bf16 only where every rank found it fast
            agreed = torch.tensor([dtype is not None], dtype=torch.int32, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            dtype = torch.bfloat16 if int(agreed.item()) else None
        policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None
                  else MixedPrecisionPolicy())
        units = getattr(getattr(model, "transformer", None), "h", [])
        for block in units:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        return model

    def no_sync(self, wrapped: torch.nn.Module) -> ContextManager:
        """Backward keeps unsharded gradients local until the last micro-batch reduce-scatters them."""
        return _gradient_sync_off(wrapped)

    all_mean = DDP.all_mean

    def clip_grad_norm(self, wrapped: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip over the sharded gradients (the norm is reduced over the ranks); a plain tensor back."""
        norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def model_state(self, wrapped: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full (gathered) state dict on rank 0's CPU; empty on the others. All ranks must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # lazy: see the top

        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, wrapped: torch.nn.Module, state: dict[str, torch.Tensor], where: Any = "") -> None:
        """Load a full state dict (each rank keeps its shard of it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # lazy: see the top

        full = dict(state)
        for tied in ("lm_head.weight",):  # stored once, under the embedding
            full.setdefault(tied, full.get("transformer.wte.weight"))
        set_model_state_dict(wrapped, full, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Refused: FSDP's optimizer state is sharded; save it with ``ShardedCheckpointer``."""
        raise TypeError("an FSDP run's optimizer state is sharded: checkpoint it with "
                        "labkit.checkpoint.ShardedCheckpointer (the default for FSDP), not FileCheckpointer")

    def full_model(self, wrapped: torch.nn.Module, rank: int) -> torch.nn.Module | None:
        """Gather the whole model into a plain ``GPT`` on rank 0 (collective; None on other ranks)."""
        state = self.model_state(wrapped)
        if rank != 0:
            return None
        plain = GPT(wrapped.config)
        load_model_state(plain, state, "the gathered FSDP model")
        return plain

    @property
    def sharded(self) -> bool:
        """FSDP ranks hold shards."""
        return True


@contextlib.contextmanager
def _gradient_sync_off(wrapped: torch.nn.Module):
    """FSDP2's switch for gradient accumulation without reduce-scatter, turned back on at exit."""
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def make_strategy(name: str, world_size: int, precision: str = "auto") -> SingleProcess:
    """The strategy ``TrainConfig.strategy`` names: ``"auto"`` is DDP over 2+ ranks, else one process.
    ``precision`` (the model's: auto, float32, bfloat16) becomes FSDP's mixed precision, so a run asked
    for in float32 computes in float32 under FSDP too, also on a CPU with fast bf16."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r}; valid: {', '.join(STRATEGIES)}")
    if name == "auto":
        return DDP() if world_size > 1 else SingleProcess()
    if name == "single":
        if world_size > 1:
            raise ValueError(f"strategy='single' runs one process, not {world_size} ranks; use 'ddp' or 'fsdp'")
        return SingleProcess()
    if world_size == 1 and name == "ddp":
        return SingleProcess()  # DDP over one rank is one process with extra work
    return DDP() if name == "ddp" else FSDP(mixed_precision=precision)


def default_strategy(world_size: int) -> SingleProcess:
    """``DDP()`` for more than one rank, else ``SingleProcess()``."""
    return make_strategy("auto", world_size)
