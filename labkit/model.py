"""A small GPT in one readable file: config, device and precision choice, model, sampling.

Decoder-only, pre-LayerNorm, causal self-attention through ``torch.nn.functional.
scaled_dot_product_attention`` (or labkit's own: the formula as written, ``attention="labkit"``, or
the block-by-block online softmax that never builds T x T, ``attention="online"``), and the
token embedding tied to the output head.

Module names (other labkit modules, e.g. pruning, rely on them)::

    transformer.wte, transformer.wpe            token and position embeddings
    transformer.h[i].ln_1, .attn, .ln_2, .mlp    one block
        .attn.c_attn  Linear(n_embd, 3 * n_head * head_dim); outputs are [q | k | v], each
                      head a contiguous slice of head_dim inside q, k and v
        .attn.c_proj  Linear(n_head * head_dim, n_embd)
        .attn.n_head, .attn.head_dim
        .mlp.c_fc     Linear(n_embd, ffn),  .mlp.c_proj Linear(ffn, n_embd)
    transformer.ln_f, lm_head                   final norm and output head (weight tied to wte)

A structurally pruned model stays a ``GPT``: ``GPTConfig.layer_heads`` and ``layer_ffn`` give the
number of heads and the FFN width of each layer, so it saves, loads and generates like any other.

Generation keeps a ``KVCache`` (keys and values of past positions, per layer; rows may hold
different lengths): ``GPT.generate`` and ``GPT.next_logits`` prefill the prompt in one pass, then run
one token per pass over the cache; ``labkit.serve`` batches requests over one cache.

Saving and loading (one checksummed file that carries the tokenizer) live in ``labkit.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit import attention as A

PRECISIONS = ("auto", "float32", "bfloat16")
ATTENTIONS = ("sdpa", "labkit", "online")
ACTIVATIONS = ("gelu", "gelu_tanh")
# configs saved before GPTConfig had ``activation`` were trained with GPT-2's tanh GELU
_SAVED_BEFORE_ACTIVATION = {"activation": "gelu_tanh"}


# --------------------------------------------------------------------------------------- config


@dataclass
class GPTConfig:
    """The shape of a GPT. ``head_dim``, ``layer_heads`` and ``layer_ffn`` are only needed for
    non-standard (e.g. pruned) shapes; by default every layer has ``n_head`` heads of
    ``n_embd // n_head`` dims and an FFN of ``4 * n_embd``."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 512
    dropout: float = 0.0
    bias: bool = True
    precision: str = "auto"          # auto | float32 | bfloat16
    attention: str = "sdpa"          # sdpa | labkit
    activation: str = "gelu"         # gelu (exact, erf) | gelu_tanh (GPT-2's approximation)
    head_dim: int | None = None
    layer_heads: tuple[int, ...] | None = None
    layer_ffn: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.precision == "bf16":
            self.precision = "bfloat16"
        if self.layer_heads is not None:
            self.layer_heads = tuple(int(h) for h in self.layer_heads)
        if self.layer_ffn is not None:
            self.layer_ffn = tuple(int(f) for f in self.layer_ffn)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix when the shape is impossible."""
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"GPTConfig.precision={self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"GPTConfig.attention={self.attention!r}; valid: {', '.join(ATTENTIONS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation={self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and self.attention != "sdpa":
            raise ValueError(f"GPTConfig(attention={self.attention!r}) has no attention dropout; "
                             "use dropout=0.0, or attention='sdpa'")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "change one of them or set head_dim explicitly"
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"GPTConfig.head_dim must be positive, got {self.head_dim}")
        for name in ("layer_heads", "layer_ffn"):
            per_layer = getattr(self, name)
            if per_layer is not None:
                if len(per_layer) != self.n_layer:
                    raise ValueError(f"GPTConfig.{name} has {len(per_layer)} entries; need one per layer ({self.n_layer})")
                if any(v < 0 for v in per_layer):
                    raise ValueError(f"GPTConfig.{name} must be >= 0 per layer, got {per_layer}")

    @property
    def dim_per_head(self) -> int:
        """Dimensions of one attention head."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def heads(self, layer: int) -> int:
        """Number of attention heads in ``layer``."""
        return self.layer_heads[layer] if self.layer_heads is not None else self.n_head

    def ffn(self, layer: int) -> int:
        """Hidden width of the FFN in ``layer``."""
        return self.layer_ffn[layer] if self.layer_ffn is not None else 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists); ``GPTConfig.from_dict`` reverses it."""
        d = dataclasses.asdict(self)
        for k in ("layer_heads", "layer_ffn"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Build a config from ``to_dict`` output; unknown keys are an error that lists valid ones."""
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; valid: {valid}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "GPTConfig":
        """``from_dict`` for a config read from a checkpoint: one saved before ``activation``
        existed gets the tanh GELU it was trained with."""
        return cls.from_dict({**_SAVED_BEFORE_ACTIVATION, **d})


# ------------------------------------------------------------------------------------ device


class DeviceUnavailable(ValueError, RuntimeError):
    """A device name torch does not know, or CUDA asked for where torch sees no GPU."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to run on: ``auto`` = CUDA when torch sees a GPU, else CPU; a name (``cpu``,
    ``cuda``, ``cuda:N``) is checked now, so a wrong one fails at once with what to use instead."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailable(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device={str(device)!r} asked for, but torch sees no GPU here; "
                                "use 'cpu', or 'auto' to take a GPU when there is one")
    return dev


# ------------------------------------------------------------------------------------ precision


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


# bf16 autocast must beat float32 by this much in the matmul probe before "auto" takes it on a CPU: a
# margin wide enough that noise cannot flip the choice between runs (AMX: ~5-10x; AVX512-BF16 on AMD
# Zen 4: ~1.9x; AVX512-BF16 on an Intel VM without AMX: 0.53x, measured by bench.train)
CPU_BF16_MIN_SPEEDUP = 1.3
# the /proc/cpuinfo flags by which a CPU claims bf16 matmuls in hardware
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(n: int = 512, seconds: float = 0.15) -> float:
    """bfloat16 over float32 matmul throughput on this CPU (n x n), measured once per process in
    ~0.15 s. Flags alone do not decide it: some CPUs report AVX512-BF16 yet run bf16 matmuls at half
    float32's speed (oneDNN's AVX512-BF16 kernel against MKL's float32 one without AMX). The two are
    timed in alternation and each keeps its fastest run, so load from other processes, which comes
    and goes, cannot favour one of them."""
    pairs = [(torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)) for dtype in (torch.float32, torch.bfloat16)]
    fastest = [float("inf"), float("inf")]
    for a, b in pairs:  # warm both kernels before timing either
        a @ b
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or fastest[1] == float("inf"):
        for i, (a, b) in enumerate(pairs):
            t0 = time.perf_counter()
            a @ b
            fastest[i] = min(fastest[i], time.perf_counter() - t0)
    return fastest[0] / fastest[1]


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls in hardware faster than float32: CUDA GPUs of compute
    capability 8.0+ (Ampere on; older ones only emulate bf16, which ``torch.cuda.is_bf16_supported``
    counts as support); CPUs with AVX512-BF16 or AMX (``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo)
    whose bf16 matmuls measure at least ``CPU_BF16_MIN_SPEEDUP`` times float32's (``cpu_bf16_speedup``)."""
    device = torch.device(device)
    if device.type == "cuda":
        # the capability of the device asked about (index None: the current one), not of the current one
        return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability(device)) >= (8, 0)
    if device.type == "cpu":
        return bool(CPU_BF16_FLAGS & cpu_flags()) and cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP
    return False


def cpu_bf16_report() -> str:
    """One line on this CPU's bf16: the flags by which it claims bf16 in hardware, the measured bf16/float32
    matmul ratio, and whether ``precision="auto"`` takes bf16 here (what notebook 06 shows a learner)."""
    claimed = ", ".join(sorted(CPU_BF16_FLAGS & cpu_flags())) or "no bf16 flag"
    return (f"flags: {claimed}; bf16 matmuls run at {cpu_bf16_speedup():.2f}x float32's here; "
            f"precision='auto' takes bf16: {bf16_is_fast('cpu')}")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype that ``precision`` means on ``device``; None means plain float32."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else None
    raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")


# ---------------------------------------------------------------------------------------- model


def _labkit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, how: str) -> torch.Tensor:
    """Causal attention through labkit.attention: the formula as written (``"labkit"``) or the
    online-softmax version whose memory stays O(T) in training too (``"online"``)."""
    if how == "online":
        return A.online_softmax_attention(q, k, v, causal=True)
    return A.scaled_dot_product_attention(q, k, v, causal=True)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA, or SDPA under a boolean ``mask`` (True = may attend) when one is given. On CPU it
    runs in float32 even under bf16 autocast: torch's CPU flash-attention kernel is ~2.6x slower in
    bf16 than in fp32 (forward + backward, measured by ``bench.train``), while the matmuls around it
    gain from bf16. On GPUs the bf16 kernels are the fast ones."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               dropout_p=dropout_p, is_causal=mask is None)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)


class KVCache:
    """Keys and values of past positions, per layer, for ``batch`` rows that may hold different
    numbers of positions (continuous batching): ``k[layer]``, ``v[layer]`` are (B, heads, capacity,
    head_dim), row b filled up to ``lengths[b]``; the rest is padding that the attention mask hides.

    ``GPT.forward(idx, cache=cache)`` takes the T new tokens of every row at positions
    ``lengths[b] .. lengths[b] + T - 1``, writes their keys and values into the cache, lets them
    attend to the row's cached positions and to themselves causally, and advances ``lengths``."""

    def __init__(self, config: GPTConfig, batch: int, capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        dtype = dtype or autocast_dtype(config.precision, device) or torch.float32
        shape = [(batch, config.heads(i), capacity, config.dim_per_head) for i in range(config.n_layer)]
        self.k = [torch.zeros(s, device=device, dtype=dtype) for s in shape]
        self.v = [torch.zeros(s, device=device, dtype=dtype) for s in shape]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        """Rows in the cache."""
        return int(self.lengths.numel())

    @property
    def capacity(self) -> int:
        """Positions each row can hold."""
        return int(self.k[0].shape[2]) if self.k else 0

    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def begin(self, T: int) -> torch.Tensor:
        """Start a forward pass of T new tokens per row: their positions (B, T), and the mask (B, 1,
        T, L) over the L = max(lengths) + T key slots that the layers' ``update`` returns."""
        if self.batch and int(self.lengths.max()) + T > self.capacity:
            raise ValueError(f"KVCache holds {self.capacity} positions per row; {int(self.lengths.max())} "
                             f"are filled and {T} more do not fit")
        dev = self.lengths.device
        self._pos = self.lengths[:, None] + torch.arange(T, device=dev)
        L = int(self.lengths.max()) + T if self.batch else T
        self._mask = (torch.arange(L, device=dev)[None, None, :] <= self._pos[:, :, None])[:, None]
        return self._pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, heads, T, head_dim) of ``layer``; returns that layer's
        keys and values over L slots and the attention mask of ``begin``."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, :, self._pos] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, self._pos] = v.transpose(1, 2).to(self.v[layer].dtype)
        L = self._mask.shape[-1]
        return self.k[layer][:, :, :L], self.v[layer][:, :, :L], self._mask

    def end(self, T: int) -> None:
        """Finish the forward pass: every row now holds T more positions."""
        self.lengths += T
        self._pos = self._mask = None

    def select(self, rows: list[int]) -> "KVCache":
        """A cache of only ``rows`` (in that order), e.g. without the finished ones."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        out = object.__new__(KVCache)
        out.k = [t.index_select(0, idx) for t in self.k]
        out.v = [t.index_select(0, idx) for t in self.v]
        out.lengths = self.lengths.index_select(0, idx)
        out._pos = out._mask = None
        return out

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        """The rows of all ``caches`` in one cache, padded to the largest capacity."""
        cap = max(c.capacity for c in caches)
        pad = lambda t: F.pad(t, (0, 0, 0, cap - t.shape[2]))  # noqa: E731
        out = object.__new__(KVCache)
        out.k = [torch.cat([pad(c.k[i]) for c in caches]) for i in range(len(caches[0].k))]
        out.v = [torch.cat([pad(c.v[i]) for c in caches]) for i in range(len(caches[0].v))]
        out.lengths = torch.cat([c.lengths for c in caches])
        out._pos = out._mask = None
        return out


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """nn.Linear that accepts zero width quietly (a layer whose heads or neurons were all pruned)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(n_in, n_out, bias=bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, config: GPTConfig, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = config.dim_per_head
        inner = n_head * self.head_dim
        self.c_attn = _linear(config.n_embd, 3 * inner, config.bias)
        self.c_proj = _linear(inner, config.n_embd, config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attention = config.attention

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        inner = self.n_head * self.head_dim
        if inner == 0:  # every head pruned away: the block adds only the projection bias
            return self.c_proj(x.new_zeros(B, T, 0))
        q, k, v = self.c_attn(x).split(inner, dim=2)
        # (B, T, H*D) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # generation: attend over the cached positions too (SDPA for every kind)
            k, v, mask = cache.update(layer, k, v)
            y = _sdpa(q, k.to(q.dtype), v.to(q.dtype), 0.0, mask)
        elif self.attention != "sdpa":
            y = _labkit_attention(q, k, v, self.attention)
        else:
            y = _sdpa(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, inner)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network: Linear, GELU, Linear.

    GELU is the exact one (x * Phi(x), through erf) unless ``activation="gelu_tanh"``: GPT-2's tanh
    approximation differs from it by < 5e-4 and is the slower kernel on CPU (``bench.train`` (a)
    prints labkit's tokens/s with each)."""

    def __init__(self, config: GPTConfig, hidden: int) -> None:
        super().__init__()
        self.c_fc = _linear(config.n_embd, hidden, config.bias)
        self.c_proj = _linear(hidden, config.n_embd, config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, config.heads(layer))
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, config.ffn(layer))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model (see the module docstring for its layout)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        # residual projections start smaller so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and p.numel():
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.numel():
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once); without position embeddings by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward, ~6 per weight plus attention scores)."""
        T = seq_len or self.config.block_size
        attn = sum(12 * blk.attn.n_head * blk.attn.head_dim * T for blk in self.transformer.h)
        return 6.0 * self.num_params() + attn

    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        """An empty ``KVCache`` for ``batch`` rows of up to ``capacity`` positions (default and at
        most ``block_size``), on the model's device."""
        cap = min(capacity or self.config.block_size, self.config.block_size)
        return KVCache(self.config, batch, cap, self.lm_head.weight.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) in float32, and the mean cross-entropy when ``targets`` is given.

        With a ``cache`` (see ``KVCache``), ``idx`` holds only the new tokens of each row, which sit
        after the row's cached positions; the cache then holds them too.

        Under ``precision="auto"`` the forward pass runs in bfloat16 autocast where the device has
        fast bf16, so callers get the fast path without doing anything."""
        B, T = idx.shape
        end = T + (int(cache.lengths.max()) if cache is not None and cache.batch else 0)
        if end > self.config.block_size:
            raise ValueError(f"sequence length {end} exceeds block_size {self.config.block_size}; crop the input")
        dtype = autocast_dtype(self.config.precision, idx.device)
        with torch.autocast(device_type=idx.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            pos = torch.arange(T, device=idx.device) if cache is None else cache.begin(T)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for i, block in enumerate(self.transformer.h):
                x = block(x, cache, i)
            logits = self.lm_head(self.transformer.ln_f(x))
        if cache is not None:
            cache.end(T)
        logits = logits.float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); temperature 0 means greedy.

        ``use_cache`` keeps the keys and values of past positions (see ``next_logits``) instead of
        recomputing the whole context for every token; the logits agree to float rounding."""
        was_training = self.training
        self.eval()
        cache = self.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        try:
            for _ in range(max_new_tokens):
                logits = self.next_logits(idx, cache)
                if temperature <= 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, num_samples=1, generator=generator)
                idx = torch.cat((idx, nxt), dim=1)
        finally:
            self.train(was_training)
        return idx

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, vocab) of the token after ``idx`` (B, T), the same as
        ``self(idx[:, -block_size:])[0][:, -1]`` up to float rounding.

        With a ``cache`` (its rows all at the same length, e.g. from ``new_cache``, empty or filled by
        the previous call on a prefix of ``idx``) only the tokens it does not hold yet are run: the
        whole prompt in one pass first (prefill), then one token per call. Once ``idx`` is longer
        than ``block_size`` the cache cannot help: the positions are learned and absolute, so
        cropping to the last ``block_size`` tokens moves every kept token to a new position and the
        cached keys and values no longer apply. Every further call then runs the whole window
        without the cache, exactly as the no-cache path does (the tokens/s of recompute)."""
        T = idx.shape[1]
        if cache is None or T > self.config.block_size:
            return self(idx[:, -self.config.block_size:])[0][:, -1, :]
        start = int(cache.lengths[0]) if cache.batch else 0
        return self(idx[:, start:], cache=cache)[0][:, -1, :]
