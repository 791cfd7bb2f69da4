"""Head pruning on the pretrained MiniLM (a BERT): which heads can go, and what it costs.

Quality is measured the way an embedding model is used: mean-pooled sentence embeddings of the
pruned model against the unpruned one, cosine similarity per sentence on a fixed sentence set.

transformers 5 no longer ships ``PreTrainedModel.prune_heads``; the same surgery is done here with
transformers' own ``prune_linear_layer`` on the query/key/value rows and output-projection columns
of each head, which is exactly what ``prune_heads`` used to do.
"""

from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from labkit.pretrained import load_bert, mean_pool

from .importance import check_importance, gated, head_weight_norms, select, wants_normalize
from .unstructured import check_amount

# A fixed, varied sentence set (written for labkit): quality is judged on these.
SENTENCES: tuple[str, ...] = (
    "The cluster scheduler queued the job until two GPUs were free.",
    "A transformer layer mixes tokens with attention and then applies a feed-forward network.",
    "She pruned the apple tree in early spring so it would bear more fruit.",
    "Pruning removes weights that contribute little to the output of a network.",
    "The train to Zurich was delayed by twenty minutes because of snow.",
    "Gradient descent takes small steps against the slope of the loss.",
    "My grandmother bakes bread every Sunday morning.",
    "The compiler reported a syntax error on line forty-two.",
    "Sparse matrices store only their nonzero entries and their positions.",
    "The museum reopened after a long renovation of its east wing.",
    "Each attention head can learn to follow a different relation between words.",
    "Heavy rain flooded the streets of the old town overnight.",
    "A smaller model answers faster and costs less to serve.",
    "The orchestra tuned their instruments before the concert began.",
    "Python's standard library ships modules for files, networks and dates.",
    "He forgot his umbrella and got soaked on the way to work.",
    "Fine-tuning after pruning lets the remaining weights compensate.",
    "The recipe calls for two eggs, flour, sugar and a pinch of salt.",
    "Latency is the time one request takes; throughput is how many finish per second.",
    "The hikers reached the summit just before the clouds rolled in.",
    "A language model predicts the next token from the ones before it.",
    "The library extended its opening hours during the exam period.",
    "Distributed training splits each batch across several workers.",
    "The cat slept on the warm windowsill all afternoon.",
)


CALIBRATION_MODULES = (
    "json", "csv", "heapq", "bisect", "textwrap", "difflib", "statistics", "fractions", "decimal", "random",
    "shutil", "glob", "fnmatch", "tempfile", "zipfile", "gzip", "sqlite3", "logging", "argparse", "calendar",
    "datetime", "pickle", "queue", "sched", "socket", "string", "struct", "threading", "uuid", "zlib",
    "tarfile", "pprint", "contextlib", "functools", "abc", "copy", "inspect", "typing",
)


def calibration_sentences(modules: Sequence[str] = CALIBRATION_MODULES, max_chars: int = 300) -> list[str]:
    """First sentences of standard-library module docstrings: real text, offline, and disjoint from
    ``SENTENCES``, so head importance is not estimated on the sentences it is judged on."""
    out = []
    for name in modules:
        try:
            doc = importlib.import_module(name).__doc__ or ""
        except ImportError:
            continue
        text = " ".join(doc.split())
        first = re.split(r"(?<=\.)\s", text)[0] if text else ""
        if len(first) > 20:
            out.append(first[:max_chars])
    return out


def is_bert(model: nn.Module) -> bool:
    """True for a Hugging Face BERT-like encoder (``encoder.layer[i].attention.self.query``)."""
    try:
        model.encoder.layer[0].attention.self.query
    except (AttributeError, IndexError, TypeError):
        return False
    return True


def _layers(model: nn.Module) -> list[nn.Module]:
    if not is_bert(model):
        raise TypeError(f"{type(model).__name__} is not a BERT encoder (no encoder.layer[i].attention.self)")
    return list(model.encoder.layer)


def load_minilm() -> tuple[nn.Module, Any]:
    """The packaged all-MiniLM-L6-v2 (BertModel, tokenizer), offline, in eval mode (``labkit.pretrained``)."""
    model, tokenizer = load_bert(attn_implementation="sdpa")
    return model.eval(), tokenizer


def tokenize(tokenizer: Any, sentences: Sequence[str] = SENTENCES, max_length: int = 64) -> dict[str, torch.Tensor]:
    """A padded batch of the sentences, ready for ``model(**batch)``."""
    if isinstance(sentences, str) or not sentences:
        raise ValueError("give a non-empty list of sentences")
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def embed(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled sentence embeddings (padding excluded), one row per sentence."""
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def heads_per_layer(model: nn.Module) -> list[int]:
    """How many attention heads each layer has now."""
    return [layer.attention.self.query.out_features // layer.attention.self.attention_head_size for layer in _layers(model)]


def bert_head_importance(model: nn.Module, importance: str = "magnitude", batch: Mapping[str, torch.Tensor] | None = None,
                         draws: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Importance of every head of a BERT, one tensor per layer.

    ``magnitude``: norm of the head's q/k/v rows and output columns. ``gradient``: |dL/dg| of a
    gate on each head, per sentence, averaged over sentences and draws (Michel et al. 2019). An
    embedding model has no task loss, so L projects each sentence embedding on random directions
    orthogonal to it: |dL/dg| then estimates how far removing the head would turn the embeddings,
    which is what cosine similarity measures.
    """
    check_importance(importance)
    layers = _layers(model)
    heads = heads_per_layer(model)
    if importance == "magnitude":
        out = []
        for layer, h in zip(layers, heads):
            s = layer.attention.self
            out.append(head_weight_norms((s.query.weight, s.key.weight, s.value.weight), layer.attention.output.dense.weight, h))
        return out
    if batch is None:
        raise ValueError("importance='gradient' needs batch=tokenize(tokenizer, sentences)")
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with gated([(layer.attention.output.dense, h) for layer, h in zip(layers, heads)]) as gates:
            for _ in range(draws):
                e = embed(model, batch)
                unit = (e / e.norm(dim=1, keepdim=True)).detach()
                r = torch.randn(e.shape, generator=gen)
                r = r - (r * unit).sum(1, keepdim=True) * unit  # orthogonal to each embedding
                r = r / r.norm(dim=1, keepdim=True)
                loss = (e / e.norm(dim=1, keepdim=True).detach() * r).sum()  # a sum of per-sentence losses
                loss.backward()
                gates.accumulate()
            return gates.mean()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def prune_bert_heads(model: nn.Module, keep: Sequence[torch.Tensor]) -> nn.Module:
    """Physically remove heads in place, keeping ``keep[i]`` (head indices) in layer ``i``."""
    # lazy: transformers (~1 s import); labkit.prune loads this module for GPT pruning too
    from transformers.pytorch_utils import prune_linear_layer

    layers = _layers(model)
    if len(keep) != len(layers):
        raise ValueError(f"keep has {len(keep)} entries; the model has {len(layers)} layers")
    for i, (layer, kept) in enumerate(zip(layers, keep)):
        s = layer.attention.self
        d = s.attention_head_size
        h = s.query.out_features // d
        kept = torch.as_tensor(kept, dtype=torch.long)
        if kept.numel() == 0 or int(kept.max()) >= h or int(kept.min()) < 0:
            raise ValueError(f"layer {i}: keep at least one head, with indices in [0, {h}); got {kept.tolist()}")
        if kept.numel() == h:
            continue
        index = (kept[:, None] * d + torch.arange(d)).reshape(-1)
        s.query = prune_linear_layer(s.query, index)
        s.key = prune_linear_layer(s.key, index)
        s.value = prune_linear_layer(s.value, index)
        layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, index, dim=1)
        s.num_attention_heads = kept.numel()
        s.all_head_size = kept.numel() * d
    return model


def prune_bert(model: nn.Module, amount: float, importance: str = "magnitude", batch: Mapping[str, torch.Tensor] | None = None,
               scope: str = "global", scores: Sequence[torch.Tensor] | None = None,
               normalize: bool | None = None) -> nn.Module:
    """A copy of the BERT with the ``amount`` fraction of least important heads removed.

    ``normalize`` (default: True for gradient importance) L2-normalises each layer's scores before a global ranking."""
    check_amount(amount)
    if scores is None:
        scores = bert_head_importance(model, importance, batch)
    return prune_bert_heads(copy.deepcopy(model), select(scores, amount, scope, normalize=wants_normalize(importance, normalize)))


@dataclass(frozen=True)
class HeadPoint:
    """One point of the head-pruning curve of a BERT."""

    amount: float
    heads_pruned: int
    heads_left: int
    params: int
    cosine_mean: float
    cosine_min: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.inference_mode()
def _cosines(model: nn.Module, batch: Mapping[str, torch.Tensor], reference: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(embed(model, batch), reference, dim=1)


def head_curve(model: nn.Module, tokenizer: Any, amounts: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
               importance: str = "gradient", sentences: Sequence[str] = SENTENCES,
               calibration: Sequence[str] | None = None, scope: str = "global", draws: int = 16,
               normalize: bool | None = None) -> list[HeadPoint]:
    """Prune ever more heads (by one importance ranking) and measure embedding cosine to the original.

    Gradient importance is estimated on ``calibration`` (default: stdlib docstrings), quality is
    judged on ``sentences``. ``normalize`` as in ``prune_bert``.
    """
    batch = tokenize(tokenizer, sentences)
    with torch.inference_mode():
        reference = embed(model, batch)
    calib = tokenize(tokenizer, calibration if calibration is not None else calibration_sentences())
    scores = bert_head_importance(model, importance, calib, draws=draws)
    total = sum(heads_per_layer(model))
    points = []
    for amount in amounts:
        pruned = prune_bert(model, amount, importance, scores=scores, scope=scope, normalize=normalize)
        cos = _cosines(pruned, batch, reference)
        left = sum(heads_per_layer(pruned))
        points.append(HeadPoint(float(amount), total - left, left, sum(p.numel() for p in pruned.parameters()),
                                float(cos.mean()), float(cos.min())))
    return points


def heads_that_can_go(points: Sequence[HeadPoint], min_cosine: float = 0.95) -> int:
    """The most heads pruned on the curve while the mean cosine stays at or above ``min_cosine``."""
    ok = [p.heads_pruned for p in points if p.cosine_mean >= min_cosine]
    return max(ok, default=0)
