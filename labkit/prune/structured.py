"""Structured pruning of a GPT: remove whole attention heads and FFN neurons.

The result is a *smaller dense GPT*: a new ``GPTConfig`` with per-layer ``layer_heads`` and
``layer_ffn``, built with the same class and loaded with the surviving weights, so it saves, loads,
generates and fine-tunes like any other GPT, and runs faster on ordinary dense kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from .bert import is_bert, prune_bert
from .importance import batches_of, check_importance, gated, head_weight_norms, neuron_weight_norms, select, wants_normalize
from .unstructured import check_amount


def _blocks(model: nn.Module) -> list[nn.Module]:
    try:
        return list(model.transformer.h)
    except AttributeError:
        raise TypeError(
            f"{type(model).__name__} is not a labkit GPT (no .transformer.h blocks); for a Hugging Face "
            "BERT use labkit.prune.bert.prune_bert_heads"
        ) from None


def _head_dim(attn: nn.Module) -> int:
    return int(attn.head_dim)


def _loss_batches(model: nn.Module, data: object, max_batches: int | None):
    block = getattr(model.config, "block_size", None)
    for i, (x, y) in enumerate(batches_of(data, block)):
        if max_batches is not None and i >= max_batches:
            break
        yield x, y


def _gradient_scores(model: nn.Module, modules: list[tuple[nn.Module, int]], data: object, max_batches: int | None) -> list[torch.Tensor]:
    if data is None:
        raise ValueError("importance='gradient' needs data: token windows (N, T+1) or (x, y) batches")
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model we will keep
    device = next(model.parameters()).device
    try:
        with gated(modules) as gates:
            for x, y in _loss_batches(model, data, max_batches):
                _, loss = model(x.to(device), y.to(device))
                # the batch-mean loss times B is the sum of per-sequence losses: per-example gates
                # then get each sequence's own dL/dg, whose absolute values Gates adds up
                (loss * x.shape[0]).backward()
                gates.accumulate()
            if gates.batches == 0:
                raise ValueError("data gave no batches to measure gradients on")
            scores = gates.mean()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


def head_importance(model: nn.Module, importance: str = "magnitude", data: object = None, max_batches: int | None = 8) -> list[torch.Tensor]:
    """Importance of every attention head, one tensor per layer (layers may differ in head count).

    ``magnitude``: L2 norm of the head's q/k/v rows and output columns. ``gradient``: |dL/dg| of a
    gate on the head's output, per sequence, averaged over the sequences of ``data`` (Michel et al. 2019).
    """
    check_importance(importance)
    blocks = _blocks(model)
    if importance == "gradient":
        return _gradient_scores(model, [(b.attn.c_proj, int(b.attn.n_head)) for b in blocks], data, max_batches)
    out = []
    for b in blocks:
        h = int(b.attn.n_head)
        q, k, v = b.attn.c_attn.weight.chunk(3, dim=0)
        out.append(head_weight_norms((q, k, v), b.attn.c_proj.weight, h))
    return out


def ffn_importance(model: nn.Module, importance: str = "magnitude", data: object = None, max_batches: int | None = 8) -> list[torch.Tensor]:
    """Importance of every FFN neuron, one tensor per layer.

    ``magnitude``: norm of the neuron's input row times its output column. ``gradient``: per-sequence
    |dL/dg| of a gate on the neuron's activation, averaged over ``data`` (a first-order Taylor estimate).
    """
    check_importance(importance)
    blocks = _blocks(model)
    if importance == "gradient":
        return _gradient_scores(model, [(b.mlp.c_proj, b.mlp.c_proj.in_features) for b in blocks], data, max_batches)
    return [neuron_weight_norms(b.mlp.c_fc.weight, b.mlp.c_proj.weight) for b in blocks]


def shrink(model: nn.Module, keep_heads: Sequence[torch.Tensor] | None = None, keep_ffn: Sequence[torch.Tensor] | None = None) -> nn.Module:
    """Build a new, smaller GPT that keeps only the given heads and FFN neurons of each layer.

    The input model is not changed. The new model has ``config.layer_heads``/``config.layer_ffn``
    set, so ``labkit.checkpoint.save``/``load`` round-trip it.
    """
    blocks = _blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    heads, ffn = [], []
    for i, b in enumerate(blocks):
        attn, mlp = b.attn, b.mlp
        h, hd = int(attn.n_head), _head_dim(attn)
        kh = torch.arange(h) if keep_heads is None else torch.as_tensor(keep_heads[i], dtype=torch.long)
        if kh.numel() == 0 or int(kh.max()) >= h or int(kh.min()) < 0:
            raise ValueError(f"layer {i}: keep at least one head, with indices in [0, {h}); got {kh.tolist()}")
        p = names[id(attn.c_attn)]
        w = state[f"{p}.weight"]
        state[f"{p}.weight"] = w.view(3, h, hd, -1)[:, kh].reshape(3 * len(kh) * hd, -1).clone()
        if f"{p}.bias" in state:
            state[f"{p}.bias"] = state[f"{p}.bias"].view(3, h, hd)[:, kh].reshape(-1).clone()
        p = names[id(attn.c_proj)]
        w = state[f"{p}.weight"]
        state[f"{p}.weight"] = w.view(w.shape[0], h, hd)[:, kh].reshape(w.shape[0], -1).clone()
        heads.append(len(kh))

        f = mlp.c_fc.out_features
        kf = torch.arange(f) if keep_ffn is None else torch.as_tensor(keep_ffn[i], dtype=torch.long)
        if kf.numel() == 0 or int(kf.max()) >= f or int(kf.min()) < 0:
            raise ValueError(f"layer {i}: keep at least one FFN neuron, with indices in [0, {f}); got {len(kf)} indices")
        p = names[id(mlp.c_fc)]
        state[f"{p}.weight"] = state[f"{p}.weight"][kf].clone()
        if f"{p}.bias" in state:
            state[f"{p}.bias"] = state[f"{p}.bias"][kf].clone()
        p = names[id(mlp.c_proj)]
        state[f"{p}.weight"] = state[f"{p}.weight"][:, kf].clone()
        ffn.append(len(kf))

    config = dataclasses.replace(
        model.config, head_dim=_head_dim(blocks[0].attn), layer_heads=tuple(heads), layer_ffn=tuple(ffn)
    )
    ref = next(model.parameters())
    small = type(model)(config)
    small.load_state_dict(state)
    small.to(device=ref.device, dtype=ref.dtype)
    small.train(model.training)
    return small


def prune_heads(model: nn.Module, amount: float, importance: str = "magnitude", data: object = None,
                scope: str = "global", max_batches: int | None = 8, normalize: bool | None = None) -> nn.Module:
    """Remove the ``amount`` fraction of least important attention heads; returns a new smaller model.

    Works on a labkit GPT, and on a Hugging Face BERT (then ``data`` is a tokenizer batch; see
    ``labkit.prune.bert``). ``importance`` is ``"magnitude"`` or ``"gradient"`` (needs ``data``).
    ``normalize`` (default: True for gradient importance) L2-normalises each layer's scores before a global ranking.
    """
    if not hasattr(model, "transformer"):

        if is_bert(model):
            return prune_bert(model, amount, importance=importance, batch=data, scope=scope, normalize=normalize)
    scores = head_importance(model, importance, data, max_batches)
    return shrink(model, keep_heads=select(scores, amount, scope, normalize=wants_normalize(importance, normalize)))


def prune_ffn(model: nn.Module, amount: float, importance: str = "magnitude", data: object = None,
              scope: str = "layer", max_batches: int | None = 8, normalize: bool | None = None) -> nn.Module:
    """Remove the ``amount`` fraction of least important FFN neurons; returns a new smaller GPT.

    ``normalize`` as in ``prune_heads`` (it matters only for ``scope="global"``)."""
    scores = ffn_importance(model, importance, data, max_batches)
    return shrink(model, keep_ffn=select(scores, amount, scope, normalize=wants_normalize(importance, normalize)))


def prune_structured(model: nn.Module, amount: float, importance: str = "magnitude", data: object = None,
                     max_batches: int | None = 8, normalize: bool | None = None) -> nn.Module:
    """Remove ``amount`` of the heads (ranked globally, ``normalize`` as in ``prune_heads``) and
    ``amount`` of the FFN neurons of every layer, in one step."""
    check_amount(amount)
    heads = select(head_importance(model, importance, data, max_batches), amount, "global",
                   normalize=wants_normalize(importance, normalize))
    ffn = select(ffn_importance(model, importance, data, max_batches), amount, "layer")
    return shrink(model, keep_heads=heads, keep_ffn=ffn)


def structured_size(model: nn.Module) -> dict[str, int]:
    """Heads, FFN neurons and parameters of a GPT, to compare before and after."""
    blocks = _blocks(model)
    return {
        "heads": sum(int(b.attn.n_head) for b in blocks),
        "ffn": sum(b.mlp.c_fc.out_features for b in blocks),
        "params": sum(p.numel() for p in model.parameters()),
    }
