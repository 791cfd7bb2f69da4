"""How much each attention head or FFN neuron matters: by weight magnitude, or by gradient.

Gradient importance follows Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"):
put a gate ``g = 1`` on each head's (or neuron's) output and average ``|dL/dg|`` over data. It is
the first-order estimate of how much the loss would move if that unit were removed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

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


class Gates:
    """Multiplicative gates (all ones) on the last-dim groups of chosen modules' inputs.

    ``Gates({module: n_groups})`` registers forward pre-hooks so that the input of ``module`` is
    split into ``n_groups`` equal slices along its last dimension, each scaled by its gate.
    After ``loss.backward()``, ``accumulate()`` adds ``|grad|`` of every gate to ``.scores``.
    """

    def __init__(self, modules: Sequence[tuple[nn.Module, int]]) -> None:
        self.gates = [torch.ones(n, requires_grad=True) for _, n in modules]
        self.scores = [torch.zeros(n) for _, n in modules]
        self.batches = 0
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (m, _) in enumerate(modules)]

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            g = self.gates[i].to(device=x.device, dtype=x.dtype)
            n = g.numel()
            gated = (x.reshape(*x.shape[:-1], n, x.shape[-1] // n) * g[:, None]).reshape(x.shape)
            return (gated, *args[1:])

        return hook

    def accumulate(self) -> None:
        """Add |dL/dg| of this backward pass to the scores, and clear the gate gradients."""
        for s, g in zip(self.scores, self.gates):
            if g.grad is not None:
                s += g.grad.detach().abs().cpu()
                g.grad = None
        self.batches += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def mean(self) -> list[torch.Tensor]:
        """Average score per unit over the accumulated batches."""
        return [s / max(self.batches, 1) for s in self.scores]


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
                raise ValueError(f"{data.numel()} tokens are too few for one window of {block_size + 1}")
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
