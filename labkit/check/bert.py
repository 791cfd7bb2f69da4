"""Checker for the BERT exercise: recompute one head of the real model's attention from its own weights.

``check("head_attention", fn, model=None, tokenizer=None, seed=None)`` tokenizes a fresh batch of
sentences of different lengths (so there is padding), picks fresh random (layer, head) pairs, calls
``fn(model, hidden, mask, layer, head)`` with ``hidden`` = the model's ``output_hidden_states`` and
``mask`` = the tokenizer's ``attention_mask``, and compares the result with the probabilities the
model itself returns (``output_attentions``). A wrong answer is matched against the usual mistakes
(the layer's output instead of its input, a strided head slice, no 1/sqrt(d_k), padding not masked,
...) and the first one is named. Without a model, the packaged all-MiniLM-L6-v2 is used.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Callable

import torch

from labkit.check import Result, attempt, checker_book, correct, mistake, solution_book

TOL = 1e-5  # float32 rounding of the same sums in a different order stays far below this

SENTENCES = (
    "The cat sat on the mat.",
    "Attention is all you need.",
    "A kitten naps on the warm couch all afternoon.",
    "Shares dropped sharply at the exchange today.",
    "Slurm gives each job its own nodes.",
    "The workers read their shards from shared storage and tokenize them in parallel.",
    "Hi.",
    "Pruning removes the weights that matter least.",
    "She opened the archive, found the file and compressed it again.",
    "Every layer mixes the tokens with attention, then transforms each one alone.",
    "Rain again.",
    "The model was trained to put similar sentences close together.",
    "Why does the softmax saturate without the scale?",
    "Padding makes every sentence in a batch the same length.",
)

# The mistakes the checker recognises, in the order they are named (the first one found is reported):
# tag -> message, formatted with {layer}, {head}, {d_k}, {n_head}
_MISTAKES: dict[str, str] = {
    "layer_output": "these are the weights layer {layer} would compute from the hidden states that LEAVE it, "
                    "not the ones that enter it; look again at what hidden_states[0] holds",
    "strided_heads": "head {head} is not one channel in every {n_head} (a strided slice): the query/key Linear lays "
                     "its output out head by head, each head one contiguous block of d_k = {d_k} channels "
                     "(as split_heads in 04)",
    "not_transposed": "the projection uses the weight the wrong way round: nn.Linear stores weight as "
                      "(out_features, in_features); calling the layer itself avoids the question",
    "missing_bias": "the projection leaves out the bias: BERT's query and key Linear layers have one",
    "missing_scale": "the scores are not scaled, so the softmax is far too peaked; what does the formula divide "
                     "Q K^T by?",
    "wrong_scale": "wrong scale: the scores are scaled, but not by the formula's factor; d_k there is the "
                   "size of ONE head ({d_k}), and look at the root",
    "mask_ignored": "padded keys get weight: in the shorter sentences, [PAD] tokens are attended to; the mask "
                    "is 1 for a real token, 0 for padding, and no query may attend to a padded key",
    "mask_inverted": "the mask is the wrong way round: it hides the real tokens and leaves the padding "
                     "(the tokenizer's attention_mask is 1 for a real token, 0 for padding)",
    "mask_on_queries": "the mask is applied along the queries, not the keys: it must hide padded KEYS "
                       "(the columns, the last axis of the scores) for every query",
    "wrong_axis": "softmax over the wrong axis (the queries): each query's row of weights over the keys must sum to 1",
}


def _gen_seed(seed: int | None) -> int:
    return random.SystemRandom().randrange(2**31) if seed is None else int(seed)


def _batch(tokenizer, rng: random.Random) -> dict[str, torch.Tensor]:
    """Three sentences of different token lengths, shuffled: padding in at least two rows."""
    by_len: dict[int, str] = {}
    for s in rng.sample(SENTENCES, len(SENTENCES)):
        by_len.setdefault(len(tokenizer(s)["input_ids"]), s)
    texts = rng.sample(list(by_len.values()), 3)
    return tokenizer(texts, return_tensors="pt", padding=True)


def _variant(model, hidden, mask, layer: int, head: int, *, layer_output=False, strided_heads=False,
             not_transposed=False, missing_bias=False, scale="ok", mask_mode="keys", wrong_axis=False,
             cache: dict | None = None):
    """One head's attention probabilities (B, T, T), computed right or with the named mistakes;
    ``cache`` keeps the projections between calls (the diagnosis tries every combination)."""
    cfg = model.config
    n_head, c = cfg.num_attention_heads, cfg.hidden_size
    d_k = c // n_head
    sa = model.encoder.layer[layer].attention.self
    x = hidden[layer + 1 if layer_output else layer]

    def project(linear):
        w = linear.weight if not_transposed else linear.weight.T
        y = x @ w + (0 if missing_bias else linear.bias)
        return y[..., head::n_head] if strided_heads else y[..., head * d_k:(head + 1) * d_k]

    key = (layer_output, strided_heads, not_transposed, missing_bias)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = project(sa.query) @ project(sa.key).transpose(-2, -1)
    scores = cache[key]
    scores = scores * {"ok": 1 / math.sqrt(d_k), "none": 1.0, "hidden": 1 / math.sqrt(c), "d_k": 1 / d_k}[scale]
    real = mask.bool()
    if mask_mode == "keys":
        scores = scores.masked_fill(~real[:, None, :], float("-inf"))
    elif mask_mode == "inverted":
        scores = scores.masked_fill(real[:, None, :], float("-inf"))
    elif mask_mode == "queries":
        scores = scores.masked_fill(~real[:, :, None], float("-inf"))
    return torch.softmax(scores, dim=-2 if wrong_axis else -1)


def _variants():
    """Every combination of mistakes, with the tags it stands for (fewest mistakes first)."""
    axes = {"layer_output": (False, True), "strided_heads": (False, True), "not_transposed": (False, True),
            "missing_bias": (False, True), "scale": ("ok", "none", "hidden", "d_k"),
            "mask_mode": ("keys", "none", "inverted", "queries"), "wrong_axis": (False, True)}
    tag_of = {("scale", "none"): "missing_scale", ("scale", "hidden"): "wrong_scale", ("scale", "d_k"): "wrong_scale",
              ("mask_mode", "none"): "mask_ignored",
              ("mask_mode", "inverted"): "mask_inverted", ("mask_mode", "queries"): "mask_on_queries"}
    combos = []
    for values in itertools.product(*axes.values()):
        kw = dict(zip(axes, values))
        tags = [tag_of.get((k, v), k if v is True else None) for k, v in kw.items()]
        tags = [t for t in tags if t]
        if tags:
            combos.append((sorted(tags, key=list(_MISTAKES).index), kw))
    return sorted(combos, key=lambda c: len(c[0]))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float32 rounding; NaN where the other has NaN (a fully masked row) counts as equal."""
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=TOL, rtol=0, equal_nan=True))


def _diagnose(got, model, hidden, mask, layer, head, where: str) -> Result:
    cfg = model.config
    fmt = {"layer": layer, "head": head, "n_head": cfg.num_attention_heads,
           "d_k": cfg.hidden_size // cfg.num_attention_heads}
    cache: dict = {}
    for tags, kw in _variants():
        if _close(got, _variant(model, hidden, mask, layer, head, cache=cache, **kw)):
            more = len(tags) - 1
            rest = f" (then {more} more thing{'s' * (more > 1)} to fix)" if more else ""
            return mistake(tags[0], _MISTAKES[tags[0]].format(**fmt) + where + rest, mistakes=tags)
    if torch.isnan(got).any():
        return mistake("nan", f"NaN in your weights{where}: a row whose scores are all -inf has no softmax; "
                              "which keys does your mask hide? (1 = real token, 0 = padding)")
    if not torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-4):
        return mistake("not_normalised", f"the rows of your weights do not sum to 1{where}: these are scores, "
                                         "not probabilities; the softmax over the keys is missing")
    want = _variant(model, hidden, mask, layer, head)
    return mistake("values", f"wrong values{where}: max difference {(got - want).abs().max():.3g} from the "
                             "model's own weights")


@torch.no_grad()
def _check_head_attention(fn: Callable, model: Any = None, tokenizer: Any = None, seed: int | None = None) -> Result:
    """Check ``fn(model, hidden, mask, layer, head)`` = the model's own attention probabilities (B, T, T) of that head."""
    if model is None or tokenizer is None:
        from labkit.pretrained import default_bert

        model, tokenizer = default_bert()
    seed = _gen_seed(seed)
    rng = random.Random(seed)
    cfg = model.config
    n_layer, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    batch = _batch(tokenizer, rng)
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    if not out.attentions:
        return mistake("sdpa_model", "this model returns no attention probabilities (output_attentions gives "
                                     "nothing): load it with attn_implementation='eager', as load_bert() does")
    hidden, mask = out.hidden_states, batch["attention_mask"]
    first = rng.randrange(n_layer)
    pairs = [(first, rng.randrange(n_head)),
             (rng.choice([i for i in range(n_layer) if i != first]), rng.randrange(n_head))]
    worst = 0.0
    for layer, head in pairs:
        where = f" (layer {layer}, head {head}, seed {seed})"
        got = attempt(fn, model, hidden, mask, layer, head, on=f"layer {layer}, head {head}")
        want = out.attentions[layer][:, head]
        if not isinstance(got, torch.Tensor):
            return mistake("type", f"return a torch.Tensor of weights, got {type(got).__name__}")
        got = got.detach().float()
        b, t = mask.shape
        if got.shape != want.shape:
            if got.shape == (b, n_head, t, t):
                return mistake("all_heads", f"you return every head's weights {tuple(got.shape)}; the exercise "
                                            f"asks for head {head} only: (batch, T, T) = {tuple(want.shape)}")
            return mistake("shape", f"wrong shape{where}: got {tuple(got.shape)}, expected (batch, T_query, T_key) "
                                    f"= {tuple(want.shape)}")
        if not _close(got, want):
            return _diagnose(got, model, hidden, mask, layer, head, where)
        worst = max(worst, float((got - want).abs().max()))
    checked = ", ".join(f"layer {la} head {h}" for la, h in pairs)
    return correct(f"your weights are the model's own: {checked} on {b} sentences with padding; largest "
                   f"difference from output_attentions {worst:.1e} (seed {seed})", max_abs_diff=worst, seed=seed)


check = checker_book("bert", {"head_attention": _check_head_attention})
EXERCISES = check.names


# --------------------------------------------------------------------------------------- solutions
def _solution_head_attention(model, hidden, mask, layer, head):
    sa = model.encoder.layer[layer].attention.self
    d_k = model.config.hidden_size // model.config.num_attention_heads
    x = hidden[layer]  # hidden[0] = embeddings = the input of layer 0; hidden[i] = the input of layer i
    cols = slice(head * d_k, (head + 1) * d_k)  # head h owns channels h*d_k .. (h+1)*d_k - 1
    q, k = sa.query(x)[..., cols], sa.key(x)[..., cols]  # (B, T, d_k)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (B, T, T)
    scores = scores.masked_fill(mask[:, None, :] == 0, float("-inf"))  # no query sees a padded key
    return torch.softmax(scores, dim=-1)


_SOLUTIONS = {"head_attention": _solution_head_attention}

solution = solution_book("bert", _SOLUTIONS)


def solution_function(name: str) -> Callable:
    """The reference solution as a function (used by the tests)."""
    if name not in _SOLUTIONS:
        raise ValueError(f"no solution named {name!r}; valid choices: {', '.join(EXERCISES)}")
    return _SOLUTIONS[name]
