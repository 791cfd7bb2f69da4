"""Train the GPT of ``labkit.model`` on token shards: in one process, or as DDP ranks on Dask workers.

One training loop serves both: ``train(config)`` runs it here as a world of one, and
``train_distributed(client, config)`` runs it as one DDP rank per Dask worker through
``labkit.core.ranks.run_ranks`` (per GPU on Slurm; nccl with distinct GPUs, else gloo).

The loop (``run_loop``) is made of seams: ``setup`` builds a ``Run``; ``train_step`` does one
optimizer step and leaves its loss on the device; ``evaluate`` and ``sample`` run at their
intervals; the checkpointer (``labkit.checkpoint.FileCheckpointer`` by default) saves and restores.
How ranks share the work is the strategy's business (``labkit.strategy``: ``DDP``, ``SingleProcess``),
so another strategy or checkpoint format comes in as an argument, not as an edit of the loop.
The host waits for the device only at sync points (the first step, every ``log_interval`` steps,
validations, checkpoints, the end), where the losses of the steps since come back in one go. Both take
``data_dir=`` (a shard folder); without it they use the shards of the config's scale that
``03_preprocessing`` wrote, else tiny ones built once under ``runs_dir()/"tiny-shards"``
(``default_shards``).

What makes runs repeatable:

- **Data**: the rows of step ``s`` are drawn from a generator seeded by ``(seed, s)`` over the
  whole training stream; there are ``world_size * batch_size * grad_accum`` of them, and rank ``r``
  at micro-step ``m`` reads only its own slice ``(m * world_size + r) * batch_size ...``. So the
  data each step sees depends on the *effective batch*, not on how it is split across ranks:
  2 ranks of batch b train exactly like 1 process of batch 2b (or batch b with grad_accum=2).
- **Dropout**: reseeded per ``(seed, rank, step)``, so nothing hidden has to be saved.
- **Checkpoints** carry model, optimizer and step; resuming reproduces an uninterrupted run
  bit for bit on CPU. They are written atomically with a checksum (``labkit.checkpoint``)
  and the last ``keep_last`` are kept. Slurm's warning signal before walltime (``labkit.core.preempt``)
  makes every rank stop at the same sync point and save one (``TrainResult.stopped == "walltime"``).

Metrics go out as ``labkit.core.events`` of kind ``train`` (every ``log_interval`` steps), ``val``, ``sample`` (``when`` is
``"before"``, ``"step"`` with each validation, or ``"after"``) and ``checkpoint``: to ``sink`` when
given, else to the Dask topic on a worker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import psutil
import torch
from pydantic import Field, PlainValidator, model_validator

from labkit.checkpoint import default_checkpointer
from labkit.config import ScaleSettings, runs_dir
from labkit.core import preempt
from labkit.core.crypto import Encryption
from labkit.core.events import emit
from labkit.core.heap import keep_freed_memory, return_freed_memory
from labkit.core.memcap import Cap, is_out_of_memory, memory_cap
from labkit.core.ranks import run_ranks, select_workers
from labkit.core.shared import check_shared
from labkit.data.config import default_shard_dir
from labkit.data.shards import ShardError, ShardReader, make_tiny_shards, verify_shards
from labkit.model import GPT, GPTConfig, resolve_device
from labkit.profiling import StepProfiler, check_profile, phase
from labkit.settings import merge
from labkit.strategy import STRATEGIES, make_strategy

SCALES = ("tiny", "binder", "workshop", "full")

# Presets per scale; user/site files override keys under ``scales: {<scale>: {train: {...}}}``
# (model keys flat, e.g. ``n_layer: 4``, or nested under ``model:``).
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32), batch_size=4, max_steps=30,
                 warmup_steps=5, lr=3e-3, min_lr=3e-4, eval_interval=10, eval_iters=2,
                 sample_tokens=24, checkpoint_interval=10, num_threads=1),
    "binder": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), batch_size=16, max_steps=200,
                   warmup_steps=20, lr=1e-3, min_lr=1e-4, eval_interval=50, eval_iters=10,
                   sample_tokens=80, checkpoint_interval=100, num_threads=1),
    "workshop": dict(model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256), batch_size=32, max_steps=2000,
                     warmup_steps=100, lr=6e-4, min_lr=6e-5, eval_interval=200, eval_iters=20, log_interval=10,
                     sample_tokens=200, checkpoint_interval=500),
    "full": dict(model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), batch_size=16, grad_accum=8,
                 max_steps=20000, warmup_steps=1000, lr=6e-4, min_lr=6e-5, eval_interval=1000, log_interval=10,
                 eval_iters=50, sample_tokens=200, checkpoint_interval=1000),
}
_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(GPTConfig))
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


def _default_model() -> GPTConfig:
    """The model of a bare ``TrainConfig()``: the tiny preset's shape (its vocab comes from the data)."""
    return GPTConfig(**_PRESETS["tiny"]["model"])


def _gpt(value: Any) -> GPTConfig:
    """A ``GPTConfig``, or its dict (``to_dict``, JSON, YAML), checked by the model's own rules."""
    if isinstance(value, GPTConfig):
        return value
    if isinstance(value, dict):
        return GPTConfig.from_dict(value)
    raise ValueError(f"must be a labkit.model.GPTConfig (or its dict), not {value!r}")


class TrainConfig(ScaleSettings):
    """One run: the model it trains (``model``, a ``GPTConfig``; its ``vocab_size`` is taken from the
    shards' tokenizer) and the optimisation settings. ``batch_size`` is per rank and micro-step;
    the effective batch is ``batch_size * grad_accum * world_size`` sequences.

    ``replace`` and ``for_scale`` also take the model's fields flat: ``config.replace(n_layer=4)``."""

    section = noun = "train"
    presets = {name: {**preset, "scale": name} for name, preset in _PRESETS.items()}

    model: Annotated[GPTConfig, PlainValidator(_gpt)] = Field(default_factory=_default_model)
    # optimisation
    batch_size: Positive = 4
    grad_accum: Positive = 1
    max_steps: Positive = 30
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_lr: Annotated[float, Field(ge=0)] = 3e-4
    warmup_steps: NonNegative = 5      # 0 = no warmup
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # 0 disables clipping
    seed: int = 1337
    # evaluation, samples, logging
    eval_interval: int = 10            # 0 disables validation
    eval_iters: int = 2
    log_interval: NonNegative = 1      # a train event (and a host sync) every this many steps; 0: none
    sample_tokens: int = 24            # 0 disables samples
    sample_prompt: str = "def "
    # how the ranks share the work: auto (DDP over 2+ ranks) | single | ddp | fsdp
    strategy: str = "auto"
    # checkpoints
    checkpoint_dir: str | None = None
    checkpoint_format: str = "auto"    # auto (sharded under FSDP or when the folder has them) | file | sharded
    checkpoint_interval: int = 10      # 0: only at the end (when checkpoint_dir is set)
    keep_last: Positive = 2            # checkpoints kept
    # where
    device: str = "auto"               # auto | cpu | cuda | cuda:N (ranks get theirs from run_ranks)
    memory_cap_mb: Annotated[float, Field(gt=0)] | None = None  # each rank may allocate at most this
                                       # much more (labkit.core.memcap): a small GPU, simulated
    num_threads: int | None = None     # torch threads per rank on CPU; None leaves torch's choice
    # torch.profiler (labkit.profiling): optimizer steps (first, last), counted from 1, on these ranks;
    # one Chrome/Perfetto trace per rank in profile_dir (None: runs_dir()/"profiles")
    profile_steps: tuple[Positive, Positive] | None = None
    profile_ranks: tuple[NonNegative, ...] = (0,)
    profile_dir: str | None = None
    scale: str | None = None           # the preset it came from (for_scale sets it): whose shards are
                                       # the default data; None = the lab's active scale

    @model_validator(mode="before")
    @classmethod
    def _flat_model_keys(cls, data: Any) -> Any:
        """Model keys given flat (``n_layer=4``) change the model (a dict ``model`` changes only its keys)."""
        if not isinstance(data, dict) or not _MODEL_FIELDS & set(data):
            return data
        data = dict(data)
        flat = {k: data.pop(k) for k in list(data) if k in _MODEL_FIELDS}
        data["model"] = merge(data.get("model", _default_model()), flat)
        return data

    @model_validator(mode="after")
    def _lr_range(self) -> "TrainConfig":
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.checkpoint_format not in ("auto", "file", "sharded"):
            raise ValueError(f"checkpoint_format={self.checkpoint_format!r}; valid: auto, file, sharded")
        if self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}; lower min_lr or raise lr")
        if self.profile_steps is not None:
            first, last = self.profile_steps
            if not first <= last <= self.max_steps:
                raise ValueError(f"profile_steps={self.profile_steps} must be (first, last) with 1 <= first <= last "
                                 f"<= max_steps={self.max_steps}: choose steps within 1..{self.max_steps} (from 2 "
                                 "on, step 1 is warm-up) or raise max_steps")
        return self

    def profile_folder(self) -> Path:
        """Where the profiler's traces go: ``profile_dir``, else ``runs_dir()/"profiles"``."""
        return Path(self.profile_dir) if self.profile_dir else runs_dir() / "profiles"

    @classmethod
    def valid_keys(cls) -> list[str]:
        """The training keys and the model's (which may be given flat)."""
        return sorted(set(cls.model_fields) | _MODEL_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (the model as ``GPTConfig.to_dict``); ``TrainConfig(**d)`` reverses it."""
        return {**self.fields(), "model": self.model.to_dict()}

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The ``GPTConfig`` this run trains, for a tokenizer of ``vocab_size`` ids."""
        return dataclasses.replace(self.model, vocab_size=vocab_size)

    def effective_batch(self, world_size: int = 1) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.batch_size * self.grad_accum * world_size


@dataclass
class TrainResult:
    """What a run returns (from rank 0 in a distributed run)."""

    steps: int
    losses: list[float]                 # mean loss over all ranks, one per step of this run
    val: list[dict[str, float]]         # {"step", "loss", "ppl"}
    samples: dict[str, str]             # "before", "step <n>" at each validation, "after" training
    tokens_per_s: float                 # all ranks together, first step left out
    seconds: float
    first_step_time: float              # time.time() when the first optimizer step finished
    world_size: int
    effective_batch: int
    start_step: int = 0                 # > 0 when resumed
    checkpoint: str | None = None       # the last checkpoint written
    model: GPT | None = field(default=None, repr=False)
    host_syncs: int = 0                 # times rank 0 waited for its device to read values back
    profiles: list[dict[str, Any]] = field(default_factory=list)  # per profiled rank: its trace and
                                        # breakdown (labkit.profiling; all ranks' in a distributed run)
    stopped: str | None = None          # "walltime": Slurm's warning signal came, the ranks saved and stopped early

    @property
    def note(self) -> str:
        """A line on how the run ended: finished, or stopped early with where to resume from."""
        if self.stopped is None:
            return f"finished at step {self.start_step + self.steps}"
        saved = f"saved checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint (set checkpoint_dir)"
        return (f"stopped at step {self.start_step + self.steps} on Slurm's warning signal before walltime "
                f"({saved}); resume with train_distributed(..., resume=True) on a fresh job")


# --------------------------------------------------------------------------------- schedule


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at optimizer step ``step``: linear warmup from ~0 to ``lr`` over ``warmup_steps``,
    then cosine decay to ``min_lr`` at ``max_steps`` (and ``min_lr`` after)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return config.min_lr
    span = max(1, config.max_steps - config.warmup_steps)
    progress = (step - config.warmup_steps) / span
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: matrices and embeddings decay, biases and LayerNorm gains do not.
    Uses the fused kernel where this torch has it for the device (one pass over all parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # older torch or a device without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


# ------------------------------------------------------------------------------------- data


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so (seed, step, rank) streams never overlap."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def open_data(data_dir: str | os.PathLike, verify: bool = True,
              encryption: Encryption | None = None) -> tuple[Any, Any]:
    """The train and val ``ShardReader`` of a shard folder (val falls back to train when absent);
    ``verify=False`` when the run checked the shards' hashes already (``verify_shards``);
    ``encryption``: the key of encrypted shards."""
    train = ShardReader(data_dir, "train", verify=verify, encryption=encryption)
    try:
        val = ShardReader(data_dir, "val", verify=verify, encryption=encryption)
        if len(val) < 2:
            val = train
    except ShardError:
        val = train
    return train, val


def ensure_shards(shards_dir: str | os.PathLike | None, fallback_dir: str | os.PathLike) -> tuple[Path, bool]:
    """The shard folder to train on: ``shards_dir`` when it holds finished shards (e.g. from the
    preprocessing notebook), else tiny shards built in ``fallback_dir`` (seconds, stdlib text).
    Returns the folder and whether it was built now."""
    if shards_dir is not None and (Path(shards_dir) / "meta.json").is_file():
        return Path(shards_dir), False
    fallback = Path(fallback_dir)
    if (fallback / "meta.json").is_file():
        return fallback, False

    make_tiny_shards(fallback)
    return fallback, True


def default_shards(scale: str | None = None, shards_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """The shards to train on when none are named: ``shards_dir``, else the scale's that
    ``03_preprocessing`` writes (``labkit.data.default_shard_dir``; None = the active scale), when
    finished; else tiny shards in ``runs_dir()/"tiny-shards"``, built now if missing.
    Returns the folder and, when it fell back to the tiny shards, a line saying so (else None)."""
    wanted = Path(shards_dir) if shards_dir is not None else default_shard_dir(scale)
    found, built = ensure_shards(wanted, runs_dir() / "tiny-shards")
    if found == wanted:
        return found, None
    how = "built now" if built else "built earlier"
    return found, (f"no finished shards in {wanted} (run 03_preprocessing to make them): "
                   f"training on the tiny shards in {found} ({how})")


def _data_dir(config: TrainConfig, data_dir: str | os.PathLike | None) -> Path:
    """``data_dir``, or the default shards of the config's scale (saying so when they are the tiny ones)."""
    if data_dir is not None:
        return Path(data_dir)
    found, note = default_shards(config.scale)
    if note:
        print(note, flush=True)
    return found


def batch_rows(reader: Any, block_size: int, seed: int, step: int, rows: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[lo, hi)`` of the ``rows`` random blocks that step ``step`` draws from the whole stream."""
    n = len(reader)
    if n < block_size + 2:
        raise ValueError(f"the data has {n} tokens, fewer than block_size + 2 = {block_size + 2}: "
                         "use a smaller block_size or more data")
    g = torch.Generator().manual_seed(_mix(seed, step))
    starts = torch.randint(0, n - block_size - 1, (rows,), generator=g)[lo:hi]
    block = torch.stack([torch.from_numpy(reader.read(int(s), block_size + 1)) for s in starts])
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


# ----------------------------------------------------------------------------- one rank's run


@dataclass
class Run:
    """One rank's run once ``setup`` built it: what ``train_step``, ``evaluate``, samples and the
    checkpointer work on."""

    config: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    strategy: Any                       # labkit.strategy.SingleProcess, DDP, or one of the same shape
    checkpointer: Any | None            # labkit.checkpoint.FileCheckpointer or one of the same shape
    train_data: Any
    val_data: Any
    tokenizer: Any
    tokenizer_json: str | None
    model_config: GPTConfig
    wrapped: torch.nn.Module            # what the strategy made of the model (the model itself on one rank)
    optimizer: torch.optim.Optimizer
    start_step: int = 0
    sink: Callable | None = None
    host_syncs: int = 0                 # times the host waited for the device to read values back
    capped: Cap = field(default_factory=Cap)  # the rank's memory cap (TrainConfig.memory_cap_mb)

    def full_model(self) -> GPT | None:
        """The whole model on rank 0 (None elsewhere); every rank calls it (FSDP gathers). It goes to
        host memory, so outside the simulated device cap."""
        with self.capped.lifted():
            return self.strategy.full_model(self.wrapped, self.rank)

    @property
    def model(self) -> GPT:
        """The plain model (for evaluation, samples and the result)."""
        return self.strategy.unwrap(self.wrapped)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (it samples, and by default writes checkpoints)."""
        return self.rank == 0

    def to_host(self, tensor: torch.Tensor) -> list[float]:
        """The values of a device tensor, as floats: the one way the loop reads back (counted)."""
        self.host_syncs += 1
        return tensor.detach().reshape(-1).tolist()


@dataclass
class StepStats:
    """What one optimizer step leaves on the device: the rank's mean loss and the gradient norm."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float


def prepare_process(config: TrainConfig, device: torch.device, keep_heap: bool = False) -> None:
    """The process-wide settings a rank wants on its device. On CPU: torch's threads
    (``config.num_threads``) and, with ``keep_heap``, a heap that keeps freed memory between steps
    instead of faulting it back in every step (``labkit.core.heap``). Ranks on Dask workers keep it
    (``train_distributed``); a notebook's kernel does not (``train``): it lives on after training and
    shares Binder's memory, where a kept heap cost notebook 07 ~180 MiB (``bench.binder 07``)."""
    if device.type != "cpu":
        return
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if keep_heap and config.memory_cap_mb is None:
        # under a cap (labkit.core.memcap counts the data segment) the heap stays as glibc has it
        keep_freed_memory()


def setup(config: TrainConfig, data_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
          device: torch.device | str | None = None, sink: Callable | None = None, resume: bool = False,
          strategy: Any = None, checkpointer: Any = None, verify: bool = True,
          encryption: Encryption | None = None) -> Run:
    """Device, data, tokenizer, resume point, model, the strategy's wrap, optimizer, restored state.
    ``strategy`` None: the one ``config.strategy`` names (``labkit.strategy.make_strategy``);
    ``checkpointer`` None: ``labkit.checkpoint.default_checkpointer`` in ``config.checkpoint_dir``
    when it is set (sharded under FSDP), else none. ``encryption``: the key that reads encrypted
    shards and writes (and reads) the default checkpointer's files encrypted."""
    device = resolve_device(config.device if device is None else device)
    prepare_process(config, device)
    strategy = make_strategy(config.strategy, world_size, config.model.precision) if strategy is None else strategy
    if checkpointer is None and config.checkpoint_dir:
        checkpointer = default_checkpointer(config.checkpoint_dir, config.keep_last, config.checkpoint_format,
                                            sharded=strategy.sharded, encryption=encryption)
    train_data, val_data = open_data(data_dir, verify=verify, encryption=encryption)
    try:
        tokenizer = train_data.tokenizer()
        tokenizer_json = tokenizer.to_str()
    except Exception:
        tokenizer, tokenizer_json = None, None

    found = None
    if resume:
        if checkpointer is None:
            raise ValueError("resume=True needs TrainConfig.checkpoint_dir, the folder of earlier checkpoints "
                             "(or a checkpointer=)")
        found = checkpointer.load_latest()
        if found is not None:
            old_world = int(found.world_size or world_size)
            old_accum = int(found.grad_accum or config.grad_accum)
            if old_world != world_size and (old_world * old_accum) % world_size == 0:
                # keep the effective batch (and so the data stream) when the number of ranks changed
                config = config.replace(grad_accum=old_world * old_accum // world_size)

    torch.manual_seed(config.seed)
    mcfg = config.gpt_config(train_data.vocab_size)
    if found is not None and GPTConfig.from_saved(found.model_config) != mcfg:
        raise ValueError(f"the checkpoint {found.where} is for another model shape ({found.model_config}); "
                         "resume with the same model settings or a fresh folder")
    wrapped = strategy.wrap(GPT(mcfg).to(device), device)
    run = Run(config=config, rank=rank, world_size=world_size, device=device, strategy=strategy,
              checkpointer=checkpointer, train_data=train_data, val_data=val_data, tokenizer=tokenizer,
              tokenizer_json=tokenizer_json, model_config=mcfg, wrapped=wrapped,
              optimizer=make_optimizer(wrapped, config), sink=sink)
    if found is not None:
        checkpointer.restore(run, found)
        run.start_step = found.step
    run.wrapped.train()
    return run


def train_step(run: Run, step: int) -> StepStats:
    """One optimizer step over ``grad_accum`` micro-batches of this rank's rows; nothing is read back
    to the host (the loss and the gradient norm stay on the device)."""
    config, strategy, T = run.config, run.strategy, run.config.model.block_size
    lr = lr_at(step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if config.model.dropout > 0:
        torch.manual_seed(_mix(config.seed, run.rank, step))  # dropout stream, resumable without saved RNG
    rows = run.world_size * config.batch_size * config.grad_accum
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(config.grad_accum):
        lo = (micro * run.world_size + run.rank) * config.batch_size
        with phase("data"):  # profiler ranges (labkit.profiling), free when no profiler runs
            x, y = batch_rows(run.train_data, T, config.seed, step, rows, lo, lo + config.batch_size)
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last else strategy.no_sync(run.wrapped):
            with phase("forward"):
                _, loss = run.wrapped(x, y)
            with phase("backward"):
                (loss / config.grad_accum).backward()
        loss_sum += loss.detach()
    with phase("optimizer"):
        grad_norm = (strategy.clip_grad_norm(run.wrapped, config.grad_clip) if config.grad_clip > 0
                     else torch.zeros((), device=run.device))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=loss_sum / config.grad_accum, grad_norm=grad_norm, lr=lr)


def _mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return float("nan")


def _sample(model: GPT, tokenizer: Any, config: TrainConfig, device: torch.device, seed: int | None = None) -> str:
    """Text from ``sample_prompt``, drawn with a generator of its own (seeded by ``seed``, default
    ``config.seed``): sampling never touches the global RNG, so training stays repeatable."""
    ids = tokenizer.encode(config.sample_prompt).ids or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(config.seed if seed is None else seed)
    out = model.generate(idx, config.sample_tokens, temperature=0.8, top_k=40, generator=g)
    return tokenizer.decode(out[0].tolist())


def sample(run: Run, when: str, step: int, seed: int | None = None) -> str | None:
    """On rank 0, with a tokenizer and ``sample_tokens`` set: a sample, emitted as a ``sample`` event.
    Every rank calls it (a sharded model is gathered onto rank 0 first)."""
    if run.tokenizer is None or not run.config.sample_tokens:
        return None
    model = run.full_model()
    if model is None:
        return None
    text = _sample(model, run.tokenizer, run.config, run.device, seed=seed)
    emit("sample", run.sink, rank=run.rank, step=step, when=when, text=text)
    return text


@torch.no_grad()
def evaluate(run: Run) -> float:
    """The validation loss over ``eval_iters`` fixed batches, averaged over the ranks."""
    config, model = run.config, run.model
    model.eval()
    rows = run.world_size * config.batch_size
    lo, hi = run.rank * config.batch_size, (run.rank + 1) * config.batch_size
    total = torch.zeros((), device=run.device)
    for i in range(config.eval_iters):
        x, y = batch_rows(run.val_data, config.model.block_size, config.seed, -1 - i, rows, lo, hi)
        total += model(x.to(run.device), y.to(run.device))[1]
    model.train()
    return run.to_host(run.strategy.all_mean(total / config.eval_iters))[0]


class _Meter:
    """Per-step losses kept on the device until the next sync point, then read back in one go;
    and the time spent in training steps between sync points (validation, samples and checkpoints
    left out)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.pending: list[torch.Tensor] = []
        self.grad_norm = torch.zeros(())
        self.losses: list[float] = []            # mean over the ranks, one per step
        self.last_local = float("nan")
        self.last_grad_norm = float("nan")
        self.first_step_time = float("nan")
        self.timed_tokens, self.timed_s = 0, 0.0  # all ranks' tokens, the first step left out
        self.log_tokens, self.log_s = 0, 0.0      # this rank's, since the last train event
        self.clock = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        """Keep a step's loss on the device."""
        self.pending.append(stats.loss)
        self.grad_norm = stats.grad_norm

    def flush(self, stop: bool = False) -> bool:
        """One host sync: the losses of the steps since the last flush, over all ranks; returns whether
        any rank asked to ``stop`` (the flag rides in the same all-reduce, so all ranks agree)."""
        run = self.run
        local = torch.stack(self.pending)
        flag = torch.full((1,), float(stop), device=local.device, dtype=local.dtype)
        everyone = run.strategy.all_mean(torch.cat([local, flag]))
        values = run.to_host(torch.cat([local, everyone, self.grad_norm.reshape(1).to(local)]))
        n = len(self.pending)
        any_stop = values[2 * n] > 0
        del values[2 * n]
        first = not self.losses
        self.losses += values[n:2 * n]
        self.last_local, self.last_grad_norm = values[n - 1], values[-1]
        self.pending = []
        dt = time.perf_counter() - self.clock
        tokens = n * run.config.batch_size * run.config.grad_accum * run.config.model.block_size
        if first:  # the first step (warm-up; flushed on its own) is left out of the run's tokens/s
            self.first_step_time = time.time()
        else:
            self.timed_tokens += tokens * run.world_size
            self.timed_s += dt
        self.log_tokens += tokens
        self.log_s += dt
        return any_stop

    def restart_clock(self) -> None:
        """Start timing training steps again (after validation, samples or a checkpoint)."""
        self.clock = time.perf_counter()

    def log(self, step: int, lr: float) -> None:
        """A ``train`` event for ``step`` (values of its flush; tokens/s of this rank since the last one)."""
        run = self.run
        emit("train", run.sink, rank=run.rank, step=step, loss=self.last_local, global_loss=self.losses[-1], lr=lr,
             tokens_per_s=self.log_tokens / self.log_s if self.log_s else float("nan"),
             grad_norm=self.last_grad_norm, mem_mb=_mem_mb(run.device), world_size=run.world_size)
        self.log_tokens, self.log_s = 0, 0.0


def run_loop(config: TrainConfig, data_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
             device: torch.device | str | None = None, sink: Callable | None = None, resume: bool = False,
             should_stop: Callable[[], bool] | None = None, strategy: Any = None,
             checkpointer: Any = None, verify: bool = True, encryption: Encryption | None = None) -> TrainResult:
    """The training loop of one rank (the process group, if any, is already up): ``setup``, then
    ``train_step`` per step, with validation, samples and checkpoints at their intervals.

    The host waits for the device only at sync points: the first step, every ``log_interval``
    steps, validations, checkpoints and the last step; the losses of the steps between stay on the
    device and come back (averaged over the ranks) in one transfer. ``verify=False`` skips hashing the
    shards (the run's driver had them verified once for all ranks). With ``config.memory_cap_mb``
    the rank runs under that cap (``labkit.core.memcap``) and running out raises ``MemoryCapExceeded``."""
    cap = config.memory_cap_mb
    if cap is not None:
        # DDP and FSDP import torch._dynamo on first use; under the cap that import can fail halfway
        # (a MemoryError inside a module body) and leave a half-imported module that breaks every
        # later run in this worker. The cap is for the model's memory, so import it first.
        import torch._dynamo  # noqa: F401  # lazy: torch._dynamo (~1 s import, ~40 MiB) only under a memory cap
        return_freed_memory()  # an earlier run in this worker kept its heap: the cap must not count it
    with memory_cap(cap, resolve_device(config.device if device is None else device)) as capped:
        try:
            return _loop(config, data_dir, rank=rank, world_size=world_size, device=device, sink=sink,
                         resume=resume, should_stop=should_stop, strategy=strategy, checkpointer=checkpointer,
                         verify=verify, capped=capped, encryption=encryption)
        except Exception as exc:
            if cap is None or not is_out_of_memory(exc):
                raise
            raise MemoryCapExceeded(rank, cap, config.strategy if strategy is None else strategy.name) from exc


class MemoryCapExceeded(RuntimeError):
    """A rank needed more memory than ``TrainConfig.memory_cap_mb`` allows."""

    def __init__(self, rank: int, cap_mb: float, strategy: str) -> None:
        super().__init__(
            f"rank {rank} ran out of memory under memory_cap_mb={cap_mb:g} (strategy {strategy!r}): its model "
            "states and activations need more. Shard them with strategy='fsdp', use a smaller model or "
            "batch_size, or raise memory_cap_mb")
        self.rank, self.cap_mb, self.strategy = rank, cap_mb, strategy

    def __reduce__(self) -> tuple:
        return type(self), (self.rank, self.cap_mb, self.strategy)


def _loop(config: TrainConfig, data_dir: str | os.PathLike, *, rank: int, world_size: int,
          device: torch.device | str | None, sink: Callable | None, resume: bool,
          should_stop: Callable[[], bool] | None, strategy: Any, checkpointer: Any, verify: bool,
          capped: Cap, encryption: Encryption | None = None) -> TrainResult:
    """The body of ``run_loop``."""
    t_start = time.time()
    check_profile(config.profile_ranks, config.profile_steps, world_size)
    run = setup(config, data_dir, rank=rank, world_size=world_size, device=device, sink=sink, resume=resume,
                strategy=strategy, checkpointer=checkpointer, verify=verify, encryption=encryption)
    run.capped = capped
    config = run.config  # resume may have changed grad_accum to keep the effective batch
    samples: dict[str, str] = {}
    if run.start_step == 0 and (text := sample(run, "before", 0)) is not None:
        samples["before"] = text
    meter = _Meter(run)
    profiler = StepProfiler(config.profile_ranks, config.profile_steps, config.profile_folder(), rank, run.device,
                            sink)
    val_hist: list[dict[str, float]] = []
    last_ckpt: str | None = None
    stopped: str | None = None
    for step in range(run.start_step, config.max_steps):
        with profiler.step(step + 1):
            stats = train_step(run, step)
        meter.add(stats)
        done = step + 1
        end = done == config.max_steps
        log_due = bool(config.log_interval) and (done % config.log_interval == 0 or end or step == run.start_step)
        eval_due = bool(config.eval_interval) and (done % config.eval_interval == 0 or end)
        ckpt_due = run.checkpointer is not None and (
            (bool(config.checkpoint_interval) and done % config.checkpoint_interval == 0) or end)
        synced = log_due or eval_due or ckpt_due or end or step == run.start_step
        # Slurm's warning (labkit.core.preempt) is read at sync points only, where every rank joins the
        # same all-reduce: if any rank got it, all stop after this step and save a checkpoint together
        if synced and meter.flush(stop=preempt.requested()):
            stopped = "walltime"
            ckpt_due = run.checkpointer is not None
        if synced and log_due:
            meter.log(done, stats.lr)
        if eval_due and not stopped:
            vl = evaluate(run)
            val_hist.append({"step": done, "loss": vl, "ppl": math.exp(min(vl, 50.0))})
            emit("val", sink, rank=rank, step=done, val_loss=vl, ppl=val_hist[-1]["ppl"])
            # a sample with each validation (the last step's is "after"), seeded by (seed, step)
            if not end and (text := sample(run, "step", done, seed=_mix(config.seed, done, 0x5A))) is not None:
                samples[f"step {done}"] = text
        if ckpt_due and (path := run.checkpointer.save(run, done)) is not None:
            last_ckpt = str(path)
            emit("checkpoint", sink, rank=rank, step=done, path=last_ckpt)
        if synced:  # time training steps only, from here to the next sync point
            meter.restart_clock()
        if stopped:
            preempt.clear()
            break
        if should_stop is not None and should_stop():
            raise RuntimeError(f"rank {rank} stopped at step {done}: another rank failed or was lost")

    if not stopped and (text := sample(run, "after", config.max_steps)) is not None:
        samples["after"] = text
    final = run.full_model()  # gathered on rank 0 under FSDP
    return TrainResult(
        steps=len(meter.losses), losses=meter.losses, val=val_hist, samples=samples,
        tokens_per_s=meter.timed_tokens / meter.timed_s if meter.timed_s else float("nan"),
        seconds=time.time() - t_start, first_step_time=meter.first_step_time, world_size=world_size,
        effective_batch=config.effective_batch(world_size), start_step=run.start_step, checkpoint=last_ckpt,
        model=final.cpu() if final is not None else None, host_syncs=run.host_syncs, stopped=stopped,
        profiles=[profiler.result] if profiler.result else [],
    )


def train(config: TrainConfig, data_dir: str | os.PathLike | None = None, sink: Callable | None = None,
          resume: bool = False, *, strategy: Any = None, checkpointer: Any = None,
          encryption: Encryption | None = None) -> TrainResult:
    """Train in this process (a world of one) on the shards in ``data_dir`` (None: ``default_shards``
    of the config's scale); events go to ``sink``. ``encryption`` (``labkit.core.crypto.Encryption``)
    reads encrypted shards and writes the checkpoints encrypted."""
    return run_loop(config, _data_dir(config, data_dir), sink=sink, resume=resume, strategy=strategy,
                    checkpointer=checkpointer, encryption=encryption)


# ---------------------------------------------------------------------------------- distributed


def _rank_main(ctx: Any, config: TrainConfig, data_dir: str, resume: bool, strategy: Any = None,
               checkpointer: Any = None, encryption: Encryption | None = None) -> TrainResult:
    """Runs on each Dask worker as one rank (called by ``labkit.core.ranks.run_ranks``)."""
    last_check = [time.monotonic()]

    def should_stop() -> bool:  # ask the scheduler at most once a second
        if time.monotonic() - last_check[0] < 1.0:
            return False
        last_check[0] = time.monotonic()
        return ctx.aborted()

    prepare_process(config, resolve_device(config.device if ctx.device is None else ctx.device), keep_heap=True)
    return run_loop(config, data_dir, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                    resume=resume, should_stop=should_stop, strategy=strategy, checkpointer=checkpointer,
                    verify=False, encryption=encryption)  # train_distributed verified them


def train_distributed(client: Any, config: TrainConfig, data_dir: str | os.PathLike | None = None, *,
                      workers: int | list[str] | None = None, resume: bool = False, backend: str = "auto",
                      timeout: float = 60.0, strategy: Any = None, checkpointer: Any = None,
                      encryption: Encryption | None = None) -> TrainResult:
    """Train with one rank per Dask worker (all workers, or ``workers``); returns rank 0's result.
    ``data_dir`` None: ``default_shards`` of the config's scale (the workers must see that folder).
    ``strategy`` None: DDP over 2+ ranks (``labkit.strategy``); ``checkpointer`` None: files in
    ``config.checkpoint_dir``. Both travel to the workers, so they must pickle; so does ``encryption``
    (the key of encrypted shards and checkpoints: best a key file on shared storage, so only its path travels).

    Metrics go to the Dask topic ``labkit`` (follow them with ``LivePlot.attach(client)``). A failing
    rank raises ``labkit.core.ranks.RankError`` with its traceback; a lost worker raises ``RankLost``
    naming the rank; then ``resume=True`` continues from the last checkpoint. The shards' hashes are
    checked once per call, each file by one worker, not by every rank.

    When a worker gets Slurm's warning before walltime (the profile's ``signal``, or SIGUSR1/SIGUSR2 sent to
    the worker process), all ranks stop at the next sync point, save a checkpoint and return a result
    with ``stopped="walltime"`` (``result.note`` says where); ``resume=True`` on a fresh job continues."""
    data_dir = str(_data_dir(config, data_dir).resolve())
    if resume and not config.checkpoint_dir and checkpointer is None:
        raise ValueError("resume=True needs TrainConfig.checkpoint_dir, the folder of earlier checkpoints "
                         "(or a checkpointer=)")
    if config.checkpoint_dir:
        config = config.replace(checkpoint_dir=str(Path(config.checkpoint_dir).resolve()))
    profile_dir = None
    if config.profile_steps is not None:  # a bad rank fails here, before any worker starts
        check_profile(config.profile_ranks, config.profile_steps, len(select_workers(client, workers)))
        config = config.replace(profile_dir=str(config.profile_folder().resolve()))
        profile_dir = config.profile_dir
    # a folder under this host's /tmp does not exist on the compute nodes: say so now, naming the node
    check_shared(client, {"data_dir": data_dir, "checkpoint_dir": config.checkpoint_dir, "profile_dir": profile_dir},
                 workers=workers if isinstance(workers, list) else None, create={"checkpoint_dir", "profile_dir"})
    verify_shards(data_dir, client=client)
    client.run(preempt.install)  # each worker's main thread: Slurm's warning (or a SIGUSR1) sets the stop flag
    results = run_ranks(client, _rank_main, config, data_dir, resume, strategy, checkpointer, encryption, workers=workers,
                        backend=backend, timeout=timeout)
    results[0].profiles = [p for r in results for p in r.profiles]
    return results[0]


class TrainingRun(concurrent.futures.Future):
    """A training run going on in a background thread, so the notebook (and its live plot) stays free.

    A ``concurrent.futures.Future``: ``done()``, ``result(timeout=None)`` (re-raises the run's error,
    e.g. ``labkit.core.ranks.RankLost``), ``exception()``, ``add_done_callback``, and
    ``concurrent.futures.wait`` / ``as_completed`` work on it. It cannot be cancelled once started."""

    def __init__(self, target: Callable[[], TrainResult]) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self._thread = threading.Thread(target=self._run, args=(target,), name="labkit-training", daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], TrainResult]) -> None:
        try:
            result = target()
        except BaseException as exc:  # handed to whoever asks for the result
            self.set_exception(exc)
        else:
            self.set_result(result)

    def result(self, timeout: float | None = None) -> TrainResult:
        """Wait for the run and return its result, or raise its error."""
        try:
            return super().result(timeout)
        except concurrent.futures.TimeoutError:
            if self.done():
                raise  # the run's own error was a TimeoutError
            raise concurrent.futures.TimeoutError(
                f"training still running after {timeout} s; call result() again or wait longer") from None

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self.exception() else "done")
        return f"<TrainingRun {state}>"


def start_distributed(client: Any, config: TrainConfig, data_dir: str | os.PathLike | None = None,
                      **kwargs: Any) -> TrainingRun:
    """``train_distributed`` without blocking: returns a ``TrainingRun`` (a Future) at once."""
    return TrainingRun(lambda: train_distributed(client, config, data_dir, **kwargs))


def throughput_sweep(client: Any, config: TrainConfig, data_dir: str | os.PathLike | None, worker_counts: list[int],
                     **kwargs: Any) -> list[dict[str, float]]:
    """Train briefly on 1, 2, ... workers (``worker_counts``) and report tokens/s and speed-up for each."""
    data_dir = _data_dir(config, data_dir)  # resolved once, not per run
    rows: list[dict[str, float]] = []
    for n in worker_counts:
        res = train_distributed(client, config, data_dir, workers=n, **kwargs)
        rows.append({"workers": n, "tokens_per_s": res.tokens_per_s, "effective_batch": res.effective_batch,
                     "final_loss": res.losses[-1]})
    base = rows[0]["tokens_per_s"] / rows[0]["workers"] if rows else 1.0
    for r in rows:
        r["speedup_vs_linear"] = r["tokens_per_s"] / (base * r["workers"])
    return rows
