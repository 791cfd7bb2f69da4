"""Attention, written plainly: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

Three implementations of the same formula, all matching
``torch.nn.functional.scaled_dot_product_attention`` (tested to 1e-5 in float32):

- :func:`scaled_dot_product_attention`: the formula as written, builds the T x T score matrix;
- :func:`online_softmax_attention`: flash-style, block by block with a running (online) softmax,
  never builds T x T; its backward recomputes the blocks, so training memory stays O(T);
- ``impl="sdpa"`` in :class:`MultiHeadAttention`: torch's fused kernel.

Masks follow torch's convention: a boolean mask is True where a query MAY attend to a key; a float
mask is added to the scores (use ``-inf`` to forbid).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("sdpa", "naive", "online")
DEFAULT_BLOCK = 128


# ----------------------------------------------------------------------------------------- softmax
def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax along ``dim``; rows that are all ``-inf`` (fully masked) give 0.

    Why stable: exp(x) overflows float32 above x ~ 88.7 (to inf, and inf/inf = nan), and attention
    scores easily get there without the 1/sqrt(d_k) scale or with large activations. Softmax does
    not change when a constant is subtracted from every entry of a row
    (exp(x - c) / sum exp(x - c) = exp(x) / sum exp(x)), so we subtract the row maximum: the largest
    exponent becomes exp(0) = 1, nothing can overflow, and the sum is at least 1, so no division by 0.
    """
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf row: keep exp(-inf) = 0
    e = torch.exp(x - m.detach())
    s = e.sum(dim=dim, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)


def softmax_at_scales(scores: torch.Tensor, d_k: int, factors: Sequence[float]) -> list[tuple[float, torch.Tensor]]:
    """Softmax of one row of raw scores q.k scaled by ``factor / sqrt(d_k)`` for each factor.

    Factor 1 is the model's own 1/sqrt(d_k); factor sqrt(d_k) is no scaling at all. Shows why the
    scale is there: as it grows, the weights saturate towards one-hot and gradients vanish."""
    s = scores.detach().float().cpu().flatten()
    return [(float(f), softmax(s * f / math.sqrt(d_k))) for f in factors]


# ------------------------------------------------------------------------------------------ masks
def attention_stats(probs: torch.Tensor) -> dict[str, float]:
    """How peaked attention rows (..., T_q, T_k) are, averaged over all rows: mean entropy in nats
    (log T_k = uniform, 0 = one-hot) and the mean of each row's largest weight."""
    p = probs.detach().float()
    entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
    return {"entropy": entropy, "mean_max_weight": float(p.max(-1).values.mean())}


def causal_mask(t_q: int, t_k: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True on and below the diagonal: query i may see keys 0..i.

    Aligned to the top left, like torch's ``is_causal=True``.
    """
    t_k = t_q if t_k is None else t_k
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril()


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """From a tokenizer's (B, T) ``attention_mask`` (1 = real token, 0 = padding), a boolean
    (B, 1, 1, T) key mask that broadcasts over heads and queries: nobody attends to padding."""
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be (batch, seq_len), got shape {tuple(attention_mask.shape)}; "
            "pass the tokenizer's inputs['attention_mask']"
        )
    return attention_mask.bool()[:, None, None, :]


def _combine_masks(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Apply a causal and/or a boolean/float mask to scores of shape (..., T_q, T_k)."""
    if causal:
        cm = causal_mask(scores.shape[-2], scores.shape[-1], device=scores.device)
        scores = scores.masked_fill(~cm, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask.is_floating_point():
            scores = scores + mask
        else:
            raise TypeError(
                f"mask must be bool (True = may attend) or float (added to the scores), got {mask.dtype}; "
                "convert a 0/1 integer mask with mask.bool()"
            )
    return scores


# -------------------------------------------------------------------------------------- the formula
def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention probabilities softmax(Q K^T * scale) of shape (..., T_q, T_k); scale defaults to
    1/sqrt(d_k), which keeps the scores' variance near 1 so the softmax does not saturate."""
    _check_qkv(q, k, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    return softmax(_combine_masks(scores, mask, causal), dim=-1)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V on (..., T, d) tensors, written plainly (builds T_q x T_k).

    ``mask``: bool (True = may attend) or float (added to scores), broadcastable to (..., T_q, T_k).
    """
    _check_qkv(q, k, v)
    return attention_weights(q, k, mask=mask, causal=causal, scale=scale) @ v


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ValueError("q, k, v must be (..., seq_len, head_dim) tensors with at least 2 dimensions")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same last dimension d_k, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v need the same sequence length, got {k.shape[-2]} and {v.shape[-2]}")


# --------------------------------------------------------------------------------------- heads
def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, n_head, T, C // n_head): each head gets its own slice of the channels."""
    b, t, c = x.shape
    if c % n_head:
        raise ValueError(f"embedding size {c} is not divisible by n_head={n_head}; pick n_head among "
                         f"{[h for h in range(1, c + 1) if c % h == 0]}")
    return x.view(b, t, n_head, c // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H * D): the inverse of :func:`split_heads`."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


# ------------------------------------------------------------------------------- online softmax
def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _diag_bias(q0: int, q1: int, k0: int, k1: int, device, dtype) -> torch.Tensor | None:
    """Additive -inf bias for the keys a block of queries may not see (causal), or None if all visible."""
    if k1 - 1 <= q0:  # last key of the block is not after the first query: all visible
        return None
    rows = torch.arange(q0, q1, device=device)[:, None]
    cols = torch.arange(k0, k1, device=device)[None, :]
    return torch.zeros(q1 - q0, k1 - k0, device=device, dtype=dtype).masked_fill_(cols > rows, float("-inf"))


def _key_blocks(q0: int, q1: int, t_k: int, block: int, causal: bool):
    """Key block ranges a query block [q0, q1) needs; with causal, blocks wholly after q1-1 are skipped."""
    end = min(t_k, q1) if causal else t_k
    for k0 in range(0, end, block):
        yield k0, min(k0 + block, end)


class _Scratch:
    """Reusable buffers for the block loops: a fresh 32 MB score block per step would cost a page-faulting
    allocation each time (large CPU allocations go straight to the OS), so one is allocated and reused."""

    def __init__(self, like: torch.Tensor):
        self.like, self.bufs, self.bias = like, {}, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[name] = torch.empty(numel, device=self.like.device, dtype=self.like.dtype)
        return buf[:numel].view(shape)

    def causal_bias(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
        key = (q0 - k0, q1 - q0, k1 - k0)  # the pattern only depends on the offset and the sizes
        if key not in self.bias:
            self.bias[key] = _diag_bias(q0, q1, k0, k1, self.like.device, self.like.dtype)
        return self.bias[key]


def _online_forward(q, k, v, causal: bool, scale: float, block: int, key_bias=None):
    """Flattened (N, T, d) forward; returns output and the log-sum-exp of each query row.
    ``key_bias``: optional (N, 1, T_k) additive 0 / -inf bias that hides padded keys."""
    n, t_q, _ = q.shape
    t_k, d_v = k.shape[1], v.shape[-1]
    out = torch.empty(n, t_q, d_v, device=q.device, dtype=q.dtype)
    lse = torch.empty(n, t_q, device=q.device, dtype=q.dtype)
    qs = q * scale
    # contiguous per-block copies of K^T and V (O(T) memory): batched matmuls run faster on them
    kt_blocks = {k0: k[:, k0:k0 + block].transpose(1, 2).contiguous() for k0 in range(0, t_k, block)}
    v_blocks = {k0: v[:, k0:k0 + block].contiguous() for k0 in range(0, t_k, block)}
    buf = _Scratch(q)
    for q0 in range(0, t_q, block):
        q1 = min(q0 + block, t_q)
        bq = q1 - q0
        qi = qs[:, q0:q1].contiguous()
        # running row maximum; starts very low but finite, so that a row whose keys so far were all
        # masked gives exp(-inf - m) = 0 instead of exp(-inf + inf) = nan
        m = buf.get("m", n, bq, 1).fill_(torch.finfo(q.dtype).min)
        l = buf.get("l", n, bq, 1).zero_()  # running sum of exp(score - m)
        acc = buf.get("acc", n, bq, d_v).zero_()  # running sum of exp(score - m) * v
        m_new, alpha = buf.get("m_new", n, bq, 1), buf.get("alpha", n, bq, 1)
        for k0, k1 in _key_blocks(q0, q1, t_k, block, causal):
            s = torch.bmm(qi, kt_blocks[k0][:, :, :k1 - k0], out=buf.get("s", n, bq, k1 - k0))  # the only score block
            if causal:
                bias = buf.causal_bias(q0, q1, k0, k1)
                if bias is not None:
                    s += bias
            if key_bias is not None:
                s += key_bias[:, :, k0:k1]
            torch.amax(s, -1, keepdim=True, out=m_new)
            torch.maximum(m, m_new, out=m_new)
            torch.sub(m, m_new, out=alpha).exp_()  # rescales what was summed under the old maximum
            s.sub_(m_new).exp_()  # s is now p = exp(s - m_new)
            l.mul_(alpha).add_(s.sum(-1, keepdim=True))
            acc.mul_(alpha).baddbmm_(s, v_blocks[k0][:, :k1 - k0])
            m.copy_(m_new)
        empty = l == 0  # every key masked: output 0 (as torch's SDPA), and p = exp(-inf - inf) = 0 in backward
        torch.div(acc, l.masked_fill(empty, 1.0), out=out[:, q0:q1])
        lse[:, q0:q1] = (m + torch.log(l)).masked_fill(empty, float("inf")).squeeze(-1)
    return out, lse


def _online_backward(q, k, v, out, lse, dout, causal: bool, scale: float, block: int, key_bias=None):
    """Recompute each score block from q, k and the saved log-sum-exp; accumulate dq, dk, dv."""
    n, t_q, _ = q.shape
    t_k = k.shape[1]
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    delta = (dout * out).sum(-1, keepdim=True)  # (n, t_q, 1): rowsum(dP * P) = rowsum(dO * O)
    qs = q * scale
    buf = _Scratch(q)
    for q0 in range(0, t_q, block):
        q1 = min(q0 + block, t_q)
        qi, doi = qs[:, q0:q1], dout[:, q0:q1]
        lse_i, delta_i = lse[:, q0:q1, None], delta[:, q0:q1]
        for k0, k1 in _key_blocks(q0, q1, t_k, block, causal):
            kj, vj = k[:, k0:k1], v[:, k0:k1]
            shape = (n, q1 - q0, k1 - k0)
            s = torch.bmm(qi, kj.transpose(1, 2), out=buf.get("s", *shape))
            if causal:
                bias = buf.causal_bias(q0, q1, k0, k1)
                if bias is not None:
                    s += bias
            if key_bias is not None:
                s += key_bias[:, :, k0:k1]
            p = s.sub_(lse_i).exp_()  # the probabilities of this block, recomputed
            dv[:, k0:k1].baddbmm_(p.transpose(1, 2), doi)
            dp = torch.bmm(doi, vj.transpose(1, 2), out=buf.get("dp", *shape))
            ds = dp.sub_(delta_i).mul_(p)  # softmax backward: P * (dP - rowsum(dP * P))
            dq[:, q0:q1].baddbmm_(ds, kj, alpha=scale)
            dk[:, k0:k1].baddbmm_(ds.transpose(1, 2), qi)  # qi already carries the scale
    return dq, dk, dv


class OnlineSoftmaxAttention(torch.autograd.Function):
    """Flash-style attention: saves q, k, v, the output and one log-sum-exp per query (all O(T)),
    and recomputes the score blocks in backward instead of keeping the T x T probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, block: int, key_bias=None):
        shape = q.shape[:-1] + (v.shape[-1],)
        qf, kf, vf = _flatten(q.contiguous()), _flatten(k.contiguous()), _flatten(v.contiguous())
        out, lse = _online_forward(qf, kf, vf, causal, scale, block, key_bias)
        ctx.save_for_backward(qf, kf, vf, out, lse, key_bias)
        ctx.causal, ctx.scale, ctx.block = causal, scale, block
        ctx.shapes = (q.shape, k.shape, v.shape)
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        qf, kf, vf, out, lse, key_bias = ctx.saved_tensors
        dof = _flatten(dout.contiguous())
        dq, dk, dv = _online_backward(qf, kf, vf, out, lse, dof, ctx.causal, ctx.scale, ctx.block, key_bias)
        sq, sk, sv = ctx.shapes
        return dq.view(sq), dk.view(sk), dv.view(sv), None, None, None, None


def online_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    block_size: int = DEFAULT_BLOCK,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V computed block by block with a running softmax; never builds
    T x T, and training memory stays O(T) because backward recomputes the blocks.

    q, k, v: (..., T, d) with the same leading dimensions (heads and batch are batched together,
    no Python loop over them). ``block_size``: queries and keys per block (bigger = faster, more memory).
    ``key_padding_mask``: bool, True = real key, broadcastable to (..., T_k), e.g. (B, 1, T_k) for
    (B, H, T, d) inputs; a (B, 1, 1, T_k) mask from :func:`padding_mask` works too.
    """
    _check_qkv(q, k, v)
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"q, k, v need the same leading (batch, head) dimensions, got "
                         f"{tuple(q.shape[:-2])}, {tuple(k.shape[:-2])}, {tuple(v.shape[:-2])}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_bias = None
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if kpm.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = real key), got {kpm.dtype}")
        if kpm.dim() == q.dim() and kpm.shape[-2] == 1:  # (..., 1, T_k), as padding_mask() makes
            kpm = kpm.squeeze(-2)
        try:
            kpm = kpm.expand(q.shape[:-2] + (k.shape[-2],))
        except RuntimeError as exc:
            raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not broadcast to "
                             f"{tuple(q.shape[:-2]) + (k.shape[-2],)} (leading dims, T_k)") from exc
        key_bias = torch.zeros(kpm.shape, dtype=q.dtype, device=q.device).masked_fill_(~kpm, float("-inf"))
        key_bias = key_bias.reshape(-1, 1, k.shape[-2])
    return OnlineSoftmaxAttention.apply(q, k, v, bool(causal), scale, int(block_size), key_bias)


# ---------------------------------------------------------------------------------------- module
class MultiHeadAttention(nn.Module):
    """Multi-head self-attention: project x to q, k, v, split into heads, attend, merge, project out.

    ``impl`` chooses the kernel: ``"sdpa"`` (torch's fused one), ``"naive"`` (the formula as written,
    can return the weights), ``"online"`` (flash-style, O(T) memory; key padding masks only, no dropout).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
        impl: Literal["sdpa", "naive", "online"] = "sdpa",
        block_size: int = DEFAULT_BLOCK,
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}; pick n_head among "
                             f"{[h for h in range(1, n_embd + 1) if n_embd % h == 0]}")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; valid choices: {', '.join(IMPLS)}")
        if impl == "online" and dropout:
            raise ValueError("impl='online' has no attention dropout; use dropout=0.0, or impl='sdpa'/'naive'")
        self.n_embd, self.n_head, self.causal, self.impl = n_embd, n_head, causal, impl
        self.dropout, self.block_size = dropout, block_size
        self.query = nn.Linear(n_embd, n_embd, bias=bias)
        self.key = nn.Linear(n_embd, n_embd, bias=bias)
        self.value = nn.Linear(n_embd, n_embd, bias=bias)
        self.out = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C) -> (B, T, C). ``mask`` as in :func:`scaled_dot_product_attention`
        (e.g. from :func:`padding_mask`); ``return_weights`` also returns (B, H, T, T) (naive path)."""
        q = split_heads(self.query(x), self.n_head)
        k = split_heads(self.key(x), self.n_head)
        v = split_heads(self.value(x), self.n_head)
        weights = None
        if return_weights or self.impl == "naive":
            weights = self.attn_dropout(attention_weights(q, k, mask=mask, causal=self.causal))
            y = weights @ v
        elif self.impl == "sdpa":
            if self.causal and mask is not None:  # torch takes one or the other: fold causal into the mask
                mask, causal = _and_causal(mask, q.shape[-2]), False
            else:
                causal = self.causal
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            if mask is not None and not (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-2] == 1):
                raise ValueError("impl='online' takes only a key padding mask, bool (B, 1, 1, T) as padding_mask() "
                                 "makes (plus causal=True); use impl='sdpa' for other masks")
            y = online_softmax_attention(q, k, v, causal=self.causal, block_size=self.block_size,
                                         key_padding_mask=mask)
        y = self.resid_dropout(self.out(merge_heads(y)))
        return (y, weights) if return_weights else y

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}, causal={self.causal}, impl={self.impl!r}"


def _and_causal(mask: torch.Tensor, t: int) -> torch.Tensor:
    cm = causal_mask(t, device=mask.device)
    if mask.dtype == torch.bool:
        return mask & cm
    return mask.masked_fill(~cm, float("-inf"))
