"""The few lines that turn single-process training into a DDP rank or an FSDP shard, as code that runs.

Notebook 06 shows these functions as diffs (``diff("single", "ddp")``) and runs them on the Dask
workers (``run_lesson``), so the lesson's code is the code that was tested, not a picture of it:

- ``train_single``: one process, the whole batch;
- ``train_ddp``: the same loop as one rank of many: each rank takes its rows of the batch and
  ``DistributedDataParallel`` averages the gradients in backward, so every rank steps to the same weights;
- ``train_fsdp``: the same again, with ``fully_shard`` on each block and the root: each rank keeps
  1/world of every weight, gathers a block's weights just before using it and frees them after.

Each returns what the proofs need: the losses, a digest of the weights a rank holds, and, for one
weight, the rank's own piece of it.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from labkit.core.ranks import RankError, run_ranks, select_workers
from labkit.model import GPT, GPTConfig

WATCHED = "transformer.h.0.attn.c_attn.weight"  # the weight whose pieces the proofs compare


@dataclass(frozen=True)
class LessonConfig:
    """A GPT small enough to train in seconds on any laptop, and its stand-in batches."""

    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 32
    batch_size: int = 8   # sequences per optimizer step, over all ranks together
    steps: int = 3
    lr: float = 1e-3
    seed: int = 0

    def model(self) -> GPT:
        """The same freshly initialised GPT in every process (the seed is fixed)."""
        torch.manual_seed(self.seed)
        return GPT(GPTConfig(vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                             n_embd=self.n_embd, block_size=self.block_size, dropout=0.0, precision="float32"))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s whole batch of (input, target) token rows; the same in every process."""
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        tokens = torch.randint(0, self.vocab_size, (self.batch_size, self.block_size + 1), generator=g)
        return tokens[:, :-1], tokens[:, 1:]


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the weights this process holds (for FSDP: its shards), in parameter order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        h.update(name.encode())
        h.update(local.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _report(model: torch.nn.Module, losses: list[float], run_losses: list[float] | None = None) -> dict[str, Any]:
    watched = dict(model.named_parameters())[WATCHED]
    local = watched.to_local() if hasattr(watched, "to_local") else watched
    return {"losses": losses, "run_losses": losses if run_losses is None else run_losses,
            "digest": weights_digest(model), "watched": local.detach().cpu().clone(),
            "watched_shape": tuple(watched.shape)}


def train_single(cfg: LessonConfig) -> dict[str, Any]:
    """One process trains on the whole batch."""
    model = cfg.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        x, y = cfg.batch(step)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return _report(model, losses)


def train_ddp(cfg: LessonConfig) -> dict[str, Any]:
    """One rank of many: its rows of each batch; DDP averages the gradients over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()  # the process group is up (torchrun, srun, run_ranks)
    model = DistributedDataParallel(cfg.model())  # copies rank 0's weights to all; all-reduces in backward
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses, run_losses = [], []
    for step in range(cfg.steps):
        x, y = cfg.batch(step)
        x, y = x[rank::world], y[rank::world]  # this rank's rows
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        run_loss = loss.detach().clone()
        dist.all_reduce(run_loss)  # the sum over the ranks, the same number on every rank
        run_losses.append(run_loss.item() / world)
    return _report(model.module, losses, run_losses)


def train_fsdp(cfg: LessonConfig) -> dict[str, Any]:
    """One shard of many: like DDP, but each rank keeps only its slice of every weight."""
    rank, world = dist.get_rank(), dist.get_world_size()  # the process group is up (torchrun, srun, run_ranks)
    model = cfg.model()
    for block in model.transformer.h:
        fully_shard(block)  # a block's weights: gathered for its forward and backward, freed after
    fully_shard(model)      # the rest (embeddings, final norm); grads are reduce-scattered to their owners
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses, run_losses = [], []
    for step in range(cfg.steps):
        x, y = cfg.batch(step)
        x, y = x[rank::world], y[rank::world]  # this rank's rows
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        run_loss = loss.detach().clone()
        dist.all_reduce(run_loss)  # the sum over the ranks, the same number on every rank
        run_losses.append(run_loss.item() / world)
    return _report(model, losses, run_losses)


VARIANTS: dict[str, Callable[[LessonConfig], dict[str, Any]]] = {
    "single": train_single, "ddp": train_ddp, "fsdp": train_fsdp}


def diff(a: str = "single", b: str = "ddp") -> str:
    """The lines that change from variant ``a``'s training function to ``b``'s, as a unified diff."""
    for name in (a, b):
        if name not in VARIANTS:
            raise ValueError(f"no lesson variant {name!r}; valid: {', '.join(VARIANTS)}")
    src = {n: inspect.getsource(VARIANTS[n]).replace(VARIANTS[n].__name__, "train", 1).splitlines() for n in (a, b)}
    return "\n".join(difflib.unified_diff(src[a], src[b], f"train_{a}", f"train_{b}", lineterm="", n=20))


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun exports
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID")     # what srun exports


def launch_view(ctx: Any) -> dict[str, Any]:
    """How this rank was launched: the values torchrun would have exported (labkit passes them to
    ``init_process_group`` instead), what the worker's environment really holds, and the backend."""
    host, port = ctx.master.rsplit(":", 1)
    return {"labkit": dict(zip(LAUNCH_VARS, (ctx.rank, ctx.local_rank, ctx.world_size, host, int(port)))),
            "env": {k: os.environ.get(k) for k in LAUNCH_VARS + SLURM_VARS}, "backend": ctx.backend}


def _lesson_rank(ctx: Any, variant: str, fields: dict[str, Any]) -> dict[str, Any]:
    return dict(VARIANTS[variant](LessonConfig(**fields)), rank=ctx.rank, world_size=ctx.world_size,
                launch=launch_view(ctx))


def run_lesson(client: Any, variant: str, cfg: LessonConfig = LessonConfig(), workers: int | None = None,
               timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run variant ``"ddp"`` or ``"fsdp"`` as one rank per Dask worker (``"single"`` here, in this
    process); each rank's report, in rank order."""
    if variant == "single":
        return [dict(train_single(cfg), rank=0, world_size=1)]
    if variant not in VARIANTS:
        raise ValueError(f"no lesson variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return run_ranks(client, _lesson_rank, variant, asdict(cfg), workers=workers, timeout=timeout)


def gather_watched(reports: list[dict[str, Any]]) -> torch.Tensor:
    """FSDP's pieces of the watched weight put back together: rank 0's rows, then rank 1's, ...
    (``fully_shard`` splits every weight along its first dimension)."""
    whole = torch.cat([r["watched"] for r in reports], dim=0)
    return whole[: reports[0]["watched_shape"][0]]  # the last piece may carry padding rows


def _late_rank(ctx: Any, late: float) -> list[float]:
    """Rank 0 enters an all-reduce; the other ranks come ``late`` seconds later, or never in time."""
    t = torch.ones(4)
    if ctx.rank == 0:
        dist.all_reduce(t)
    else:
        time.sleep(late)
    return t.tolist()


def _worker_log_level(level: int) -> int:
    """Runs on a worker: set the level of Dask's worker log; the level it had."""
    log = logging.getLogger("distributed.worker")
    old = log.level
    log.setLevel(level)
    return old


def collective_timeout(client: Any, timeout: float = 2.0) -> str:
    """Run a collective that rank 1 joins too late (``timeout`` + 0.5 s); the first line of the
    error the waiting rank 0 raises: the backend's own timeout message, naming the rank. The workers'
    own "Compute Failed" log of it (with the traceback) is held back meanwhile: the error comes back here."""
    addrs = select_workers(client, 2)
    levels = client.run(_worker_log_level, logging.CRITICAL, workers=addrs)
    try:
        run_ranks(client, _late_rank, timeout + 0.5, workers=addrs, timeout=timeout, lost_grace=0.5)
    except RankError as exc:
        return str(exc).splitlines()[0]
    finally:
        for addr, level in levels.items():
            client.run(_worker_log_level, level, workers=[addr])
    raise RuntimeError("the all-reduce did not time out although rank 1 came late")
