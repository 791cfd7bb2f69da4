"""How much each attention head or FFN neuron matters: by weight magnitude, or by gradient.

Gradient importance follows Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"):
put a gate ``g = 1`` on each head's (or neuron's) output and average ``|dL(x)/dg|`` over examples
``x``. It is the first-order estimate of how much the loss would move if that unit were removed.
Scores are then normalised per layer (L2) before heads are ranked across layers.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .unstructured import SCOPES, check_amount

IMPORTANCES = ("magnitude", "gradient")


def check_importance(importance: str) -> str:
    """Validate an importance name."""
    if importance not in IMPORTANCES:
        raise ValueError(f"importance={importance!r}: choose one of {', '.join(IMPORTANCES)}")
    return importance


def head_weight_norms(qkv_rows: Sequence[torch.Tensor], out_cols: torch.Tensor, n_head: int) -> torch.Tensor:
    """L2 norm of all weights that belong to each head: its q, k, v rows and its output columns.

    ``qkv_rows`` are the q, k and v weights, each (n_head*head_dim, d_model); ``out_cols`` is the
    output projection (d_model, n_head*head_dim).
    """
    total = torch.zeros(n_head)
    for w in qkv_rows:
        total += w.detach().float().reshape(n_head, -1).pow(2).sum(1).cpu()
    total += out_cols.detach().float().reshape(out_cols.shape[0], n_head, -1).pow(2).sum((0, 2)).cpu()
    return total.sqrt()


def neuron_weight_norms(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Importance of each FFN neuron: norm of its input row times norm of its output column."""
    return (w_in.detach().float().norm(dim=1) * w_out.detach().float().norm(dim=0)).cpu()


def normalize_per_layer(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's scores divided by their L2 norm (all-zero layers stay zero), so that layers
    whose gradients run larger or smaller can be ranked together (Michel et al. 2019)."""
    out = []
    for s in scores:
        s = s.detach().float()
        norm = s.norm()
        out.append(s / norm if norm > 0 else s.clone())
    return out


def wants_normalize(importance: str, normalize: bool | None) -> bool:
    """The ``normalize=None`` default: per-layer normalisation for gradient importance only."""
    return importance == "gradient" if normalize is None else bool(normalize)


class Gates:
    """Per-example multiplicative gates (all ones) on the last-dim groups of chosen modules' inputs.

    ``Gates([(module, n_groups), ...])`` registers forward pre-hooks: each forward call gets fresh
    gates of shape ``(batch, n_groups)``, and the input ``(batch, ..., width)`` of ``module`` is split
    into ``n_groups`` equal slices along its last dimension, each scaled by its example's gate. One
    backward pass of a loss that sums per-example losses then gives every example's own ``dL/dg``;
    ``accumulate()`` adds their absolute values to ``.scores`` (Michel et al. take E_x |dL(x)/dg|,
    so signs must not cancel across examples as they would in the gradient of a batch-mean loss).
    """

    def __init__(self, modules: Sequence[tuple[nn.Module, int]]) -> None:
        self.sizes = [int(n) for _, n in modules]
        self.scores = [torch.zeros(n) for n in self.sizes]
        self.examples = 0
        self.batches = 0
        self._live: list[list[torch.Tensor]] = [[] for _ in modules]
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (m, _) in enumerate(modules)]

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x, n = args[0], self.sizes[i]
            if x.dim() < 2 or x.shape[-1] % n:
                raise ValueError(f"gated input of shape {tuple(x.shape)}: need (batch, ..., width) with width "
                                 f"divisible by {n} groups")
            if not torch.is_grad_enabled():
                return None  # nothing to measure without autograd; leave the input as it is
            g = torch.ones(x.shape[0], n, device=x.device, dtype=x.dtype, requires_grad=True)
            self._live[i].append(g)
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (n, 1)
            gated = (x.reshape(*x.shape[:-1], n, x.shape[-1] // n) * g.view(shape)).reshape(x.shape)
            return (gated, *args[1:])

        return hook

    def accumulate(self) -> None:
        """After ``loss.backward()``: add each example's |dL/dg| to the scores and drop the gates."""
        seen = 0
        for s, live in zip(self.scores, self._live):
            for g in live:
                if g.grad is not None:
                    s += g.grad.detach().float().abs().sum(0).cpu()
                seen = max(seen, g.shape[0])
            live.clear()
        self.examples += seen
        self.batches += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for live in self._live:
            live.clear()

    def mean(self) -> list[torch.Tensor]:
        """Average |dL/dg| per unit over the examples seen: the importance of Michel et al. 2019."""
        return [s / max(self.examples, 1) for s in self.scores]


@contextlib.contextmanager
def gated(modules: Sequence[tuple[nn.Module, int]]) -> Iterator[Gates]:
    """``Gates`` as a context manager: the hooks are removed on exit, whatever happens."""
    gates = Gates(modules)
    try:
        yield gates
    finally:
        gates.close()


def batches_of(data: object, block_size: int | None = None, batch_size: int = 8) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Turn token data into ``(x, y)`` batches for a language model.

    ``data`` may be a 2-D LongTensor of windows ``(N, T+1)``, a 1-D token stream (cut into
    windows of ``block_size + 1``), a single ``(x, y)`` pair, or an iterable of such pairs.
    """
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token data must be an integer tensor, not {data.dtype}")
        data = data.long()
        if data.dim() == 1:
            if block_size is None:
                raise ValueError("a 1-D token stream needs block_size to be cut into windows")
            n = (data.numel() - 1) // block_size
            if n < 1:
                raise ValueError(f"{data.numel()} tokens are too few for one window of {block_size + 1}: "
                                 "pass more tokens or a smaller block_size")
            data = torch.stack([data[i * block_size : i * block_size + block_size + 1] for i in range(n)])
        if data.dim() != 2 or data.shape[1] < 2:
            raise ValueError(f"token windows must be (N, T+1) with T >= 1, got shape {tuple(data.shape)}")
        return [
            (data[i : i + batch_size, :-1].contiguous(), data[i : i + batch_size, 1:].contiguous())
            for i in range(0, len(data), batch_size)
        ]
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [data]
    if data is None:
        raise ValueError("this needs data: token windows (N, T+1), a token stream, or (x, y) batches")
    return data  # an iterable of (x, y) pairs


def select(scores: Sequence[torch.Tensor], amount: float, scope: str = "global", min_keep: int = 1,
           normalize: bool = False) -> list[torch.Tensor]:
    """Which units to keep: drop the ``amount`` fraction with the lowest scores.

    ``scope="global"`` ranks all layers together (with ``normalize=True`` after dividing each
    layer's scores by their L2 norm, as Michel et al. do), ``"layer"`` drops the same fraction in
    every layer. Every layer keeps at least ``min_keep`` units. Returns sorted kept indices per layer.
    """
    amount = check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: choose one of {', '.join(SCOPES)}")
    sizes = [len(s) for s in scores]
    drop: list[set[int]] = [set() for _ in scores]
    if scope == "layer":
        for i, s in enumerate(scores):
            n = min(round(amount * len(s)), len(s) - min_keep)
            drop[i] = set(torch.argsort(s.float())[: max(n, 0)].tolist())
    else:
        ranked = []
        for i, s in enumerate(normalize_per_layer(scores) if normalize else scores):
            ranked += [(float(v), i, j) for j, v in enumerate(s.float())]
        ranked.sort()
        target = round(amount * sum(sizes))
        for _, i, j in ranked:
            if sum(len(d) for d in drop) >= target:
                break
            if sizes[i] - len(drop[i]) > min_keep:
                drop[i].add(j)
    return [torch.tensor(sorted(set(range(n)) - d), dtype=torch.long) for n, d in zip(sizes, drop)]
