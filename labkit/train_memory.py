"""Memory a training rank holds, measured, beside what ``labkit.hardware.training_memory`` predicts.

``measure_memory(client, config, data_dir, workers=n)`` runs a few optimizer steps as ``n`` ranks
(the strategy ``config.strategy`` names: DDP replicas or FSDP shards) and each rank reports:

- its **model states**, counted from the tensors it holds: weights (its shards under FSDP), the
  gradients at the moment the optimizer steps (an ``optimizer`` pre-step hook; under DDP they are
  views of its all-reduce buckets, counted once), and the optimizer's ``exp_avg``/``exp_avg_sq``;
- its **step peak**: what it holds at rest (weights, optimizer state, DDP's gradient buckets) plus
  the most bytes a step allocates above that at once, from ``torch.profiler`` with
  ``profile_memory=True`` over that one step (it records every tensor allocation and free):
  activations, gradients, gathered FSDP blocks, communication buffers;
- its **activations**: what the forward pass leaves allocated for the backward (the rise from the
  step's start to the forward's end), next to the estimator's activation formula.

``memory_table`` runs DDP and FSDP on each rank count and puts the figures next to the estimate
for ZeRO-0 (DDP) and ZeRO-3 (FSDP) with the byte sizes of the run's precision, as ratios.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from labkit.core.ranks import run_ranks
from labkit.core.workers import workers_now
from labkit.core.crypto import Encryption
from labkit.data.shards import read_meta
from labkit.hardware.estimate import training_memory
from labkit.model import autocast_dtype
from labkit.train import TrainConfig, setup, train_step

MARK = "labkit-measured-step"
FORWARD = "labkit-measured-forward"


@dataclass(frozen=True)
class RankMemory:
    """What one rank held and peaked at, in bytes."""

    rank: int
    world_size: int
    strategy: str
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    step_peak_bytes: int
    activations_bytes: int
    n_params: int

    @property
    def model_states_bytes(self) -> int:
        """Weights + gradients + optimizer state: what ZeRO shards."""
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor counts its local shard; views and
    tied weights are counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.numel() > 1]  # the per-parameter "step" scalars left out


def _memory_timeline(trace: Path) -> tuple[dict[str, tuple[float, float]], list[tuple[float, int]]]:
    """The ``X`` ranges of a Chrome trace by name (start, end) and its ``[memory]`` samples (time,
    bytes allocated since profiling began), in time order."""
    events = json.loads(trace.read_text())["traceEvents"]
    ranges = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and "dur" in e}
    samples = sorted((e["ts"], int(e["args"].get("Total Allocated", 0))) for e in events if e.get("name") == "[memory]")
    return ranges, samples


def _allocated_at(samples: list[tuple[float, int]], ts: float) -> int:
    """Bytes allocated (since profiling began) at time ``ts``: the last sample at or before it."""
    before = [b for t, b in samples if t <= ts]
    return before[-1] if before else 0


def _rise_in_window(trace: Path, mark: str) -> int:
    """The most bytes allocated at once during the ``mark`` range of a trace, above what was allocated
    when the range began (the profiler counts only allocations and frees it saw)."""
    ranges, samples = _memory_timeline(trace)
    start, end = ranges[mark]
    inside = [b for t, b in samples if start <= t <= end]
    return max(0, max(inside, default=0) - _allocated_at(samples, start))


def _held_after(trace: Path, mark: str, inner: str) -> int:
    """Bytes still allocated when the ``inner`` range ends, above what was allocated when ``mark`` began."""
    ranges, samples = _memory_timeline(trace)
    return max(0, _allocated_at(samples, ranges[inner][1]) - _allocated_at(samples, ranges[mark][0]))


def _mark_forward(model: torch.nn.Module) -> list[Any]:
    """Hooks that open a profiler range when ``model``'s forward starts and close it when it ends."""
    live: list[Any] = []

    def opened(*_: Any) -> None:
        live.append(record_function(FORWARD).__enter__())

    def closed(*_: Any) -> None:
        live.pop().__exit__(None, None, None)

    return [model.register_forward_pre_hook(opened), model.register_forward_hook(closed)]


def measure_rank(config: TrainConfig, data_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
                 device: str | torch.device | None = None, encryption: Encryption | None = None) -> RankMemory:
    """Build the run, take two warm-up steps (the optimizer's state appears, DDP's buckets settle),
    then measure one step under the profiler; the process group, if any, is up. ``encryption``: the
    key of encrypted shards."""
    grads = [0]

    def count_grads(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads[0] = held_bytes(p.grad for group in optimizer.param_groups for p in group["params"])

    run = setup(config, data_dir, rank=rank, world_size=world_size, device=device, verify=False,
                encryption=encryption)
    run.optimizer.register_step_pre_hook(count_grads)
    # the optimizer's state appears in the first step; DDP rebuilds its buckets in the order the
    # gradients came at the start of the second (the profiler would count the new ones, not the frees)
    train_step(run, 0)
    train_step(run, 1)
    params = list(run.wrapped.parameters())
    optimizer = held_bytes(_optimizer_tensors(run.optimizer))
    # at rest between steps a rank holds its weights and optimizer state; DDP also keeps its gradient
    # buckets (the grads are views of them), FSDP frees its gradients after the optimizer step
    at_rest = held_bytes(params) + optimizer + (grads[0] if run.strategy.name == "ddp" else 0)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "memory.json"
        hooks = _mark_forward(run.wrapped)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function(MARK):
                train_step(run, 2)
        for h in hooks:
            h.remove()
        prof.export_chrome_trace(str(trace))
        rise, activations = _rise_in_window(trace, MARK), _held_after(trace, MARK, FORWARD)
    return RankMemory(rank=rank, world_size=world_size, strategy=run.strategy.name, weights_bytes=held_bytes(params),
                      grads_bytes=grads[0], optimizer_bytes=optimizer, step_peak_bytes=at_rest + rise,
                      activations_bytes=activations,
                      n_params=sum(p.numel() for p in params))  # a DTensor's numel is the whole one's


def _rank_measure(ctx: Any, config: TrainConfig, data_dir: str, encryption: Encryption | None) -> dict[str, Any]:
    """Runs on each Dask worker as one rank (``run_ranks``)."""
    return asdict(measure_rank(config, data_dir, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                               encryption=encryption))


def measure_memory(client: Any, config: TrainConfig, data_dir: str | os.PathLike, *, workers: int,
                   timeout: float = 120.0, encryption: Encryption | None = None) -> list[RankMemory]:
    """Each rank's memory over ``workers`` ranks of ``config.strategy`` (two steps of ``config``);
    ``encryption``: the key of encrypted shards (a key file's path travels, not the key)."""
    rows = run_ranks(client, _rank_measure, config.replace(eval_interval=0, sample_tokens=0, checkpoint_dir=None,
                                                     max_steps=max(config.max_steps, 3)),
                     str(Path(data_dir).resolve()), encryption, workers=workers, timeout=timeout)
    return [RankMemory(**r) for r in rows]


def predicted(config: TrainConfig, n_params: int, world_size: int, zero_stage: int, vocab_size: int) -> Any:
    """``training_memory`` for this run: float32 (4+4+8 bytes a parameter, 4-byte activations) unless
    the model computes in bf16 autocast (the estimator's mixed-precision defaults)."""
    mcfg = config.gpt_config(vocab_size)
    fp32 = autocast_dtype(mcfg.precision, config.device if config.device != "auto" else "cpu") is None
    sizes = dict(weight_bytes=4, grad_bytes=4, optimizer_bytes_per_param=8, activation_value_bytes=4) if fp32 else {}
    return training_memory(n_params, mcfg, zero_stage=zero_stage, dp=world_size, micro_batch=config.batch_size,
                           seq_len=mcfg.block_size, **sizes)


# a GPT of 7,319,808 parameters (vocab 512): its model states outweigh its activations at 2 sequences
MEMORY_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 384, "block_size": 64}


def memory_config(config: TrainConfig | None = None, **shape: int) -> TrainConfig:
    """The run ``memory_table`` measures: ``config`` (default settings when None) with the GPT of
    ``MEMORY_SHAPE`` (or ``shape``), 2 sequences a rank and float32, the byte sizes the estimate uses."""
    base = TrainConfig() if config is None else config
    return base.replace(**{**MEMORY_SHAPE, **shape}, batch_size=2, precision="float32")


def fresh_workers(client: Any, timeout: float = 300.0) -> None:
    """Restart every worker and wait until as many are back. Dask's own ``restart`` gives up after
    120 s; on a small machine under load (a CI run, a busy login node) new workers importing torch can
    take longer than that, so the wait for them has its own, longer timeout."""
    want = len(workers_now(client))
    client.restart(timeout=timeout, wait_for_workers=False)
    client.wait_for_workers(want, timeout=timeout)


def memory_table(client: Any, config: TrainConfig, data_dir: str | os.PathLike,
                 world_sizes: Iterable[int] = (2, 4), vocab_size: int | None = None,
                 restart: bool = True, encryption: Encryption | None = None) -> list[dict[str, Any]]:
    """DDP and FSDP on each rank count: the largest rank's model states and step peak, measured,
    beside the ZeRO-0 / ZeRO-3 estimate, and FSDP's figures as a fraction of DDP's. With ``restart``
    the workers restart before each measurement, so that nothing an earlier run left in a worker
    (tensors, caches freed before the profiler could see them) counts. ``encryption``: the key of
    encrypted shards (the vocabulary size is read from meta.json, which is never encrypted)."""
    vocab = vocab_size or int(read_meta(data_dir)[0]["vocab_size"])
    rows: list[dict[str, Any]] = []
    for n in world_sizes:
        by_strategy = {}
        for strategy, stage in (("ddp", 0), ("fsdp", 3)):
            if restart:
                fresh_workers(client)
            ranks = measure_memory(client, config.replace(strategy=strategy), data_dir, workers=n,
                                   encryption=encryption)
            worst = max(ranks, key=lambda r: r.step_peak_bytes)
            states = max(r.model_states_bytes for r in ranks)
            guess = predicted(config, worst.n_params, n, stage, vocab)
            row = {"strategy": strategy, "ranks": n, "zero_stage": stage, "n_params": worst.n_params,
                   "states_measured": states, "states_predicted": guess.model_states_bytes,
                   "states_ratio": states / guess.model_states_bytes,
                   "peak_measured": worst.step_peak_bytes, "peak_predicted": guess.total_bytes,
                   "peak_ratio": worst.step_peak_bytes / guess.total_bytes,
                   "activations_measured": worst.activations_bytes, "activations_predicted": guess.activations_bytes,
                   "activations_ratio": worst.activations_bytes / guess.activations_bytes,
                   "weights": worst.weights_bytes, "grads": worst.grads_bytes, "optimizer": worst.optimizer_bytes}
            by_strategy[strategy] = row
            rows.append(row)
        ddp, fsdp = by_strategy["ddp"], by_strategy["fsdp"]
        fsdp["states_vs_ddp"] = fsdp["states_measured"] / ddp["states_measured"]
        fsdp["peak_vs_ddp"] = fsdp["peak_measured"] / ddp["peak_measured"]
    return rows
