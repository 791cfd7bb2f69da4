"""Prune, fine-tune, repeat; and L1/L2 regularisation, pruning's gentler cousin.

Fine-tuning reuses ``labkit.train``'s optimizer (AdamW with its decay groups), learning-rate
schedule and data sampling; it starts from the given (pruned) model instead of a fresh one, and
keeps pruned weights at zero (``hold_zeros``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from labkit.core.crypto import Encryption
from labkit.core.events import emit
from labkit.train import batch_rows, lr_at, make_optimizer, open_data

from .evaluate import perplexity
from .structured import prune_structured, structured_size
from .unstructured import check_amount, hold_zeros, magnitude, penalty, prunable_layers, sparsity


def finetune(model: nn.Module, config: Any, data_dir: str | os.PathLike, steps: int | None = None,
             regularizer: str | None = None, strength: float = 0.0, sink: Callable | None = None,
             encryption: Encryption | None = None) -> list[float]:
    """Train ``model`` in place for ``steps`` (default ``config.max_steps``) on the shards in ``data_dir``.

    ``config`` is a ``labkit.train.TrainConfig`` (lr, schedule, batch, block size, seed). With
    ``regularizer="l1"`` or ``"l2"`` the loss gains ``strength * penalty(model)``. ``encryption``: the
    key of encrypted shards. Returns the losses.
    """
    if regularizer not in (None, "l1", "l2"):
        raise ValueError(f"regularizer={regularizer!r}: choose None, 'l1' or 'l2'")
    steps = config.max_steps if steps is None else int(steps)
    if steps < 0:
        raise ValueError("steps must be >= 0")
    train_data, _ = open_data(data_dir, encryption=encryption)
    block = min(config.model.block_size, model.config.block_size)
    device = next(model.parameters()).device
    opt = make_optimizer(model, config)
    sched = config.replace(max_steps=max(steps, 1), warmup_steps=min(config.warmup_steps, max(steps - 1, 0)))
    losses = []
    model.train()
    with hold_zeros(model):
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, sched)
            x, y = batch_rows(train_data, block, config.seed + 7, step, config.batch_size, 0, config.batch_size)
            _, loss = model(x.to(device), y.to(device))
            total = loss + strength * penalty(model, regularizer) if regularizer else loss
            total.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            emit("finetune", sink, step=step + 1, loss=losses[-1])
    model.eval()
    return losses


def cubic_schedule(target: float, steps: int, start: float = 0.0) -> list[float]:
    """Sparsity after each of ``steps`` rounds: fast at first, gentle near the end (Zhu & Gupta 2017)."""
    target = check_amount(target, "target")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [target + (start - target) * (1 - (i + 1) / steps) ** 3 for i in range(steps)]


@dataclass
class IterativeResult:
    """The pruned, fine-tuned model and one history row per round."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)


def iterative(model: nn.Module, target: float, rounds: int, config: Any, data_dir: str | os.PathLike,
              val: torch.Tensor, steps_per_round: int = 10, method: str = "unstructured",
              sink: Callable | None = None, encryption: Encryption | None = None) -> IterativeResult:
    """Prune toward ``target`` over ``rounds`` rounds on a cubic schedule, fine-tuning after each.

    ``method="unstructured"`` zeroes weights by global magnitude (``model`` is changed in place);
    ``"structured"`` removes heads and FFN neurons (a new, smaller model each round; ``target`` is
    the fraction of the original units removed). Each round records the perplexity right after the
    cut and after fine-tuning, so the notebook can show what fine-tuning wins back. ``encryption``:
    the key of encrypted shards.
    """
    if method not in ("unstructured", "structured"):
        raise ValueError(f"method={method!r}: choose 'unstructured' or 'structured'")
    original = structured_size(model) if method == "structured" else None
    ppl = perplexity(model, val)
    history = [{"round": 0, "sparsity": sparsity(model).total if original is None else 0.0,
                "ppl_pruned": ppl, "ppl_finetuned": ppl}]
    done = history[0]["sparsity"]
    for r, amount in enumerate(cubic_schedule(target, rounds, start=done), start=1):
        if method == "unstructured":
            magnitude(model, amount, scope="global")
            removed = sparsity(model).total
        else:
            step = 1.0 - (1.0 - amount) / (1.0 - done)  # of what is left, to reach `amount` of the original
            model = prune_structured(model, max(step, 0.0))
            now = structured_size(model)
            removed = 1.0 - (now["heads"] + now["ffn"]) / (original["heads"] + original["ffn"])
        done = amount
        pruned_ppl = perplexity(model, val)
        finetune(model, config, data_dir, steps=steps_per_round, encryption=encryption)
        row = {"round": r, "sparsity": removed, "ppl_pruned": pruned_ppl, "ppl_finetuned": perplexity(model, val)}
        history.append(row)
        emit("iterative", sink, method=method, **row)
    return IterativeResult(model, history)


def near_zero(model: nn.Module, tol: float = 1e-3) -> float:
    """Fraction of prunable weights with |w| < tol: what L1 pushes up and pruning then cuts for free."""
    ws = [m.weight.detach().abs().flatten() for _, m in prunable_layers(model)]
    w = torch.cat(ws)
    return float((w < tol).float().mean())


def regularisation_study(model: nn.Module, config: Any, data_dir: str | os.PathLike, val: torch.Tensor,
                         strengths: Sequence[tuple[str | None, float]] = ((None, 0.0), ("l2", 1e-4), ("l1", 1e-4)),
                         steps: int = 20, amount: float = 0.5, encryption: Encryption | None = None) -> list[dict]:
    """Fine-tune copies with no / L2 / L1 penalty, then magnitude-prune each to ``amount``.

    Rows give the near-zero fraction the penalty produced and the perplexity before and after
    the cut: regularisation prepares the weights so that pruning costs less. ``encryption``: the key
    of encrypted shards.
    """
    rows = []
    for kind, strength in strengths:
        m = copy.deepcopy(model)
        finetune(m, config, data_dir, steps=steps, regularizer=kind, strength=strength, encryption=encryption)
        before = perplexity(m, val)
        nz = near_zero(m)
        magnitude(m, amount)
        rows.append({"regularizer": kind or "none", "strength": strength, "near_zero": nz,
                     "ppl": before, "ppl_pruned": perplexity(m, val), "ppl_cost": perplexity(m, val) / before})
    return rows
