"""Train the GPT of ``labkit.model`` on token shards: in one process, or as DDP ranks on Dask workers.

One training loop serves both: ``train(config)`` runs it here as a world of one, and
``train_distributed(client, config)`` runs it as one DDP rank per Dask worker through
``labkit.ranks.run_ranks`` (per GPU on Slurm; nccl with distinct GPUs, else gloo). Both take
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
  bit for bit on CPU. They are written atomically with a checksum (``labkit.model.write_checked``)
  and the last ``keep_last`` are kept.

Metrics go out as ``labkit.events`` of kind ``train`` (per step), ``val``, ``sample`` (``when`` is
``"before"``, ``"step"`` with each validation, or ``"after"``) and ``checkpoint``: to ``sink`` when
given, else to the Dask topic on a worker.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from labkit.events import emit
from labkit.model import GPT, CheckpointError, GPTConfig, read_checked, resolve_device, write_checked

SCALES = ("tiny", "binder", "workshop", "full")
CHECKPOINT_RE = re.compile(r"^step_(\d{8})\.pt$")

# Presets per scale; user/site files override keys under ``scales: {<scale>: {train: {...}}}``.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, max_steps=30,
                 warmup_steps=5, lr=3e-3, min_lr=3e-4, eval_interval=10, eval_iters=2,
                 sample_tokens=24, checkpoint_interval=10, num_threads=1),
    "binder": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, max_steps=200,
                   warmup_steps=20, lr=1e-3, min_lr=1e-4, eval_interval=50, eval_iters=10,
                   sample_tokens=80, checkpoint_interval=100, num_threads=1),
    "workshop": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32, max_steps=2000,
                     warmup_steps=100, lr=6e-4, min_lr=6e-5, eval_interval=200, eval_iters=20,
                     sample_tokens=200, checkpoint_interval=500),
    "full": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, grad_accum=8,
                 max_steps=20000, warmup_steps=1000, lr=6e-4, min_lr=6e-5, eval_interval=1000,
                 eval_iters=50, sample_tokens=200, checkpoint_interval=1000),
}


@dataclass
class TrainConfig:
    """Model shape and optimisation settings of one run. ``batch_size`` is per rank and micro-step;
    the effective batch is ``batch_size * grad_accum * world_size`` sequences."""

    # model
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    block_size: int = 32
    dropout: float = 0.0
    bias: bool = True
    precision: str = "auto"            # auto | float32 | bfloat16 (see labkit.model)
    attention: str = "sdpa"
    # optimisation
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 30
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # 0 disables clipping
    seed: int = 1337
    # evaluation, samples, logging
    eval_interval: int = 10            # 0 disables validation
    eval_iters: int = 2
    log_interval: int = 1
    sample_tokens: int = 24            # 0 disables samples
    sample_prompt: str = "def "
    # checkpoints
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 10      # 0: only at the end (when checkpoint_dir is set)
    keep_last: int = 2
    # where
    device: str = "auto"               # auto | cpu | cuda | cuda:N (ranks get theirs from run_ranks)
    num_threads: int | None = None     # torch threads per rank on CPU; None leaves torch's choice
    scale: str | None = None           # the preset it came from (for_scale sets it): whose shards are
                                       # the default data; None = the lab's active scale

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix."""
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0 (0 = no warmup), got {self.warmup_steps}")
        if self.keep_last < 1:
            raise ValueError(f"TrainConfig.keep_last must be >= 1 (checkpoints kept), got {self.keep_last}")

    @classmethod
    def for_scale(cls, name: str | None = None, **overrides: Any) -> "TrainConfig":
        """The preset of a scale (None = the lab's active scale), with the config files' ``train``
        section and then ``overrides`` applied on top."""
        from labkit.config import load_config, unknown_fields

        lab = load_config()
        scale = lab.scale(name)
        if scale.name not in _PRESETS:
            raise ValueError(f"no training preset for scale {scale.name!r}; valid: {', '.join(_PRESETS)}")
        values = {"scale": scale.name, **_PRESETS[scale.name]}
        values.update(scale.section("train"))
        values.update(overrides)
        unknown, valid = unknown_fields(cls, values)
        if unknown:
            raise ValueError(f"unknown training settings {unknown} (scale {scale.name!r}); valid: {valid}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The ``GPTConfig`` this run trains, for a tokenizer of ``vocab_size`` ids."""
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size,
                         vocab_size=vocab_size, dropout=self.dropout, bias=self.bias, precision=self.precision,
                         attention=self.attention)

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


def open_data(data_dir: str | os.PathLike, verify: bool = True) -> tuple[Any, Any]:
    """The train and val ``ShardReader`` of a shard folder (val falls back to train when absent);
    ``verify=False`` when the run checked the shards' hashes already (``verify_shards``)."""
    from labkit.data.shards import ShardError, ShardReader

    train = ShardReader(data_dir, "train", verify=verify)
    try:
        val = ShardReader(data_dir, "val", verify=verify)
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
    from labkit.data.shards import make_tiny_shards

    make_tiny_shards(fallback)
    return fallback, True


def default_shards(scale: str | None = None, shards_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """The shards to train on when none are named: ``shards_dir``, else the scale's that
    ``03_preprocessing`` writes (``labkit.data.default_shard_dir``; None = the active scale), when
    finished; else tiny shards in ``runs_dir()/"tiny-shards"``, built now if missing.
    Returns the folder and, when it fell back to the tiny shards, a line saying so (else None)."""
    from labkit.config import runs_dir
    from labkit.data.config import default_shard_dir

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


# ------------------------------------------------------------------------------- checkpoints


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints in a folder, oldest first."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if CHECKPOINT_RE.match(p.name))


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint that passes its checksum, with its contents; broken ones are skipped."""
    for path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            return path, read_checked(path)
        except CheckpointError:
            continue
    return None


def _save_checkpoint(config: TrainConfig, model: GPT, opt: torch.optim.Optimizer, step: int, world_size: int,
                     tokenizer_json: str | None) -> Path:
    d = Path(config.checkpoint_dir)
    path = d / f"step_{step:08d}.pt"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_checked(path, {
        "format": "labkit.gpt",
        "config": model.config.to_dict(),
        "state_dict": state,
        "tokenizer": tokenizer_json,
        "extra": {"step": step, "optimizer": opt.state_dict(), "train_config": dataclasses.asdict(config),
                  "world_size": world_size},
    })
    for old in list_checkpoints(d)[:-config.keep_last]:
        old.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------- the loop


def _mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil

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


@torch.no_grad()
def _evaluate(model: GPT, val: Any, config: TrainConfig, rank: int, world: int, device: torch.device) -> float:
    model.eval()
    rows = world * config.batch_size
    total = torch.zeros((), device=device)
    for i in range(config.eval_iters):
        x, y = batch_rows(val, config.block_size, config.seed, -1 - i, rows, rank * config.batch_size,
                          (rank + 1) * config.batch_size)
        total += model(x.to(device), y.to(device))[1]
    model.train()
    loss = total / config.eval_iters
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(loss)
        loss /= world
    return float(loss)


def run_loop(config: TrainConfig, data_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
             device: torch.device | str | None = None, sink: Callable | None = None, resume: bool = False,
             should_stop: Callable[[], bool] | None = None, verify: bool = True) -> TrainResult:
    """The training loop of one rank (the process group, if any, is already up); ``verify=False``
    skips hashing the shards (the run's driver had them verified once for all ranks)."""
    t_start = time.time()
    device = resolve_device(config.device if device is None else device)
    if config.num_threads and device.type == "cpu":
        torch.set_num_threads(config.num_threads)
    distributed = world_size > 1
    train_data, val_data = open_data(data_dir, verify=verify)
    try:
        tokenizer = train_data.tokenizer()
        tokenizer_json = tokenizer.to_str()
    except Exception:
        tokenizer, tokenizer_json = None, None

    start_step, state = 0, None
    if resume:
        if not config.checkpoint_dir:
            raise ValueError("resume=True needs TrainConfig.checkpoint_dir, the folder of earlier checkpoints")
        found = latest_checkpoint(config.checkpoint_dir)
        if found is not None:
            state = found[1]
            start_step = int(state["extra"]["step"])
            old_world = int(state["extra"].get("world_size", world_size))
            old_accum = int(state["extra"]["train_config"].get("grad_accum", config.grad_accum))
            if old_world != world_size and (old_world * old_accum) % world_size == 0:
                # keep the effective batch (and so the data stream) when the number of ranks changed
                config = config.replace(grad_accum=old_world * old_accum // world_size)

    torch.manual_seed(config.seed)
    mcfg = config.model_config(train_data.vocab_size)
    model = GPT(mcfg).to(device)
    if state is not None:
        if GPTConfig.from_dict(state["config"]) != mcfg:
            raise ValueError(f"the checkpoint in {config.checkpoint_dir} is for another model shape "
                             f"({state['config']}); resume with the same model settings or a fresh folder")
        model.load_state_dict(state["state_dict"], strict=False)
    opt = make_optimizer(model, config)
    if state is not None:
        opt.load_state_dict(state["extra"]["optimizer"])
    state = None

    ddp = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    is_main = rank == 0
    samples: dict[str, str] = {}
    if is_main and tokenizer is not None and config.sample_tokens and start_step == 0:
        samples["before"] = _sample(model, tokenizer, config, device)
        emit("sample", sink, rank=rank, step=0, when="before", text=samples["before"])

    rows = world_size * config.batch_size * config.grad_accum
    tokens_per_rank_step = config.batch_size * config.grad_accum * config.block_size
    losses: list[float] = []
    val_hist: list[dict[str, float]] = []
    first_step_time = float("nan")
    timed_tokens, timed_s = 0, 0.0
    last_ckpt: str | None = None
    model.train()
    step = start_step
    for step in range(start_step, config.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in opt.param_groups:
            group["lr"] = lr
        if config.dropout > 0:
            torch.manual_seed(_mix(config.seed, rank, step))  # dropout stream, resumable without saved RNG
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            lo = (micro * world_size + rank) * config.batch_size
            x, y = batch_rows(train_data, config.block_size, config.seed, step, rows, lo, lo + config.batch_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = micro == config.grad_accum - 1
            if distributed and not last:
                with ddp.no_sync():
                    _, loss = ddp(x, y)
                    (loss / config.grad_accum).backward()
            else:
                _, loss = ddp(x, y)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                     if config.grad_clip > 0 else torch.zeros(()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        local_loss = loss_sum / config.grad_accum
        global_loss = local_loss.clone()
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(global_loss)
            global_loss /= world_size
        losses.append(float(global_loss))
        dt = time.perf_counter() - t0
        if step == start_step:
            first_step_time = time.time()
        else:
            timed_tokens += tokens_per_rank_step * world_size
            timed_s += dt
        if config.log_interval and (step % config.log_interval == 0 or step == config.max_steps - 1):
            emit("train", sink, rank=rank, step=step + 1, loss=float(local_loss), global_loss=losses[-1], lr=lr,
                 tokens_per_s=tokens_per_rank_step / dt, grad_norm=float(grad_norm), mem_mb=_mem_mb(device),
                 world_size=world_size)
        done = step + 1
        if config.eval_interval and (done % config.eval_interval == 0 or done == config.max_steps):
            vl = _evaluate(model, val_data, config, rank, world_size, device)
            val_hist.append({"step": done, "loss": vl, "ppl": math.exp(min(vl, 50.0))})
            emit("val", sink, rank=rank, step=done, val_loss=vl, ppl=val_hist[-1]["ppl"])
            if is_main and tokenizer is not None and config.sample_tokens and done < config.max_steps:
                # a sample with each validation (the last step's is "after"), seeded by (seed, step)
                key = f"step {done}"
                samples[key] = _sample(model, tokenizer, config, device, seed=_mix(config.seed, done, 0x5A))
                emit("sample", sink, rank=rank, step=done, when="step", text=samples[key])
        if config.checkpoint_dir and is_main and (
                (config.checkpoint_interval and done % config.checkpoint_interval == 0) or done == config.max_steps):
            last_ckpt = str(_save_checkpoint(config, model, opt, done, world_size, tokenizer_json))
            emit("checkpoint", sink, rank=rank, step=done, path=last_ckpt)
        if should_stop is not None and should_stop():
            raise RuntimeError(f"rank {rank} stopped at step {done}: another rank failed or was lost")

    if is_main and tokenizer is not None and config.sample_tokens:
        samples["after"] = _sample(model, tokenizer, config, device)
        emit("sample", sink, rank=rank, step=config.max_steps, when="after", text=samples["after"])
    return TrainResult(
        steps=len(losses), losses=losses, val=val_hist, samples=samples,
        tokens_per_s=timed_tokens / timed_s if timed_s else float("nan"), seconds=time.time() - t_start,
        first_step_time=first_step_time, world_size=world_size, effective_batch=config.effective_batch(world_size),
        start_step=start_step, checkpoint=last_ckpt, model=model.cpu() if is_main else None,
    )


def train(config: TrainConfig, data_dir: str | os.PathLike | None = None, sink: Callable | None = None,
          resume: bool = False) -> TrainResult:
    """Train in this process (a world of one) on the shards in ``data_dir`` (None: ``default_shards``
    of the config's scale); events go to ``sink``."""
    return run_loop(config, _data_dir(config, data_dir), sink=sink, resume=resume)


# ---------------------------------------------------------------------------------- distributed


def _rank_main(ctx: Any, config: TrainConfig, data_dir: str, resume: bool) -> TrainResult:
    """Runs on each Dask worker as one DDP rank (called by ``labkit.ranks.run_ranks``)."""
    last_check = [time.monotonic()]

    def should_stop() -> bool:  # ask the scheduler at most once a second
        if time.monotonic() - last_check[0] < 1.0:
            return False
        last_check[0] = time.monotonic()
        return ctx.aborted()

    return run_loop(config, data_dir, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                    resume=resume, should_stop=should_stop, verify=False)  # train_distributed verified them


def train_distributed(client: Any, config: TrainConfig, data_dir: str | os.PathLike | None = None, *,
                      workers: int | list[str] | None = None, resume: bool = False, backend: str = "auto",
                      timeout: float = 60.0) -> TrainResult:
    """Train with one DDP rank per Dask worker (all workers, or ``workers``); returns rank 0's result.
    ``data_dir`` None: ``default_shards`` of the config's scale (the workers must see that folder).

    Metrics go to the Dask topic ``labkit`` (follow them with ``LivePlot.attach(client)``). A failing
    rank raises ``labkit.ranks.RankError`` with its traceback; a lost worker raises ``RankLost``
    naming the rank; then ``resume=True`` continues from the last checkpoint. The shards' hashes are
    checked once per call, each file by one worker, not by every rank."""
    from labkit.data.shards import verify_shards
    from labkit.ranks import run_ranks

    data_dir = str(_data_dir(config, data_dir).resolve())
    if resume and not config.checkpoint_dir:
        raise ValueError("resume=True needs TrainConfig.checkpoint_dir, the folder of earlier checkpoints")
    if config.checkpoint_dir:
        config = config.replace(checkpoint_dir=str(Path(config.checkpoint_dir).resolve()))
    verify_shards(data_dir, client=client)
    results = run_ranks(client, _rank_main, config, data_dir, resume, workers=workers, backend=backend,
                        timeout=timeout)
    return results[0]


class TrainingRun:
    """A training run going on in a background thread, so the notebook (and its live plot) stays free.

    ``done()``, ``result(timeout=None)`` (re-raises the run's error), ``exception()``."""

    def __init__(self, target: Callable[[], TrainResult]) -> None:
        self._result: TrainResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), name="labkit-training", daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], TrainResult]) -> None:
        try:
            self._result = target()
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc

    def done(self) -> bool:
        """Whether the run has ended (finished or failed)."""
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> TrainResult:
        """Wait for the run and return its result, or raise its error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"training still running after {timeout} s; call result() again or wait longer")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The run's error, or None when it finished fine."""
        self._thread.join(timeout)
        return self._error

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error else "done")
        return f"<TrainingRun {state}>"


def start_distributed(client: Any, config: TrainConfig, data_dir: str | os.PathLike | None = None,
                      **kwargs: Any) -> TrainingRun:
    """``train_distributed`` without blocking: returns a ``TrainingRun`` at once."""
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
