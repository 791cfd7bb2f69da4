# %% [markdown]
# # 04 · Attention math: from the formula to code that scales
#
# Every transformer layer computes
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V$$
#
# Each query row of $Q$ scores every key row of $K$, the softmax turns a row of scores into weights
# that sum to 1, and the output is that weighted mix of the rows of $V$. Here you write it, make it
# numerically safe, mask it, split it into heads, and then rewrite it so that it never builds the
# $T \times T$ matrix: the idea behind FlashAttention.
#
# **You will learn to**
# - write softmax so it cannot overflow, and see why $1/\sqrt{d_k}$ keeps it from saturating;
# - use padding and causal masks (torch's convention: `True` = may attend);
# - split a model's channels into heads and merge them back;
# - compute attention block by block with a running ("online") softmax, in $O(T)$ memory;
# - measure time and memory of the naive formula, the online version and torch's fused kernel.
#
# Exercises are checked by `labkit.check.attention`: the checker runs your code on fresh random
# inputs and says *what* is wrong. Each exercise starts with a first attempt that has a typical bug.

# %% parameters
scale = None        # None = the lab's active scale (tiny, binder, workshop, full)
seed = 0            # random inputs
d_k = 64            # head size used in the saturation demo

# %%
import math

import torch
import torch.nn.functional as F

from labkit import attention as A
from labkit.attention_cost import CostConfig, cost_table, measure_cost, saved_tensor_bytes
from labkit.check.attention import check, solution
from labkit.config import load_config
from labkit.widgets import attention as views

scale_name = load_config().scale(scale).name
torch.manual_seed(seed)
print("scale:", scale_name)

# %% [markdown]
# ## 1. The formula, plainly
#
# `labkit.attention.scaled_dot_product_attention(q, k, v)` is the formula written out in three lines
# (read it with `A.scaled_dot_product_attention??`). It agrees with PyTorch's fused kernel:

# %%
q, k, v = torch.randn(3, 2, 5, 8).unbind(0)  # (heads=2, T=5, d=8) each
ours = A.scaled_dot_product_attention(q, k, v)
torch_ = F.scaled_dot_product_attention(q, k, v)
print("max difference to torch:", (ours - torch_).abs().max().item())
weights = A.attention_weights(q, k)
print("each row of weights sums to 1:", weights.sum(-1))

# %% [markdown]
# ## 2. A softmax that cannot overflow
#
# `exp(x)` overflows float32 above $x \approx 88.7$: it becomes `inf`, and `inf / inf` is `nan`.
# Softmax does not change if you subtract the same number from a whole row, so subtract the row's
# maximum: the largest exponent is then $e^0 = 1$ and the sum is at least 1.

# %%
x = torch.tensor([100.0, 101.0, 99.0])
print("exp(x) / sum exp(x):      ", torch.exp(x) / torch.exp(x).sum())
print("after subtracting the max:", A.softmax(x))

# %% [markdown]
# **Exercise 1.** Write `softmax(x)` over the last axis. The first attempt below is the textbook
# formula; run the check, read what it says, and fix it.

# %%
def softmax(x):
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


check("softmax", softmax)

# %% [markdown]
# Stuck? `print(solution("softmax"))` shows a reference solution.
#
# ## 3. Why divide by $\sqrt{d_k}$
#
# With random unit-variance $q$ and $k$, $q \cdot k$ is a sum of $d_k$ products, so its standard
# deviation is $\sqrt{d_k}$. Unscaled, the scores spread so far that softmax puts almost all the weight
# on one key (it *saturates*), and its gradient vanishes. Dividing by $\sqrt{d_k}$ brings the spread back to 1.

# %%
qv, kv = torch.randn(d_k), torch.randn(12, d_k)
raw_scores = kv @ qv
print(f"std of q.k with d_k={d_k}: {raw_scores.std():.1f}")
views.saturation(raw_scores, d_k, factors=(1.0, 2.0, math.sqrt(d_k)))

# %% [markdown]
# **Exercise 2.** Write `attention(q, k, v, mask=None)` with a boolean mask (True = may attend).

# %%
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


check("attention", attention)

# %% [markdown]
# ## 4. Masks: padding and causal
#
# - **Padding**: a batch of sentences of different lengths is padded; nobody may attend to padding.
#   `A.padding_mask(inputs["attention_mask"])` turns the tokenizer's 1/0 mask into a (B, 1, 1, T) key mask.
# - **Causal**: a language model predicting the next token may only look back: query $i$ sees keys $0..i$.

# %%
tokens = ["the", "cat", "sat", "on", "the", "mat"]
qc, kc = torch.randn(2, len(tokens), 16).unbind(0)
causal_weights = A.attention_weights(qc, kc, causal=True)
views.heatmap(causal_weights, tokens, title="causal: nothing above the diagonal")

# %% [markdown]
# **Exercise 3.** Write `causal_mask(T)`: a bool (T, T) tensor, True where query i may attend key j.

# %%
def causal_mask(T):
    return torch.ones(T, T, dtype=torch.bool).triu()


check("causal_mask", causal_mask)

# %% [markdown]
# ## 5. Many heads
#
# A model with $C$ channels and $H$ heads runs $H$ attentions of size $D = C/H$ side by side, each on
# its own slice of channels. Splitting is a reshape plus a transpose: (B, T, C) → (B, T, H, D) → (B, H, T, D).
#
# **Exercise 4.** Write `split_heads(x, n_head)`.

# %%
def split_heads(x, n_head):
    B, T, C = x.shape
    return x.view(B, n_head, T, C // n_head)


check("split_heads", split_heads)

# %% [markdown]
# `A.MultiHeadAttention(n_embd, n_head, causal=..., impl=...)` puts it together: q/k/v projections,
# split, attention, merge, output projection. Three kernels, same answer:

# %%
mha = {impl: A.MultiHeadAttention(32, 4, causal=True, impl=impl, block_size=4) for impl in A.IMPLS}
for m in mha.values():
    m.load_state_dict(mha["sdpa"].state_dict())
xs = torch.randn(2, 9, 32)
outs = {impl: m(xs) for impl, m in mha.items()}
for impl in ("naive", "online"):
    print(f"{impl:>6} vs sdpa: {(outs[impl] - outs['sdpa']).abs().max().item():.2e}")

# %% [markdown]
# ## 6. Online softmax: attention without the $T \times T$ matrix
#
# The naive formula stores all $T^2$ scores. But softmax can be computed *online*, one block of keys
# at a time, keeping per query only a running maximum $m$, a running sum $\ell$ and a running output:
#
# $$m' = \max(m, \max_j s_j), \quad \ell' = \ell\, e^{m - m'} + \sum_j e^{s_j - m'}, \quad
#   o' = o\, e^{m - m'} + \sum_j e^{s_j - m'} v_j$$
#
# and at the end divide $o$ by $\ell$. The factor $e^{m - m'}$ corrects what was summed under the old
# maximum. For training, the backward pass recomputes each block from $q$, $k$ and the saved
# $\log \ell + m$ instead of keeping the probabilities: memory stays $O(T)$.
# (`A.online_softmax_attention??` shows the code.)

# %%
qo, ko, vo = (torch.randn(2, 4, 37, 16, requires_grad=True) for _ in range(3))
out_online = A.online_softmax_attention(qo, ko, vo, causal=True, block_size=8)
out_torch = F.scaled_dot_product_attention(qo, ko, vo, is_causal=True)
g_online = torch.autograd.grad(out_online.sum(), (qo, ko, vo))
g_torch = torch.autograd.grad(out_torch.sum(), (qo, ko, vo))
print("values:", (out_online - out_torch).abs().max().item())
print("grads: ", max((a - b).abs().max().item() for a, b in zip(g_online, g_torch)))
print("bytes kept for backward at T=512: naive", saved_tensor_bytes("naive", 512),
      "| online", saved_tensor_bytes("online", 512))

# %% [markdown]
# ## 7. What it costs
#
# Time and peak memory against sequence length. Peak memory is measured with `torch.profiler`
# (every allocation of torch's CPU allocator; `torch.cuda.max_memory_allocated` on a GPU): the peak
# above what was allocated before the call. The naive version grows as $T^2$; online and torch's
# fused kernel grow as $T$. The fused kernel is faster still: it is compiled, and the online version
# here is plain PyTorch with a Python loop over blocks. `python -m bench.attention` runs the full-size comparison.

# %%
cost_cfg = CostConfig.for_scale(scale)
points = measure_cost(cost_cfg)
print(cost_table(points))
views.cost_figure(points)

# %% [markdown]
# ## Recap
#
# - Attention is three lines: scores $QK^\top/\sqrt{d_k}$, a softmax over keys, a weighted sum of values.
# - Subtract the row max before `exp`; divide by $\sqrt{d_k}$ so softmax does not saturate.
# - Masks say who may attend whom: `True` = allowed; padding hides keys, causal hides the future.
# - Heads are a reshape and a transpose; `MultiHeadAttention` wraps it all.
# - Online softmax gives the same numbers block by block, in $O(T)$ memory, forward and backward.
#
# Next: [`05_bert.ipynb`](05_bert.ipynb) loads a real pretrained BERT and shows that this formula is
# exactly what it computes.
