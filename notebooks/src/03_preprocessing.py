# %% [markdown]
# # 03 · Data preprocessing: raw text to packed token shards
#
# Before a model sees any text, the text is collected, cleaned, normalised, deduplicated and
# tokenized, and the token ids are packed into files that training can read at random. Here you
# run that pipeline step by step on a real corpus that every machine has: the Python standard
# library's own source code and docstrings. Then you run it in parallel on Dask workers.
#
# **You will learn to**
# - find the corpus, and see what bad input looks like and how the pipeline reports it;
# - normalise text (Unicode NFKC, control characters, whitespace) and filter by length and quality;
# - find exact duplicates by hash and near-duplicates with MinHash + LSH;
# - train a byte-level BPE tokenizer and see how the vocabulary size changes bytes per token;
# - run the whole pipeline as Dask tasks with a live docs/s and tokens/s plot, and read the shards back.
#
# The logic lives in `labkit.data`; this notebook calls it and looks at the results.

# %% parameters
scale = None                 # None = the lab's active scale (tiny, binder, workshop, full)
vocab_size = None            # None = the scale's preset
near_dup_threshold = 0.8     # Jaccard similarity above which two documents count as near-duplicates
scrub_pii = True             # replace e-mail addresses and IPs with <EMAIL> and <IP>
workers = 2                  # local Dask workers for the parallel run

# %%
from labkit.config import load_config
from labkit.data import DataConfig, default_shard_dir

scale_name = load_config().scale(scale).name
overrides = {"near_dup_threshold": near_dup_threshold, "scrub_pii": scrub_pii}
if vocab_size:
    overrides["vocab_size"] = vocab_size
cfg = DataConfig.for_scale(scale_name, **overrides)
out_dir = default_shard_dir(scale_name)
print(f"scale {scale_name}: corpus budget {cfg.corpus_bytes or 'all'} bytes, vocab {cfg.vocab_size}")
print("shards will be written to", out_dir)

# %% [markdown]
# ## 1. The corpus
#
# `sysconfig` knows where this Python's standard library lives. `labkit.data` takes its `*.py`
# files, leaving out `site-packages` (third-party code) and the test suites. At small scales
# it takes a spread of modules up to a byte budget.
#
# Real crawled data is messier than the stdlib, so we add a small folder that has its
# troubles: copies, look-alike Unicode, invalid UTF-8, NUL bytes, a binary file, an empty
# file, broken symlinks, e-mail addresses.

# %%
from labkit.data.demo import make_messy_corpus
from labkit.data.sources import StdlibSource, list_sources, stdlib_root

messy = make_messy_corpus(out_dir.parent / "messy-corpus")
listing = list_sources([StdlibSource(max_bytes=cfg.corpus_bytes), messy])
print(stdlib_root())
print(f"{len(listing.files)} files, {sum(f.size for f in listing.files) / 1e6:.2f} MB; e.g.")
for f in listing.files[:3] + listing.files[-3:]:
    print("  ", f.path.replace(str(stdlib_root()), "<stdlib>"), f.size, "bytes")
print("left out while listing:", [(i.path.split("/")[-1], i.reason) for i in listing.issues])

# %% [markdown]
# ## 2. Normalising text
#
# Text from the wild carries look-alikes (`ﬁ` vs `fi`, full-width `Ａ`), invisible control
# characters and every kind of line ending. Each normaliser is a plain `str -> str` function.

# %%
from labkit.data import clean as C

sample = "ﬁnal ＴＥＳＴ\u200b\r\nbell\x07   \n\n\n\n\nmail guido@python.org from 10.0.0.1"
for name, fn in C.NORMALISERS.items():
    print(f"{name:<11} {fn(sample)!r}")

# %% [markdown]
# Try it on your own text: tick normalisers, pick a tokenizer, and see where the tokens fall
# (the tokenizer here is a small one trained in a second on stdlib text; hover a chip for its id).

# %%
from labkit.data import make_tiny_shards
from labkit.widgets.data import playground

tiny_reader = make_tiny_shards(out_dir.parent / "playground-tokenizer", vocab_size=512)
playground({"stdlib BPE 512": tiny_reader.tokenizer()})

# %% [markdown]
# ### Exercise 1: write a normaliser
#
# Write `my_normaliser(text)` that does what the pipeline does: NFKC, drop control and
# invisible format characters (keep `\n` and `\t`), turn `\r\n`/`\r` into `\n`, strip trailing
# spaces on each line, keep at most two blank lines in a row, and trim blank lines at both ends.
# The checker runs it on fresh cases and tells you the first one that differs.
# (Stuck? `labkit.check.data.solution("normaliser")`.)

# %%
import unicodedata

from labkit.check.data import check_normaliser


def my_normaliser(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    # your code: control characters, line endings, trailing spaces, blank lines
    return text


check_normaliser(my_normaliser)

# %% [markdown]
# ## 3. Near-duplicates with MinHash
#
# Exact duplicates are easy: equal SHA-256 of the normalised text. Near-duplicates (a file
# copied with a few lines changed) need a similarity: the Jaccard similarity of the sets of
# word 5-grams. MinHash estimates it from short signatures; LSH finds the candidate pairs
# without comparing every pair. The stdlib has real ones: the `encodings` code pages.

# %%
from labkit.data.clean import MinHasher, jaccard

a = (stdlib_root() / "encodings" / "cp1252.py").read_text()
b = (stdlib_root() / "encodings" / "cp1250.py").read_text()
sig = MinHasher(num_perm=128).signatures([a, b])
print(f"exact Jaccard {jaccard(a, b):.3f}, MinHash estimate {(sig[0] == sig[1]).mean():.3f}")
print("LSH bands x rows for threshold", near_dup_threshold, "->", C.lsh_params(near_dup_threshold, 128))

# %% [markdown]
# ### Exercise 2: count duplicates
#
# Write `count_duplicates(docs)`: how many documents repeat an earlier one *after*
# normalisation? (The first copy is not a duplicate.) Use your normaliser and a hash.

# %%
import hashlib

from labkit.check.data import check_count_duplicates


def count_duplicates(docs: list[str]) -> int:
    seen, dups = set(), 0
    for d in docs:
        h = hashlib.sha256(d.encode()).hexdigest()   # hint: normalise first
        dups += h in seen
        seen.add(h)
    return dups


check_count_duplicates(count_duplicates)

# %% [markdown]
# ## 4. The whole pipeline, in parallel on Dask
#
# `labkit.data.preprocess` cuts the files into partitions by size, cleans them as Dask tasks
# (texts stay on the workers), decides duplicates and the train/val split on the driver,
# trains the tokenizer, tokenizes as Dask tasks again and writes the shards in order. The
# output is byte-identical on any number of workers. Here we start a local cluster; on a
# Slurm cluster pass the client of notebook 01's `labkit.start_cluster` instead.

# %%
from distributed import Client, LocalCluster

from labkit.data import preprocess
from labkit.widgets.data import live_rates

# at tiny scale (tests) the workers are threads of this process, so they start in a blink
cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=scale_name != "tiny",
                       dashboard_address=None)
client = Client(cluster)
plot = live_rates()
plot

# %%
report = preprocess(["stdlib", messy], out_dir, client=client, config=cfg, on_event=plot)
print(report)

# %% [markdown]
# Nothing is dropped silently: every file left out or repaired, and every document a step
# removed, is listed with its reason.

# %%
print(f"{len(report.skipped)} skipped, {len(report.repaired)} repaired")
for path, reason in report.skipped + report.repaired:
    print(f"  {path.replace(str(stdlib_root()), '<stdlib>')}: {reason}")
print(f"{len(report.removed)} documents removed by cleaning and deduplication:")
for doc_id, why in report.removed:
    print(f"  {doc_id.replace(str(stdlib_root()), '<stdlib>')}: {why}")
for step in report.steps:
    for ex in step.examples[:1]:
        print(step.name, "->", {k: v for k, v in ex.items() if k != "id"})

# %%
from labkit.widgets.data import duplicates_plot, duplicates_table, length_histogram, steps_funnel

steps_funnel(report)

# %%
length_histogram(report.doc_lengths)

# %%
print(duplicates_table(report))
duplicates_plot(report)

# %% [markdown]
# ## 5. The tokenizer
#
# A byte-level BPE starts from the 256 byte values and merges the most frequent pairs. A
# bigger vocabulary merges more, so each token covers more bytes: shorter sequences, but a
# larger embedding table to learn.

# %%
from labkit.data import ShardReader, show_split

train = ShardReader(out_dir, "train")
tok = train.tokenizer()
print(show_split(tok, "def __init__(self, name):\n    self.name = name"))

# %%
from labkit.data import compare_vocab_sizes
from labkit.widgets.data import compare_table

texts = [tok.decode(train.read(0, min(train.num_tokens, 40_000)).tolist())]
val_texts = [tok.decode(ShardReader(out_dir, "val").read(0, 5_000).tolist())]
print(compare_table(compare_vocab_sizes(texts, val_texts, (300, 512, 1024))))

# %% [markdown]
# ## 6. The shards
#
# Each split is a stream `doc EOT doc EOT ...` of uint16 ids (uint32 above 65,536 tokens),
# memory-mapped, with sizes and SHA-256 checked on open. Training draws random blocks; each
# rank of a distributed run draws from its own part of the stream.

# %%
import torch

print(train)
x, y = train.get_batch(4, 32, torch.Generator().manual_seed(0))
print(x.shape, "y is x shifted by one:", bool((x[:, 1:] == y[:, :-1]).all()))
print(repr(tok.decode(x[0].tolist())))

# %%
from labkit.widgets.data import zipf_plot

zipf_plot(train.read(0, train.num_tokens), train.vocab_size, tok)

# %%
plot.detach() if hasattr(plot, "detach") else None
client.close()
cluster.close()

# %% [markdown]
# ## Recap
#
# - The corpus is listed deterministically; bad files are skipped or repaired and listed, never lost silently.
# - Normalisers are small `str -> str` steps; filters remove what is too short, too long or not text.
# - Exact duplicates go by hash, near-duplicates by MinHash + LSH with a similarity threshold.
# - A byte-level BPE never meets an unknown character; its vocabulary size trades sequence length for table size.
# - The pipeline runs as Dask tasks, gives the same bytes on any number of workers, and writes
#   shards that `ShardReader` checks and samples from.
#
# The shards are in `runs/shards-<scale>`; the training notebook reads them from there
# (`labkit.data.default_shard_dir(scale)`). Next: [04 · attention math](04_attention_math.ipynb).
