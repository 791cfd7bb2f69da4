"""Unstructured magnitude pruning: zero the smallest weights, per layer or across the whole model.

Built on ``torch.nn.utils.prune`` and made permanent with ``prune.remove``, so the result is an
ordinary model whose weights simply contain zeros (same shapes, same dense cost).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import prune

SCOPES = ("global", "layer")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def check_amount(amount: float, name: str = "amount") -> float:
    """Validate a pruning fraction in [0, 1); returns it as a float."""
    try:
        value = float(amount)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a fraction like 0.5, not {amount!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={amount!r}: give a fraction in [0, 1), e.g. 0.5 to remove half")
    return value


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv layers whose weights pruning acts on, by name.

    A weight tied to an embedding (a GPT's ``lm_head``) is left out: pruning it would prune the
    token embedding too.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE) and id(m.weight) not in embedded and m.weight.numel() > 0
    ]


def magnitude(model: nn.Module, amount: float, scope: str = "global") -> nn.Module:
    """Zero the ``amount`` fraction of smallest-magnitude weights, in place, and make it permanent.

    ``scope="global"`` ranks all prunable weights together (layers end up unequally sparse);
    ``scope="layer"`` removes ``amount`` of each layer. Zeros already there count as pruned, so
    calling it again with a larger amount prunes further. Returns the same model.
    """
    amount = check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: choose one of {', '.join(SCOPES)}")
    targets = [(m, "weight") for _, m in prunable_layers(model)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear/Conv layers to prune")
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, pname in targets:
            prune.l1_unstructured(module, pname, amount=amount)
    for module, pname in targets:
        prune.remove(module, pname)
    return model


@dataclass(frozen=True)
class LayerSparsity:
    """One layer's weight count, zeros, and FLOPs per token (2 per multiply-add)."""

    name: str
    shape: tuple[int, ...]
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    @property
    def flops(self) -> int:
        """FLOPs per token (or output position) a dense kernel spends on this weight."""
        return 2 * self.params

    @property
    def flops_nonzero(self) -> int:
        """FLOPs per token a kernel that skipped the zeros would spend."""
        return 2 * (self.params - self.zeros)


@dataclass(frozen=True)
class SparsityReport:
    """Sparsity per prunable layer and in total (``.total``, also ``float(report)``)."""

    rows: tuple[LayerSparsity, ...]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def total(self) -> float:
        """Fraction of the prunable weights that are zero."""
        return self.zeros / self.params if self.params else 0.0

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def flops_nonzero(self) -> int:
        return sum(r.flops_nonzero for r in self.rows)

    def __float__(self) -> float:
        return self.total

    def __getitem__(self, name: str) -> LayerSparsity:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no prunable layer {name!r}; layers: {', '.join(r.name for r in self.rows)}")

    def as_dict(self) -> dict:
        """Plain data for events, JSON and tables."""
        return {
            "total": self.total,
            "params": self.params,
            "zeros": self.zeros,
            "flops": self.flops,
            "flops_nonzero": self.flops_nonzero,
            "layers": [
                {"name": r.name, "shape": list(r.shape), "params": r.params, "zeros": r.zeros,
                 "sparsity": r.sparsity, "flops": r.flops, "flops_nonzero": r.flops_nonzero}
                for r in self.rows
            ],
        }

    def table(self) -> str:
        """A fixed-width text table, one line per layer and a total line."""
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'params':>10}  {'sparsity':>8}  {'MFLOP/tok':>9}  {'nonzero':>9}"]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {r.params:>10,}  {r.sparsity:>8.1%}  {r.flops / 1e6:>9.3f}  {r.flops_nonzero / 1e6:>9.3f}"
            )
        lines.append(
            f"{'total':<{width}}  {self.params:>10,}  {self.total:>8.1%}  {self.flops / 1e6:>9.3f}  {self.flops_nonzero / 1e6:>9.3f}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def sparsity(model: nn.Module) -> SparsityReport:
    """Count zero weights in every prunable layer: per layer and in total, in params and FLOPs."""
    rows = []
    for name, m in prunable_layers(model):
        w = m.weight.detach()
        rows.append(LayerSparsity(name, tuple(w.shape), w.numel(), int((w == 0).sum())))
    return SparsityReport(tuple(rows))


def penalty(model: nn.Module, kind: str = "l1") -> torch.Tensor:
    """The L1 (sum |w|) or L2 (sum w^2) size of the prunable weights, to add to a loss.

    L1 drives small weights to exactly zero over training; L2 only shrinks them: both are the
    gentle cousins of pruning, which removes weights in one cut.
    """
    layers = prunable_layers(model)
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind={kind!r}: choose 'l1' or 'l2'")
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear/Conv layers")
    terms = [m.weight.abs().sum() if kind == "l1" else m.weight.pow(2).sum() for _, m in layers]
    return torch.stack(terms).sum()


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = nonzero) of the prunable weights, by layer name."""
    return {name: m.weight.detach() != 0 for name, m in prunable_layers(model)}


@contextlib.contextmanager
def hold_zeros(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keep pruned weights at zero while fine-tuning inside the block.

    Gradients of zeroed weights are masked while the block runs (so Adam's moments stay zero), and
    the masks are applied again on exit in case the training path bypassed the hooks.
    """
    keep = masks(model)
    layers = dict(prunable_layers(model))
    handles = [layers[n].weight.register_hook(lambda g, k=k: g * k.to(g.dtype)) for n, k in keep.items()]
    try:
        yield keep
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, k in keep.items():
                w = layers[n].weight
                w.mul_(k.to(device=w.device, dtype=w.dtype))
