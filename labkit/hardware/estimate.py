"""Back-of-the-envelope estimators for sizing an LLM training run on a cluster.

Formulas (each function's docstring names its source):
- parameters of a GPT:   V·d + T·d + L·(12·d² + 13·d) + 2·d            (nanoGPT layout, tied head)
- training FLOPs:        D·(6·N + 12·L·d·T)                              (PaLM, Appendix B)
- memory per GPU:        weights 2N + grads 2N + AdamW 12N (bytes), sharded by ZeRO stage (ZeRO paper)
                         + activations s·b·d·(34 + 5·a·s/d) per layer (Korthikanti et al. 2022)
- time:                  FLOPs / (G · peak · MFU)
- ring all-reduce:       2(G−1)/G · bytes / bw + 2(G−1) · latency
- compute-optimal size:  D ≈ 20·N tokens with C ≈ 6·N·D              (Chinchilla, Hoffmann et al. 2022)
- energy:                GPU-hours · TDP · PUE                           (an estimate, not a bound)
Results are dataclasses whose field names carry the unit (``_bytes``, ``_s``, ``_kwh``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from labkit.hardware.catalog import Accelerator, Network, gpu as find_gpu, network as find_network, normalize_dtype

GB = 1e9
GiB = 2**30
# bytes per parameter under mixed-precision AdamW (ZeRO paper, Sec. 3.1): bf16/fp16 weights and grads,
# fp32 master weights + momentum + variance (K = 12).
WEIGHT_BYTES = 2
GRAD_BYTES = 2
ADAM_BYTES = 12
ZERO_STAGES = (0, 1, 2, 3)


class EstimateError(ValueError):
    """Impossible input to an estimator; the message says which value and what is allowed."""


def _positive(**values: float) -> None:
    for name, v in values.items():
        if v is None or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise EstimateError(f"{name} must be a positive number, got {v!r}")


def _count(**values: int) -> None:
    """Counts (GPUs, nodes) are whole numbers: 2.5 GPUs is a mistake to report, not to round."""
    _positive(**values)
    for name, v in values.items():
        if not float(v).is_integer():
            raise EstimateError(f"{name} must be a whole number, got {v!r}")


def human_bytes(n: float) -> str:
    """``1.5e9`` -> ``'1.50 GB'`` (decimal units, as datasheets use)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class GPTConfig:
    """A GPT (nanoGPT layout: learned positions, GELU MLP of 4·d, biases, LM head tied to the embedding)."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 50304
    block_size: int = 1024
    n_kv_head: int | None = None   # grouped-query attention: KV heads (None = n_head)

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise EstimateError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            ok = [h for h in range(1, min(self.n_embd, 256) + 1) if self.n_embd % h == 0]
            raise EstimateError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: each head gets n_embd/n_head "
                f"dimensions. Valid n_head for this n_embd: {', '.join(map(str, ok[-12:]))}"
            )
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            ok = [k for k in range(1, self.n_head + 1) if self.n_head % k == 0]
            raise EstimateError(
                f"n_kv_head={self.n_kv_head} must be positive and divide n_head={self.n_head} (each KV head "
                f"serves n_head/n_kv_head query heads). Valid n_kv_head for this n_head: {', '.join(map(str, ok))}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str) -> "GPTConfig":
        """A named configuration: one of ``GPT_PRESETS``."""
        if name not in GPT_PRESETS:
            raise EstimateError(f"unknown GPT preset {name!r}; valid presets: {', '.join(GPT_PRESETS)}")
        return cls(**GPT_PRESETS[name])


GPT_PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560, vocab_size=50257, block_size=2048),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096, vocab_size=50257, block_size=2048),
    "gpt3-13b": dict(n_layer=40, n_head=40, n_embd=5120, vocab_size=50257, block_size=2048),
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, vocab_size=50257, block_size=2048),
}


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a GPT, by part (unit: parameters)."""

    embedding: int        # token + position embeddings (the LM head is tied to the token embedding)
    per_layer: int
    n_layer: int
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.per_layer * self.n_layer + self.final_norm

    @property
    def non_embedding(self) -> int:
        """What Kaplan et al. call N: everything but the embeddings."""
        return self.per_layer * self.n_layer + self.final_norm


def count_params(cfg: GPTConfig) -> ParamCount:
    """Exact parameter count of a nanoGPT-layout GPT: per layer 12·d² + 13·d (attention 4d²+4d,
    MLP 8d²+5d, two LayerNorms 4d), plus V·d + T·d embeddings and a final LayerNorm."""
    d = cfg.n_embd
    kv = (cfg.n_kv_head or cfg.n_head) * cfg.head_dim
    attn = d * (d + 2 * kv) + (d + 2 * kv) + d * d + d       # qkv projection + output projection, with biases
    mlp = d * 4 * d + 4 * d + 4 * d * d + d
    norms = 2 * 2 * d
    return ParamCount(
        embedding=cfg.vocab_size * d + cfg.block_size * d,
        per_layer=attn + mlp + norms,
        n_layer=cfg.n_layer,
        final_norm=2 * d,
    )


# ---------------------------------------------------------------------------------------------- compute

@dataclass(frozen=True)
class TrainingFlops:
    """Training compute (unit: FLOP) = tokens × (6·N dense + 12·L·d·T attention) (PaLM, App. B)."""

    n_params: float
    n_tokens: float
    dense_flops: float
    attention_flops: float

    @property
    def flops(self) -> float:
        return self.dense_flops + self.attention_flops

    @property
    def flops_per_token(self) -> float:
        return self.flops / self.n_tokens


def training_flops(
    n_params: float, n_tokens: float, cfg: GPTConfig | None = None, *, seq_len: int | None = None
) -> TrainingFlops:
    """Training FLOPs: 6·N·D for the weight matmuls (2 forward + 4 backward per parameter per token),
    plus 12·L·d·T·D for attention scores and values when ``cfg`` is given (PaLM, Chowdhery et al. 2022)."""
    _positive(n_params=n_params, n_tokens=n_tokens)
    attention = 0.0
    if cfg is not None:
        t = seq_len or cfg.block_size
        _positive(seq_len=t)
        attention = 12.0 * cfg.n_layer * cfg.n_embd * t * n_tokens
    return TrainingFlops(n_params, n_tokens, 6.0 * n_params * n_tokens, attention)


@dataclass(frozen=True)
class TrainingEstimate:
    """How long a run takes: ``flops`` (FLOP), ``seconds``, ``gpu_hours``, ``days`` (wall clock)."""

    flops: float
    gpu: str
    dtype: str
    n_gpus: int
    mfu: float
    peak_flops_per_gpu: float

    @property
    def sustained_flops(self) -> float:
        """FLOP/s the whole job sustains: G · peak · MFU."""
        return self.n_gpus * self.peak_flops_per_gpu * self.mfu

    @property
    def seconds(self) -> float:
        return self.flops / self.sustained_flops

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.n_gpus / 3600

    @property
    def days(self) -> float:
        return self.seconds / 86400

    def __str__(self) -> str:
        return (f"{self.flops:.3g} FLOP on {self.n_gpus} x {self.gpu} ({self.dtype}) at MFU {self.mfu:.0%}: "
                f"{self.days:.3g} days, {self.gpu_hours:.4g} GPU-hours")


def estimate_training(
    n_params: float,
    n_tokens: float,
    gpu: str | Accelerator,
    n_gpus: int,
    mfu: float = 0.4,
    *,
    dtype: str = "auto",
    cfg: GPTConfig | None = None,
) -> TrainingEstimate:
    """Time to train: FLOPs / (G · peak(dtype) · MFU). MFU (model FLOPs utilisation) of 0.3-0.5 is what
    well-tuned large runs report; ``cfg`` adds the attention term to the FLOPs."""
    _count(n_gpus=n_gpus)
    if not 0 < mfu <= 1:
        raise EstimateError(f"mfu must be in (0, 1], got {mfu!r} (0.3-0.5 is typical of large runs)")
    acc = find_gpu(gpu)
    fl = training_flops(n_params, n_tokens, cfg)
    dtype = acc.training_dtype if dtype == "auto" else normalize_dtype(dtype)
    return TrainingEstimate(fl.flops, acc.name, dtype, int(n_gpus), float(mfu), acc.peak_flops(dtype))


CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: compute-optimal D/N is about 20


@dataclass(frozen=True)
class ComputeOptimal:
    """A compute-optimal run: ``n_params`` and ``n_tokens`` with D = tokens_per_param · N and C = 6·N·D FLOPs."""

    n_params: float
    n_tokens: float
    tokens_per_param: float

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params * self.n_tokens


def compute_optimal(*, n_params: float | None = None, flops: float | None = None,
                    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> ComputeOptimal:
    """Chinchilla's rule (Hoffmann et al. 2022): from ``n_params`` (D = k·N) or a ``flops`` budget
    (C = 6·N·D = 6·k·N², so N = sqrt(C / 6k)); give exactly one of the two."""
    if (n_params is None) == (flops is None):
        raise EstimateError("give exactly one of n_params= or flops=")
    _positive(tokens_per_param=tokens_per_param)
    if flops is not None:
        _positive(flops=flops)
        n_params = math.sqrt(flops / (6.0 * tokens_per_param))
    _positive(n_params=n_params)
    return ComputeOptimal(float(n_params), tokens_per_param * float(n_params), float(tokens_per_param))


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of a GPipe/1F1B pipeline of ``stages`` stages and ``micro_batches`` micro-batches: (p−1)/(m+p−1)."""
    _count(stages=stages, micro_batches=micro_batches)
    return (stages - 1) / (micro_batches + stages - 1)


# ---------------------------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per GPU for training, by part; ``fits`` compares with ``gpu_memory_bytes`` when a GPU is given."""

    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    zero_stage: int
    dp: int
    gpu_memory_bytes: float | None = None

    @property
    def model_states_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> float:
        return self.model_states_bytes + self.activations_bytes

    @property
    def fits(self) -> bool | None:
        """True/False against the GPU's memory (no headroom for fragmentation or CUDA context); None without a GPU."""
        return None if self.gpu_memory_bytes is None else self.total_bytes <= self.gpu_memory_bytes

    def parts(self) -> dict[str, float]:
        return {"weights": self.weights_bytes, "gradients": self.grads_bytes,
                "optimizer": self.optimizer_bytes, "activations": self.activations_bytes}

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.parts().items())
        fit = "" if self.fits is None else (" - fits" if self.fits else f" - does NOT fit in {human_bytes(self.gpu_memory_bytes)}")
        return f"{human_bytes(self.total_bytes)} per GPU (ZeRO-{self.zero_stage}, dp={self.dp}: {parts}){fit}"


def activation_bytes(
    cfg: GPTConfig, *, micro_batch: int = 1, seq_len: int | None = None,
    checkpointing: bool = False, flash_attention: bool = False, value_bytes: float = 2,
) -> float:
    """Activation memory of one micro-batch (16-bit activations; ``value_bytes=4`` for float32), after Korthikanti et al. 2022:
    s·b·d·(34 + 5·a·s/d) bytes per layer; FlashAttention does not store the a·s² scores (drops 5·a·s/d).
    With full checkpointing only each layer's input (2·s·b·d) is kept, plus one layer recomputed at a time.
    The fp32 logits of the loss (4·s·b·V) are added in both cases."""
    s = seq_len or cfg.block_size
    _positive(micro_batch=micro_batch, seq_len=s)
    b, d, a = micro_batch, cfg.n_embd, cfg.n_head
    per_layer = s * b * d * (34 + (0 if flash_attention else 5 * a * s / d)) * value_bytes / 2
    logits = 4.0 * s * b * cfg.vocab_size
    if checkpointing:
        return cfg.n_layer * value_bytes * s * b * d + per_layer + logits
    return cfg.n_layer * per_layer + logits


def training_memory(
    n_params: float,
    cfg: GPTConfig | None = None,
    *,
    zero_stage: int = 0,
    dp: int = 1,
    micro_batch: int = 1,
    seq_len: int | None = None,
    checkpointing: bool = False,
    flash_attention: bool = False,
    gpu: str | Accelerator | None = None,
    optimizer_bytes_per_param: float = ADAM_BYTES,
    weight_bytes: float = WEIGHT_BYTES,
    grad_bytes: float = GRAD_BYTES,
    activation_value_bytes: float = 2,
) -> TrainingMemory:
    """Memory per GPU for mixed-precision AdamW training under ZeRO stage 0-3 (FSDP full shard = 3) over
    ``dp`` data-parallel ranks: 2N weights, 2N grads, 12N optimizer bytes; stage 1 shards the optimizer
    states, 2 also the grads, 3 also the weights (Rajbhandari et al., ZeRO, 2020). Activations need ``cfg``.
    Plain float32 training is ``weight_bytes=4, grad_bytes=4, optimizer_bytes_per_param=8,
    activation_value_bytes=4`` (the same 16 bytes of model states per parameter, split otherwise)."""
    _positive(n_params=n_params, dp=dp)
    if zero_stage not in ZERO_STAGES:
        raise EstimateError(f"zero_stage must be one of {ZERO_STAGES} (3 = FSDP full shard), got {zero_stage!r}")
    w, g, o = weight_bytes * n_params, grad_bytes * n_params, optimizer_bytes_per_param * n_params
    if zero_stage >= 1:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    if zero_stage >= 3:
        w /= dp
    act = 0.0 if cfg is None else activation_bytes(
        cfg, micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing, flash_attention=flash_attention,
        value_bytes=activation_value_bytes)
    mem = None if gpu is None else find_gpu(gpu).memory_bytes
    return TrainingMemory(w, g, o, act, zero_stage, int(dp), mem)


@dataclass(frozen=True)
class InferenceMemory:
    """Bytes to serve a model: weights + KV cache (2·L·kv_heads·head_dim·bytes per token)."""

    weights_bytes: float
    kv_cache_bytes: float
    kv_bytes_per_token: float
    gpu_memory_bytes: float | None = None

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_cache_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_bytes is None else self.total_bytes <= self.gpu_memory_bytes

    def __str__(self) -> str:
        return (f"{human_bytes(self.total_bytes)} (weights {human_bytes(self.weights_bytes)}, "
                f"KV cache {human_bytes(self.kv_cache_bytes)})")


def inference_memory(
    cfg: GPTConfig, *, batch: int = 1, seq_len: int | None = None, weight_bytes: float = 2,
    kv_bytes: float = 2, gpu: str | Accelerator | None = None, n_params: float | None = None,
) -> InferenceMemory:
    """Inference memory: N·weight_bytes + batch·seq·(2·L·n_kv_head·head_dim·kv_bytes) for keys and values."""
    s = seq_len or cfg.block_size
    _positive(batch=batch, seq_len=s, weight_bytes=weight_bytes, kv_bytes=kv_bytes)
    n = n_params if n_params is not None else count_params(cfg).total
    per_token = 2.0 * cfg.n_layer * (cfg.n_kv_head or cfg.n_head) * cfg.head_dim * kv_bytes
    mem = None if gpu is None else find_gpu(gpu).memory_bytes
    return InferenceMemory(n * weight_bytes, per_token * s * batch, per_token, mem)


# ---------------------------------------------------------------------------------------------- communication

@dataclass(frozen=True)
class AllReduce:
    """Ring all-reduce of ``n_bytes`` over ``n_ranks``: ``seconds``, and ``bus_bandwidth`` (bytes/s) as nccl-tests reports it."""

    n_bytes: float
    n_ranks: int
    bandwidth: float        # bytes/s per rank, one direction
    latency_s: float

    @property
    def seconds(self) -> float:
        g = self.n_ranks
        if g == 1:
            return 0.0
        return 2 * (g - 1) / g * self.n_bytes / self.bandwidth + 2 * (g - 1) * self.latency_s

    @property
    def algo_bandwidth(self) -> float:
        """Bytes/s as the user sees it: size / time."""
        return self.n_bytes / self.seconds if self.seconds else math.inf

    @property
    def bus_bandwidth(self) -> float:
        """Algorithm bandwidth × 2(G−1)/G: comparable with the link speed whatever G is."""
        g = self.n_ranks
        return self.algo_bandwidth * 2 * (g - 1) / g if g > 1 else math.inf


def allreduce_time(n_bytes: float, n_ranks: int, bandwidth: float, latency_s: float = 0.0) -> AllReduce:
    """Ring all-reduce: each rank sends and receives 2(G−1)/G of the data in 2(G−1) steps:
    t = 2(G−1)/G · bytes / bw + 2(G−1) · latency."""
    _positive(n_bytes=n_bytes, n_ranks=n_ranks, bandwidth=bandwidth)
    if latency_s < 0:
        raise EstimateError(f"latency_s must be >= 0, got {latency_s!r}")
    return AllReduce(float(n_bytes), int(n_ranks), float(bandwidth), float(latency_s))


INTRA_NODE_LATENCY_S = 5e-6   # order of magnitude of an NVLink/PCIe hop through NCCL


@dataclass(frozen=True)
class GradientSync:
    """Gradient all-reduce of one step against its backward pass; ``hidden`` when it can overlap fully."""

    allreduce: AllReduce
    backward_s: float
    link: str

    @property
    def seconds(self) -> float:
        return self.allreduce.seconds

    @property
    def hidden(self) -> bool:
        return self.allreduce.seconds <= self.backward_s

    @property
    def exposed_s(self) -> float:
        """Communication time left over after perfect overlap with the backward pass."""
        return max(0.0, self.allreduce.seconds - self.backward_s)


def gradient_sync(
    n_params: float, gpu: str | Accelerator, n_gpus: int, *, tokens_per_gpu_step: float,
    network: str | Network | None = "IB-NDR-400", gpus_per_node: int = 8, mfu: float = 0.4,
    grad_bytes: float = GRAD_BYTES, dtype: str = "auto", zero_stage: int = 0,
) -> GradientSync:
    """Does the data-parallel gradient all-reduce hide behind backward? Backward is ~4N FLOP/token (2/3
    of 6N); the ring runs at the intra-node link per direction within a node, else at the slower of that
    and the network (one NIC per GPU, rail-optimised). ZeRO-3 moves 1.5x the bytes of an all-reduce
    (reduce-scatter of grads + all-gather of weights in forward and backward; ZeRO paper, Sec. 7)."""
    _positive(n_params=n_params, tokens_per_gpu_step=tokens_per_gpu_step)
    _count(n_gpus=n_gpus, gpus_per_node=gpus_per_node)
    acc = find_gpu(gpu)
    if n_gpus <= gpus_per_node or network is None:
        bw, lat, link = acc.link_bw, INTRA_NODE_LATENCY_S, acc.link or "PCIe"
    else:
        net = find_network(network)
        bw, lat, link = min(acc.link_bw, net.bandwidth), net.latency, net.name
    volume = 1.5 if zero_stage == 3 else 1.0
    ar = allreduce_time(volume * n_params * grad_bytes, n_gpus, bw, lat)
    backward = 4.0 * n_params * tokens_per_gpu_step / (acc.peak_flops(dtype) * mfu)
    return GradientSync(ar, backward, link)


# ---------------------------------------------------------------------------------------------- energy, storage

@dataclass(frozen=True)
class Energy:
    """Energy of a run: ``kwh`` = GPU-hours × TDP × PUE. An estimate, not a bound either way: GPUs usually
    draw less than TDP, but the nodes' CPUs, memory, network and storage, idle nodes and failed runs are left out."""

    gpu_hours: float
    tdp_W: float
    pue: float
    kg_co2_per_kwh: float | None = None

    @property
    def kwh(self) -> float:
        return self.gpu_hours * self.tdp_W / 1000 * self.pue

    @property
    def mwh(self) -> float:
        return self.kwh / 1000

    @property
    def co2_tonnes(self) -> float | None:
        return None if self.kg_co2_per_kwh is None else self.kwh * self.kg_co2_per_kwh / 1000


def energy(gpu_hours: float, gpu: str | Accelerator, *, pue: float = 1.2, kg_co2_per_kwh: float | None = None) -> Energy:
    """Energy (kWh) = GPU-hours × TDP × PUE; PUE 1.1-1.5 is typical of HPC centres; optional CO2 at a grid intensity."""
    _positive(gpu_hours=gpu_hours, pue=pue)
    if pue < 1:
        raise EstimateError(f"pue is facility power / IT power and cannot be below 1, got {pue}")
    return Energy(float(gpu_hours), find_gpu(gpu).tdp_W, float(pue), kg_co2_per_kwh)


@dataclass(frozen=True)
class Storage:
    """Disk for a run: raw text, tokenized shards and checkpoints (bytes)."""

    raw_text_bytes: float
    token_bytes: float
    checkpoint_bytes: float     # one checkpoint
    n_checkpoints: int

    @property
    def total_bytes(self) -> float:
        return self.raw_text_bytes + self.token_bytes + self.checkpoint_bytes * self.n_checkpoints


def storage(
    n_tokens: float, n_params: float, *, vocab_size: int = 50304, raw_bytes_per_token: float = 4.0,
    keep_checkpoints: int = 3, with_optimizer: bool = True,
) -> Storage:
    """Storage: tokens as uint16 when the vocabulary fits in 65 536 ids (else uint32); raw text at ~4 bytes
    per BPE token (English); a resumable checkpoint holds 14 bytes/param (16-bit weights + fp32 master,
    Adam m and v; gradients are not saved), a weights-only one 2 bytes/param."""
    _positive(n_tokens=n_tokens, n_params=n_params, vocab_size=vocab_size, keep_checkpoints=keep_checkpoints)
    per_token = 2 if vocab_size <= 2**16 else 4
    ckpt = (WEIGHT_BYTES + ADAM_BYTES if with_optimizer else WEIGHT_BYTES) * n_params
    return Storage(n_tokens * raw_bytes_per_token, n_tokens * per_token, ckpt, int(keep_checkpoints))


# ---------------------------------------------------------------------------------------------- one plan

@dataclass(frozen=True)
class RunPlan:
    """Everything about one training run: memory, time, communication, energy, storage, and what dominates."""

    cfg: GPTConfig
    n_params: int
    n_tokens: float
    memory: TrainingMemory
    time: TrainingEstimate
    sync: GradientSync
    energy: Energy
    storage: Storage
    step_compute_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def dominant(self) -> str:
        """The biggest memory part, and whether compute or exposed communication dominates a step."""
        part = max(self.memory.parts().items(), key=lambda kv: kv[1])[0]
        comm = "communication" if self.sync.exposed_s > 0.1 * self.step_compute_s else "compute"
        return f"memory: {part}; step time: {comm}"

    def summary_rows(self) -> list[tuple[str, str]]:
        """(what, estimate) lines: does it fit, how long, what it costs, what dominates."""
        t, m, s = self.time, self.memory, self.sync
        rows = [
            ("parameters", f"{self.n_params / 1e9:.3g} B"),
            ("training compute", f"{t.flops:.3g} FLOP"),
            ("memory per GPU", f"{human_bytes(m.total_bytes)} of {human_bytes(m.gpu_memory_bytes)}: "
                               + ("fits" if m.fits else "does NOT fit")),
            ("time to train", f"{t.days:.3g} days on {t.n_gpus} x {t.gpu} at MFU {t.mfu:.0%}"),
            ("GPU-hours", f"{t.gpu_hours:.4g}"),
            ("energy", f"{self.energy.mwh:.3g} MWh (TDP {self.energy.tdp_W:g} W, PUE {self.energy.pue:g})"),
            ("gradient all-reduce", f"{s.seconds * 1e3:.3g} ms over {s.link} vs backward {s.backward_s * 1e3:.3g} ms: "
                                    + ("hidden" if s.hidden else f"{s.exposed_s * 1e3:.3g} ms exposed")),
            ("storage", f"{human_bytes(self.storage.total_bytes)} (tokens {human_bytes(self.storage.token_bytes)}, "
                        f"checkpoint {human_bytes(self.storage.checkpoint_bytes)})"),
            ("dominates", self.dominant),
        ]
        return rows + [("note", n) for n in self.notes]


def plan_run(
    cfg: GPTConfig, n_tokens: float, gpu: str | Accelerator, n_gpus: int, *, mfu: float = 0.4,
    zero_stage: int = 0, network: str | None = "IB-NDR-400", gpus_per_node: int = 8, micro_batch: int = 1,
    checkpointing: bool = False, flash_attention: bool = True, pue: float = 1.2, dtype: str = "auto",
) -> RunPlan:
    """Combine the estimators for a GPT trained with pure data parallelism (ZeRO/FSDP) on ``n_gpus``."""
    n = count_params(cfg).total
    acc = find_gpu(gpu)
    mem = training_memory(n, cfg, zero_stage=zero_stage, dp=n_gpus, micro_batch=micro_batch,
                          checkpointing=checkpointing, flash_attention=flash_attention, gpu=acc)
    t = estimate_training(n, n_tokens, acc, n_gpus, mfu, dtype=dtype, cfg=cfg)
    tokens = micro_batch * cfg.block_size
    sync = gradient_sync(n, acc, n_gpus, tokens_per_gpu_step=tokens, network=network,
                         gpus_per_node=gpus_per_node, mfu=mfu, dtype=dtype, zero_stage=zero_stage)
    step = training_flops(n, tokens, cfg).flops / (acc.peak_flops(dtype) * mfu)
    notes = []
    if mem.fits is False:
        notes.append(f"does not fit: {human_bytes(mem.total_bytes)} > {human_bytes(mem.gpu_memory_bytes)}; "
                     "raise the ZeRO stage, add GPUs (stage >= 1), turn on checkpointing or shrink the micro-batch")
    if not sync.hidden:
        notes.append(f"gradient all-reduce ({sync.seconds * 1e3:.3g} ms) exceeds backward "
                     f"({sync.backward_s * 1e3:.3g} ms): raise the micro-batch or use a faster network")
    return RunPlan(cfg, n, float(n_tokens), mem, t, sync, energy(t.gpu_hours, acc, pue=pue),
                   storage(n_tokens, n, vocab_size=cfg.vocab_size), step, notes)
