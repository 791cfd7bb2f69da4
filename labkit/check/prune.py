"""Checkers for the pruning exercises: a magnitude mask, one threshold for the whole model, a
head-removal mask, and removing heads from a GPT.

``check(name, fn, seed=None)`` runs the learner's function on fresh random inputs (``seed`` makes a
run reproducible; the message names it) and says what is wrong: kept the small weights, forgot the
absolute value, pruned per layer instead of across the model, removed the most important heads,
zeroed the wrong axis or a strided slice of heads... ``solution(name)`` returns a reference
solution's source, only when asked for.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from labkit.check import Result, attempt, checker_book, correct, mistake, solution_book


def _gen(seed: int | None) -> tuple[torch.Generator, int]:
    seed = int(torch.randint(0, 2**31, ())) if seed is None else int(seed)
    return torch.Generator().manual_seed(seed), seed


def _bool_mask(got: object, shape: tuple[int, ...], what: str) -> torch.Tensor | Result:
    """The learner's mask as a bool tensor, or the mistake (wrong type, shape or dtype)."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(shape):
        have = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return mistake("shape", f"return a tensor shaped like the {what} {tuple(shape)}, got {have}")
    if got.dtype == torch.bool:
        return got
    if got.dtype.is_floating_point and set(got.unique().tolist()) <= {0.0, 1.0}:
        return got.bool()
    return mistake("dtype", "return a boolean mask (True = keep)")


def reference_magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep-mask (True = keep) that drops the ``round(amount * n)`` smallest |w|."""
    k = round(amount * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    if k > 0:
        smallest = torch.topk(weight.abs().flatten(), k, largest=False).indices
        mask[smallest] = False
    return mask.view_as(weight)


def reference_global_masks(weights: list[torch.Tensor], amount: float) -> list[torch.Tensor]:
    """Keep-masks for several layers that drop the ``round(amount * total)`` smallest |w| of all of them."""
    flat = torch.cat([w.abs().flatten() for w in weights])   # all layers in one ranking
    k = round(amount * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, largest=False).indices] = False
    return [m.view_as(w) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


def reference_head_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask ``(n_layer, n_head)`` that removes the ``k`` heads with the lowest scores in the whole model."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep.view_as(scores)


def reference_zero_heads(model: torch.nn.Module, keep: torch.Tensor) -> None:
    """Remove heads in place: zero the input columns of each layer's ``attn.c_proj`` that the dropped heads feed."""
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            d = block.attn.head_dim          # head h wrote columns h*d .. (h+1)*d-1 of c_proj's input
            for h in torch.nonzero(~keep[layer]).flatten().tolist():
                block.attn.c_proj.weight[:, h * d:(h + 1) * d] = 0


def _check_magnitude_mask(fn: Callable[[torch.Tensor, float], torch.Tensor], seed: int | None = None) -> Result:
    """Check ``fn(weight, amount) -> bool mask`` (True = keep) against magnitude pruning."""
    g, seed = _gen(seed)
    on = f"(seed {seed})"
    for _ in range(3):
        shape = tuple(int(n) for n in torch.randint(4, 17, (2,), generator=g))
        amount = round(float(torch.empty(()).uniform_(0.2, 0.8, generator=g)), 2)
        w = torch.randn(shape, generator=g)
        before = w.clone()
        got = attempt(fn, w, amount, on=f"a {shape} weight, amount={amount}, seed {seed}")
        if not torch.equal(w, before):
            return mistake("modified_input", f"your function changed the weight; build a mask and leave the weight alone {on}")
        got = _bool_mask(got, shape, "weight")
        if isinstance(got, Result):
            return got
        k = round(amount * w.numel())
        pruned = int((~got).sum())
        want = reference_magnitude_mask(w, amount)
        kept, gone = w.abs()[got], w.abs()[~got]
        if kept.numel() and gone.numel() and kept.max() <= gone.min():
            return mistake("inverted", f"your mask keeps the smallest weights: True must mark the weights to *keep* {on}")
        if pruned != k:
            return mistake("count", f"amount={amount} of {w.numel()} weights means pruning {k}; your mask prunes {pruned} {on}",
                           expected=k, got=pruned, seed=seed)
        if not torch.equal(got, want):
            signed = torch.ones(w.numel(), dtype=torch.bool)
            signed[torch.topk(w.flatten(), k, largest=False).indices] = False
            if torch.equal(got, signed.view_as(w)):
                return mistake("no_abs", f"you ranked by signed value, so large negative weights were pruned: rank by |w| {on}")
            return mistake("wrong_weights", f"the count is right but some kept weights are smaller in |w| than pruned ones {on}")
    return correct(f"magnitude mask correct: the smallest |w| go, the right count, input untouched (seed {seed})", seed=seed)


def _check_global_masks(fn: Callable[[list[torch.Tensor], float], list[torch.Tensor]], seed: int | None = None) -> Result:
    """Check ``fn(weights, amount) -> one bool mask per weight`` that prunes by one threshold across all layers."""
    g, seed = _gen(seed)
    on = f"(seed {seed})"
    for _ in range(3):
        n = int(torch.randint(2, 5, (), generator=g))
        # layers of different sizes and scales: a global cut then takes more from the small-weight layers
        scales = [0.05, 0.2, 1.0, 3.0][:n]
        weights = [torch.randn(tuple(int(s) for s in torch.randint(3, 12, (2,), generator=g)), generator=g) * scales[i]
                   for i in range(n)]
        amount = round(float(torch.empty(()).uniform_(0.3, 0.7, generator=g)), 2)
        before = [w.clone() for w in weights]
        got = attempt(fn, list(weights), amount, on=f"{n} layers, amount={amount}, seed {seed}")
        if not all(torch.equal(a, b) for a, b in zip(weights, before)):
            return mistake("modified_input", f"your function changed a weight; build masks and leave the weights alone {on}")
        if not isinstance(got, (list, tuple)) or len(got) != n:
            return mistake("length", f"return one mask per weight ({n} of them, in the same order), got "
                                     f"{len(got) if isinstance(got, (list, tuple)) else type(got).__name__} {on}")
        masks = []
        for w, m in zip(weights, got):
            m = _bool_mask(m, tuple(w.shape), "weight it belongs to")
            if isinstance(m, Result):
                return m
            masks.append(m)
        want = reference_global_masks(weights, amount)
        if all(torch.equal(a, b) for a, b in zip(masks, want)):
            continue
        total = sum(w.numel() for w in weights)
        k = round(amount * total)
        pruned = sum(int((~m).sum()) for m in masks)
        if all(torch.equal(a, reference_magnitude_mask(w, amount)) for a, w in zip(masks, weights)):
            return mistake("per_layer", f"you took amount={amount} from every layer separately; here all layers are "
                                        f"ranked together, so a layer of small weights loses more than its share {on}")
        if all(torch.equal(a, ~b) for a, b in zip(masks, want)):
            return mistake("inverted", f"your masks keep the smallest weights: True must mark the weights to *keep* {on}")
        if pruned != k:
            return mistake("count", f"amount={amount} of {total} weights in all means pruning {k} in all; yours prune "
                                    f"{pruned} {on}", expected=k, got=pruned, seed=seed)
        flat = torch.cat([w.flatten() for w in weights])
        signed = torch.ones(total, dtype=torch.bool)
        signed[torch.topk(flat, k, largest=False).indices] = False
        if torch.equal(torch.cat([m.flatten() for m in masks]), signed):
            return mistake("no_abs", f"you ranked by signed value, so large negative weights were pruned: rank by |w| {on}")
        return mistake("wrong_weights", f"the count is right, but some kept weights are smaller in |w| than pruned "
                                        f"ones in another layer: use one threshold for all layers {on}")
    return correct(f"global masks correct: one |w| threshold for all layers (seed {seed})", seed=seed)


def _check_head_mask(fn: Callable[[torch.Tensor, int], torch.Tensor], seed: int | None = None) -> Result:
    """Check ``fn(scores (n_layer, n_head), k) -> bool keep-mask`` that removes the k least important heads overall."""
    g, seed = _gen(seed)
    on = f"(seed {seed})"
    for _ in range(3):
        n_layer, n_head = int(torch.randint(2, 5, (), generator=g)), int(torch.randint(3, 9, (), generator=g))
        # layers on different scales, so removing k overall differs from removing the same count per layer
        scores = torch.rand(n_layer, n_head, generator=g) * torch.logspace(-1, 1, n_layer)[:, None]
        scores = scores[torch.randperm(n_layer, generator=g)]
        k = int(torch.randint(n_layer, n_layer * n_head // 2 + 1, (), generator=g))
        before = scores.clone()
        got = attempt(fn, scores, k, on=f"scores of shape {(n_layer, n_head)}, k={k}, seed {seed}")
        if not torch.equal(scores, before):
            return mistake("modified_input", f"your function changed the scores; build a mask and leave them alone {on}")
        got = _bool_mask(got, (n_layer, n_head), "scores")
        if isinstance(got, Result):
            return got
        want = reference_head_mask(scores, k)
        if torch.equal(got, want):
            continue
        removed = int((~got).sum())
        if torch.equal(got, reference_head_mask(-scores, k)) or torch.equal(got, ~want):
            return mistake("most_important", f"your mask removes the *most* important heads (or keeps the ones to "
                                              f"remove): the heads with the lowest scores go, and True means keep {on}")
        per_layer = torch.ones_like(got)
        for i in range(n_layer):
            per_layer[i, torch.topk(scores[i], min(k, n_head), largest=False).indices] = False
        if torch.equal(got, per_layer):
            return mistake("per_layer", f"you removed {k} heads in every layer; remove {k} heads in the whole model, "
                                        f"ranked across layers {on}")
        if removed != k:
            return mistake("count", f"k={k}: the mask must remove {k} heads in all; yours removes {removed} {on}",
                           expected=k, got=removed, seed=seed)
        return mistake("wrong_heads", f"you remove {k} heads, but not the {k} lowest-scoring ones of the whole model {on}")
    return correct(f"head mask correct: the k lowest-scoring heads of the whole model go (seed {seed})", seed=seed)


def _tiny_gpt(g: torch.Generator) -> torch.nn.Module:
    from labkit.model import GPT, GPTConfig

    n_head = int(torch.randint(2, 5, (), generator=g))
    head_dim = int(torch.tensor([4, 6, 8])[torch.randint(0, 3, (), generator=g)])
    cfg = GPTConfig(n_layer=int(torch.randint(2, 4, (), generator=g)), n_head=n_head, n_embd=n_head * head_dim,
                    block_size=16, vocab_size=40, precision="float32")
    with torch.random.fork_rng():   # the learner's global random state stays as it was
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
        return GPT(cfg).eval()


def _head_columns(model: torch.nn.Module, layer: int, heads: Sequence[int], strided: bool = False) -> list[int]:
    attn = model.transformer.h[layer].attn
    h, d = int(attn.n_head), int(attn.head_dim)
    return [c for j in heads for c in (range(j, h * d, h) if strided else range(j * d, (j + 1) * d))]


def _check_zero_heads(fn: Callable[[torch.nn.Module, torch.Tensor], object], seed: int | None = None) -> Result:
    """Check ``fn(model, keep)``, which removes heads in place, on fresh random GPTs: the model must compute
    what labkit's smaller model (``shrink``) with only the kept heads computes."""
    from labkit.prune import shrink

    g, seed = _gen(seed)
    on = f"(seed {seed})"
    for _ in range(2):
        model = _tiny_gpt(g)
        n_layer, n_head = model.config.n_layer, model.config.n_head
        keep = torch.rand(n_layer, n_head, generator=g) > 0.5
        keep[torch.arange(n_layer), torch.randint(0, n_head, (n_layer,), generator=g)] = True   # >= 1 head each
        pair = torch.randperm(n_head, generator=g)[:2]
        keep[0, pair[0]], keep[0, pair[1]] = True, False                                     # layer 0: both kinds
        x = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        with torch.no_grad():
            want = shrink(model, keep_heads=[torch.nonzero(k).flatten() for k in keep])(x)[0]
        mine = copy.deepcopy(model)
        attempt(fn, mine, keep.clone(), on=f"a GPT with {n_layer} layers of {n_head} heads, seed {seed}")
        with torch.no_grad():
            got = mine(x)[0]
        if torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            continue
        with torch.no_grad():
            if torch.allclose(got, model(x)[0], atol=1e-6):
                return mistake("unchanged", f"the model computes what it did before: change its weights in place "
                                            f"(under torch.no_grad()) {on}")
        w = mine.transformer.h[0].attn.c_proj.weight
        zero_cols = [c for c in range(w.shape[1]) if bool((w[:, c] == 0).all())]
        zero_rows = [r for r in range(w.shape[0]) if bool((w[r] == 0).all())]
        dropped = torch.nonzero(~keep[0]).flatten().tolist()
        kept = torch.nonzero(keep[0]).flatten().tolist()
        if zero_cols == _head_columns(model, 0, kept):
            return mistake("inverted", f"you zeroed the heads to keep: False in keep marks a head to remove {on}")
        if sorted(zero_cols) == sorted(_head_columns(model, 0, dropped, strided=True)):
            return mistake("strided", f"head j's outputs are not every n_head-th column: after the heads are "
                                      f"concatenated, head j owns one contiguous block of head_dim columns {on}")
        if zero_rows and not zero_cols:
            return mistake("wrong_axis", f"you zeroed rows of c_proj.weight: rows are its *outputs* (the model "
                                         f"width); the heads feed its *input*, the columns {on}")
        if zero_cols == _head_columns(model, 0, dropped):
            return mistake("other_layers", f"layer 0 is right, but another layer's heads are off: use each layer's "
                                           f"own row of keep {on}")
        return mistake("wrong", f"the model does not compute what a model without the removed heads computes; the "
                                f"dropped heads' contribution must vanish, all else unchanged {on}")
    return correct(f"heads removed: the model computes exactly what the smaller model without them does (seed {seed})",
                   seed=seed)


check = checker_book("pruning", {"magnitude_mask": _check_magnitude_mask, "global_masks": _check_global_masks,
                                 "head_mask": _check_head_mask, "zero_heads": _check_zero_heads})
EXERCISES = check.names


solution = solution_book("pruning", {"magnitude_mask": reference_magnitude_mask,
                                     "global_masks": reference_global_masks,
                                     "head_mask": reference_head_mask,
                                     "zero_heads": reference_zero_heads})
