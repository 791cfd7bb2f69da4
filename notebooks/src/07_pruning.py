# %% [markdown]
# # 07 · Pruning: smaller models, what they cost in quality and gain in speed
#
# A trained network carries many weights it could do without. *Pruning* removes them. Two kinds:
#
# - **unstructured**: zero individual weights (the smallest ones). The matrices keep their shape;
# - **structured**: remove whole attention heads and FFN neurons. The matrices get smaller.
#
# Both cost some quality. Only one of them makes the model faster on ordinary hardware, and you
# will measure which, and why.
#
# **You will learn to**
# - prune by magnitude, per layer or across the model, and read a sparsity report (params and FLOPs);
# - rank heads by importance (weight size, or gradients as in Michel et al. 2019) and cut them out,
#   getting a smaller GPT that still saves, loads and generates;
# - plot perplexity against sparsity, and win quality back by fine-tuning (and see L1/L2 as the gentle cousins);
# - find how many heads of a pretrained MiniLM can go before its sentence embeddings change;
# - time models before and after, and find the sparsity at which sparse kernels start to pay;
# - run a sweep of sparsities in parallel on Dask workers with a live plot.

# %% parameters
scale = None            # None = the lab's active scale (tiny, binder, workshop, full)
shards_dir = "runs/shards"   # from 03_preprocessing; tiny shards are built when missing
workers = 2             # local Dask workers for the sweep

# %%
import copy
import tempfile
from pathlib import Path

import torch

from labkit.config import load_config
from labkit.data.shards import ShardReader
from labkit.prune import head_importance, magnitude, prune_ffn, prune_structured, select, shrink, sparsity
from labkit.prune.config import PruneConfig
from labkit.prune.evaluate import perplexity, sparsity_curve, val_windows
from labkit.train import TrainConfig, ensure_shards, train
from labkit.widgets import prune as views

scale_name = load_config().scale(scale).name
cfg = PruneConfig.for_scale(scale_name)
torch.set_num_threads(2)
workdir = Path(tempfile.mkdtemp(prefix="labkit-07-"))
data_dir, built = ensure_shards(shards_dir, workdir / "shards")
train_cfg = TrainConfig.for_scale(scale_name, max_steps=cfg.train_steps, sample_tokens=0, eval_interval=0,
                                  precision="float32")
print(f"scale {scale_name}; data {data_dir} ({'built now' if built else 'from 03_preprocessing'})")

# %% [markdown]
# ## A model to prune
# A small GPT from `labkit.train` (the one of notebook 06), trained for a few steps here, and fixed
# validation windows to measure perplexity on.

# %%
result = train(train_cfg, data_dir)
model = result.model.eval()
val = val_windows(ShardReader(data_dir, "val"), train_cfg.block_size, cfg.val_windows)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters, loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}")
print(f"validation perplexity {perplexity(model, val):.2f} on {len(val)} windows")

# %% [markdown]
# ## 1 · Unstructured: zero the smallest weights
# `magnitude(model, amount, scope)` uses `torch.nn.utils.prune` and then makes it permanent
# (`prune.remove`): what is left is a plain model whose weights contain zeros. `scope="layer"`
# takes the same fraction from every layer; `scope="global"` ranks all weights together, so layers
# with many small weights lose more.

# %%
by_layer = magnitude(copy.deepcopy(model), 0.5, scope="layer")
by_model = magnitude(copy.deepcopy(model), 0.5, scope="global")
print(sparsity(by_model))
print(f"\nperplexity: dense {perplexity(model, val):.2f}, layer-wise {perplexity(by_layer, val):.2f}, "
      f"global {perplexity(by_model, val):.2f}")

# %% [markdown]
# **Exercise 1.** Write the mask of magnitude pruning: `True` for the weights to keep, `False` for
# the `round(amount * n)` weights of smallest absolute value.

# %%
from labkit.check.prune import check_layer_sparsity, check_magnitude_mask


def my_magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    raise NotImplementedError  # your code: rank |weight|, keep all but the smallest round(amount * n)


check_magnitude_mask(my_magnitude_mask)

# %% [markdown]
# **Exercise 2.** The sparsity of one layer: the fraction of its weight entries that are zero.
# (Stuck? `print(labkit.check.prune.solution("layer_sparsity"))`.)

# %%
def my_layer_sparsity(module: torch.nn.Module) -> float:
    raise NotImplementedError  # your code


check_layer_sparsity(my_layer_sparsity)

# %% [markdown]
# ## 2 · Structured: remove heads and FFN neurons
# Which heads matter? By **magnitude** (how big the head's weights are) or by **gradient**: put a
# gate g = 1 on each head's output and measure |dL/dg| over data, the first-order change of the loss
# if the head were removed (Michel et al. 2019). The pruned model is a *smaller dense GPT*: a new
# `GPTConfig` with `layer_heads` and `layer_ffn`.

# %%
scores = head_importance(model, "gradient", val)      # one tensor per layer
keep = select(scores, 0.5)                              # drop the least important half, ranked globally
small = shrink(model, keep_heads=keep)                  # a new, smaller GPT (prune_heads does both steps)
gone = [sorted(set(range(len(s))) - set(k.tolist())) for s, k in zip(scores, keep)]
views.head_heatmap(scores, title="gradient head importance (x = pruned)", pruned=gone)

# %%
from labkit.model import load, save

smaller = prune_ffn(small, 0.5)
path = save(smaller, workdir / "pruned.pt")
reloaded = load(path).model.eval()
print("heads per layer", reloaded.config.layer_heads, "FFN per layer", reloaded.config.layer_ffn)
print(f"{sum(p.numel() for p in model.parameters()):,} -> {sum(p.numel() for p in reloaded.parameters()):,} parameters; "
      f"perplexity {perplexity(model, val):.2f} -> {perplexity(reloaded, val):.2f}")
print("generates:", reloaded.generate(val[:1, :8], max_new_tokens=8)[0].tolist())

# %% [markdown]
# ## 3 · Quality against sparsity
# Same fraction of weights removed, two ways. Structured pruning usually hurts more per weight
# removed: it cannot pick the single least useful weights, only whole units.

# %%
curve = sparsity_curve(model, val, amounts=cfg.amounts, methods=("unstructured", "structured"))
for p in curve:
    print(f"{p.method:<13} amount {p.amount:.2f}  removed {p.sparsity:.2f}  params {p.params:>8,}  ppl {p.perplexity:.2f}")
views.curve_figure(curve, title="validation perplexity vs weights removed")

# %% [markdown]
# ## 4 · Prune, fine-tune, repeat; and the gentler cousins
# Cutting a lot at once hurts; cutting a little, letting the rest of the network adapt, and cutting
# again hurts less. `iterative` prunes on a cubic schedule and fine-tunes after each round with
# `labkit.train`'s optimizer and schedule, keeping pruned weights at zero.
#
# L1 and L2 regularisation add `λ·Σ|w|` or `λ·Σw²` to the loss: they *shrink* weights during
# training instead of cutting them. L1 drives many to (nearly) zero, so a later cut costs less.

# %%
from labkit.prune.schedule import iterative, regularisation_study

it = iterative(copy.deepcopy(model), 0.8, cfg.rounds, train_cfg, data_dir, val, steps_per_round=cfg.finetune_steps)
for h in it.history:
    print(f"round {h['round']}: sparsity {h['sparsity']:.2f}, ppl after cut {h['ppl_pruned']:.2f}, "
          f"after fine-tune {h['ppl_finetuned']:.2f}")
st = iterative(model, 0.5, cfg.rounds, train_cfg, data_dir, val, steps_per_round=cfg.finetune_steps, method="structured")
print(f"structured, {cfg.rounds} rounds to 50% of heads+neurons: heads {st.model.config.layer_heads}, "
      f"ppl {st.history[-1]['ppl_pruned']:.2f} after the last cut -> {st.history[-1]['ppl_finetuned']:.2f} fine-tuned")
for r in regularisation_study(model, train_cfg, data_dir, val, steps=cfg.regularisation_steps):
    print(f"{r['regularizer']:<5} near-zero weights {r['near_zero']:.1%}; cutting 50% costs x{r['ppl_cost']:.3f} perplexity")

# %% [markdown]
# ## 5 · Speed, measured
# Below, three models are timed in turn (interleaved, so a busy machine slows all alike). The
# unstructured model does **not** get faster: its matrices have the same shape, and a dense matmul
# multiplies a zero as fast as any other number; the zeros even cost the same memory traffic. The
# structured model has smaller matrices, so every dense kernel does less work.

# %%
from labkit.prune.speed import sparse_kernel_study, speedups, time_models

x = val[:2, :-1]
timings = time_models({"dense": model, "unstructured 50%": by_model, "structured 50%": prune_structured(model, 0.5)},
                      x, repeats=cfg.latency_repeats, warmup=3, device="auto")   # the GPU when there is one
print("timed on", timings["dense"].device)
for name, s in speedups(timings, "dense").items():
    print(f"{name:<17} {timings[name].ms:7.2f} ms  {timings[name].tokens_per_s:9.0f} tokens/s  {s:.2f}x")

# %% [markdown]
# To profit from zeros you need a kernel that skips them: a sparse format such as CSR stores only
# the nonzeros and their column indices. Each nonzero then costs an index lookup and an irregular
# memory access, so CSR only wins when most weights are gone. Where is the crossover here?

# %%
study = sparse_kernel_study(cfg.sparse_size, cfg.sparse_size, tokens=64, sparsities=cfg.sparse_sparsities,
                            repeats=cfg.latency_repeats)
print(study.table())

# %% [markdown]
# ## 6 · How many heads of a pretrained MiniLM can go?
# The MiniLM of notebook 05 has 6 × 12 = 72 heads. We rank them by gradient importance, estimated on
# standard-library docstrings, remove ever more, and compare the sentence embeddings with the
# unpruned model's on a fixed set of sentences (cosine 1.0 = unchanged).

# %%
from labkit.prune.bert import SENTENCES, head_curve, heads_that_can_go, load_minilm

bert, tokenizer = load_minilm()
points = head_curve(bert, tokenizer, amounts=cfg.minilm_amounts, sentences=SENTENCES[: cfg.minilm_sentences],
                    draws=cfg.minilm_draws)
for p in points:
    print(f"{p.heads_pruned:>2} heads pruned, {p.heads_left:>2} left: mean cosine {p.cosine_mean:.4f} (min {p.cosine_min:.4f})")
print("heads that can go with mean cosine >= 0.95:", heads_that_can_go(points, 0.95))
views.curve_figure(points, x="heads_pruned", y="cosine_mean", group=None,
                   title="MiniLM: embedding cosine vs heads pruned")

# %% [markdown]
# ## 7 · A sweep on the Dask workers
# Every (method, amount) point is independent: each worker prunes its own copy and measures it,
# and emits a `prune` event; the live plot draws points as they land.

# %%
from dask.distributed import Client, LocalCluster

from labkit.prune.sweep import sweep
from labkit.widgets.live_plot import LivePlot

processes = scale_name != "tiny"   # thread workers start fastest for the tiny run
cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address="127.0.0.1:0")
client = Client(cluster)
plot = LivePlot(metrics=("perplexity",), x="sparsity", group="method", kinds=["prune"], title="sweep")
plot.attach(client)
plot

# %%
points = sweep(client, model, val, amounts=cfg.amounts, methods=("unstructured", "heads", "ffn", "structured"),
               threads=1 if processes else None)
for p in points:
    print(f"{p.method:<13} {p.amount:.2f}: removed {p.sparsity:.2f}, ppl {p.perplexity:.2f}")
plot.detach()
client.close()
cluster.close()

# %% [markdown]
# ## 8 · Try it: a sparsity slider
# Move the slider and switch the method: the model is pruned to that amount, and its perplexity
# and latency are measured next to the dense model's.

# %%
slider = views.SparsitySlider(model, val, repeats=cfg.latency_repeats)
print(slider.text(slider.update(0.5)))
slider

# %% [markdown]
# ## Recap
# - Unstructured magnitude pruning removes the most weights for the least quality, but on dense
#   kernels it gains no speed; CSR kernels pay only from high sparsity (see the crossover above).
# - Structured pruning removes heads and neurons: a smaller dense model, faster everywhere, at a
#   higher quality cost per weight; gradient importance picks the heads that matter least.
# - Pruning gradually with fine-tuning in between, or preparing the weights with L1, softens the cut.
# - A pretrained MiniLM loses a good share of its heads before its embeddings move much.
#
# Next: [08_serving](08_serving.ipynb): put a model behind an authenticated API.
