# %% [markdown]
# # 02 · HPC hardware for LLMs: size a run, inspect the nodes, measure them
#
# An LLM training run is bounded by five things a cluster is made of: **compute** (FLOP/s of the
# accelerators), **memory** (how much fits on one GPU, and how fast it is read), **interconnect**
# (how fast GPUs exchange gradients, inside a node and between nodes), **storage** (data and
# checkpoints) and **energy**.
#
# **You will learn to**
# - read a datasheet: dense peak FLOP/s per dtype, HBM size and bandwidth, NVLink/PCIe, InfiniBand, TDP;
# - estimate a run before you ask for it: parameters, FLOPs, memory per GPU under ZeRO/FSDP, time at a
#   given MFU, gradient all-reduce time, energy, storage;
# - inspect the nodes Dask gave you (CPU, RAM, GPUs, Slurm job) and measure them (matmul, memory
#   bandwidth, all-reduce), and compare with the datasheet peaks;
# - answer "which hardware?", "will it scale?" and "is it safe?" with numbers.

# %% parameters
scale = None              # None: the lab's setting (LABKIT_SCALE or your config); or "tiny", "binder", "workshop", "full"
model = "gpt2-xl"         # a GPTConfig preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt3-2.7b, gpt3-6.7b, gpt3-13b, gpt3-175b
tokens = 30e9             # training tokens
gpu_type = "A100-80GB"    # any catalog name, case and punctuation ignored
n_gpus = 8
interconnect = "IB-HDR-200"
zero_stage = 1            # 0 = plain DDP, 1 = shard optimizer states, 2 = + gradients, 3 = + weights (FSDP)
mfu = 0.4                 # model FLOPs utilisation: the fraction of peak a real run sustains
n_workers = 2             # Dask workers to inspect and measure

# %%
from labkit.config import load_config
from labkit.hardware import GPTConfig, count_params, estimate_training, gpu, network, plan_run, training_memory
from labkit.widgets.hardware import EstimatorPanel, Table, catalog_table, plan_summary

active_scale = load_config().scale(scale).name
print("scale:", active_scale)

# %% [markdown]
# ## 1 · The catalog: what the datasheets promise
#
# Peak **dense** FLOP/s per dtype (NVIDIA prints tensor-core figures "with sparsity", twice the dense
# ones: the catalog stores the dense half), memory size and bandwidth, intra-node link and power.
# Each number's source is in `labkit/hardware/catalog.yaml`.

# %%
catalog_table()

# %%
g = gpu(gpu_type)
print(f"{g.name}: {g.peak_flops('auto') / 1e12:.0f} TFLOP/s {g.training_dtype}, {g.memory_GB:g} GB at "
      f"{g.memory_bw_GBs:g} GB/s -> roofline ridge at {g.ridge_point():.0f} FLOP/byte")
print("source:", g.source)
net = network(interconnect)
print(f"{net.name}: {net.bandwidth / 1e9:g} GB/s per port, ~{net.latency_us:g} µs; source: {net.source}")

# %% [markdown]
# ## 2 · The formulas
#
# | quantity | estimate | source |
# | --- | --- | --- |
# | parameters of a GPT | $N = V d + T d + L(12 d^2 + 13 d) + 2d$ | nanoGPT layout, tied LM head |
# | training compute | $C = D\,(6N + 12\,L\,d\,T)$ FLOPs | PaLM, App. B (6N: 2 forward + 4 backward per parameter and token) |
# | time | $t = C / (G \cdot \text{peak} \cdot \text{MFU})$ | |
# | model states per GPU | $2N$ weights + $2N$ grads + $12N$ AdamW (fp32 master, $m$, $v$) = $16N$ bytes; ZeRO-1 divides the 12N by $N_d$, ZeRO-2 also the grads, ZeRO-3/FSDP also the weights | ZeRO paper |
# | activations per layer | $s\,b\,d\,(34 + 5 a s / d)$ bytes; FlashAttention drops $5as/d$; checkpointing keeps only $2sbd$ per layer | Korthikanti et al. 2022 |
# | inference | $N \cdot$ bytes $+\; 2 L\, n_{kv}\, d_{head} \cdot$ bytes per token of KV cache | |
# | ring all-reduce | $t = 2\frac{G-1}{G}\frac{\text{bytes}}{bw} + 2(G-1)\,\alpha$; hidden when $\le$ the backward pass ($\approx 4N$ FLOPs/token) | |
# | energy | GPU-hours $\times$ TDP $\times$ PUE | an upper bound: GPUs rarely draw full TDP |
# | storage | tokens × 2 bytes (uint16 when $V \le 65536$) + checkpoints of 14 bytes/param | |
#
# The estimators reproduce published figures (see `tests/test_hardware_estimate.py`): GPT-3's 3.14e23
# FLOPs, Chinchilla's 5.76e23, Llama 2's GPU-hours within 15 % at MFU 40 %, Llama 3.1 405B's 3.8e25 FLOPs
# and 30.84M GPU-hours, the ZeRO paper's 120 / 31.4 / 16.6 / 1.9 GB, BLOOM's 433 MWh and checkpoint size.

# %%
cfg = GPTConfig.preset(model)
plan = plan_run(cfg, tokens, gpu_type, n_gpus, mfu=mfu, zero_stage=zero_stage, network=interconnect, micro_batch=4)
plan_summary(plan)

# %% [markdown]
# ## 3 · Size a run, live
#
# Move the controls: the estimates and the memory chart follow. Try to make `gpt3-175b` fit on
# 80 GB GPUs (ZeRO stage, number of GPUs, checkpointing), then see what the network does to a step.

# %%
panel = EstimatorPanel(model=model, tokens=tokens, gpu=gpu_type, n_gpus=n_gpus, network=interconnect,
                       zero_stage=zero_stage, mfu=mfu)
panel

# %% [markdown]
# ### What dominates?
#
# Memory: for small models and long sequences the **activations**; for big models the **optimizer
# states** (12 of the 16 bytes/param) until ZeRO shards them. Time: **compute**, as long as the gradient
# all-reduce hides behind the backward pass; on a slow network with small batches, **communication**.

# %%
big = GPTConfig.preset("gpt3-13b")
n_big = count_params(big).total
rows = []
for stage in (0, 1, 2, 3):
    m = training_memory(n_big, big, zero_stage=stage, dp=64, micro_batch=1, flash_attention=True, gpu=gpu_type)
    rows.append([f"ZeRO-{stage}", f"{m.weights_bytes / 1e9:.1f}", f"{m.grads_bytes / 1e9:.1f}",
                 f"{m.optimizer_bytes / 1e9:.1f}", f"{m.activations_bytes / 1e9:.1f}", f"{m.total_bytes / 1e9:.1f}",
                 "yes" if m.fits else "no"])
Table(["", "weights GB", "grads GB", "optimizer GB", "activations GB", "total GB", f"fits {gpu(gpu_type).memory_GB:g} GB"],
      rows, title=f"gpt3-13b ({n_big / 1e9:.1f} B params) on 64 x {gpu(gpu_type).name}")

# %%
rows = []
for name in ("Ethernet-25GbE-TCP", "RoCE-100GbE", "IB-HDR-200", "IB-NDR-400"):
    p = plan_run(big, 260e9, gpu_type, 64, mfu=mfu, zero_stage=1, network=name, micro_batch=8, checkpointing=True)
    rows.append([name, f"{p.sync.seconds * 1e3:.0f}", f"{p.sync.backward_s * 1e3:.0f}",
                 "hidden" if p.sync.hidden else f"{p.sync.exposed_s * 1e3:.0f} ms exposed"])
Table(["network", "all-reduce ms", "backward ms", "overlap"], rows,
      title="gpt3-13b gradient sync per step, 64 GPUs over 8 nodes, 8 x 2048 tokens per GPU (checkpointing on)")

# %% [markdown]
# ## 4 · Inspect the live cluster
#
# Which nodes did we get? Each Dask worker reports its host, CPU, the cores it may use, RAM, the GPUs
# torch sees (name, memory, compute capability) and the Slurm job and partition it runs in. On a
# laptop or here the Slurm columns are empty; on the cluster they tell you which job to look at in
# `squeue`.

# %%
import logging

from dask.distributed import Client, LocalCluster

from labkit.hardware import inspect_cluster
from labkit.widgets.hardware import hardware_table

cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                       silence_logs=logging.ERROR)
client = Client(cluster)
client.wait_for_workers(n_workers, timeout=180)
workers = inspect_cluster(client)
hardware_table(workers)

# %% [markdown]
# ## 5 · Measure it
#
# On every worker: matmul throughput for each dtype the device supports, memory bandwidth (a large copy),
# host↔device bandwidth when there is a GPU; then an all-reduce between the workers over
# torch.distributed (gloo on CPU, nccl on GPUs) from 1 KB up. Each benchmark warms up, repeats, and
# reports the median.

# %%
from labkit.hardware.measure import MeasureConfig, measure_cluster, peaks_for
from labkit.widgets.hardware import busbw_figure, measurement_table, roofline_figure

measured = measure_cluster(client, MeasureConfig.for_scale(active_scale))
peaks, _, peak_label = peaks_for(measured.devices[0])
print(f"measured in {measured.seconds:.1f} s; peaks: {peak_label}")
measurement_table(measured, peaks)

# %% [markdown]
# The **roofline**: a kernel of arithmetic intensity $I$ (FLOP per byte moved) can reach at most
# $\min(\text{peak}, I \times \text{bandwidth})$. Large matmuls sit right of the ridge (compute bound);
# copies, element-wise ops and LayerNorm sit left (memory bound). Dashed: this cluster as measured.

# %%
roofline_figure(measured.devices, gpus=(gpu(gpu_type).name, "H100-SXM"), local_peaks=peaks if not measured.devices[0].device.startswith("cuda") else None)

# %% [markdown]
# The **bus bandwidth** of an all-reduce (algorithm bandwidth × 2(G−1)/G, as nccl-tests reports it)
# is comparable with a link's speed whatever the number of ranks. Small messages are latency bound,
# large ones bandwidth bound; the dotted line is the α-β model fitted to the measurement.

# %%
busbw_figure(measured.allreduce, nets=("IB-HDR-200", "IB-NDR-400", "RoCE-100GbE"), nvlink_of=gpu(gpu_type).name)

# %%
if measured.allreduce:
    print(f"all-reduce latency {measured.latency_s * 1e6:.0f} µs, best bus bandwidth "
          f"{measured.peak_bus_bandwidth / 1e9:.2f} GB/s ({measured.allreduce[0].backend}); "
          f"{interconnect} would give {network(interconnect).bandwidth / 1e9:g} GB/s at ~{network(interconnect).latency_us:g} µs")
for d in measured.devices:
    print(f"{d.worker}: best matmul {d.best_flops() / 1e9:.1f} GFLOP/s = "
          f"{d.best_flops() / gpu(gpu_type).peak_flops('auto'):.2e} of one {gpu(gpu_type).name}")

# %% [markdown]
# ## 6 · Choosing, scaling, securing a cluster, with these numbers
#
# **How to choose hardware.** Start from the run: $C = 6ND$ sets the GPU-hours at a realistic MFU
# (30–45 %), memory per GPU sets the minimum GPU count (or ZeRO stage), and the gradient all-reduce
# sets the network. Compare GPUs by *cost per delivered FLOP* at their bf16 (or fp8) dense peak and by
# HBM size: an H100 has ~3× the A100's bf16 peak and 1.6× its bandwidth, an H200 the same compute
# with 141 GB at 4.8 TB/s (fewer GPUs for a given model, longer sequences), an MI300X 192 GB.
# L40S-class cards (no NVLink, GDDR6) suit inference and fine-tuning, not large pre-training.
#
# **How to keep it scalable.** Keep the all-reduce hidden: bigger micro-batches per GPU, gradient
# bucketing that overlaps with backward, NVLink inside nodes and one InfiniBand/RoCE NIC per GPU
# across them (rail-optimised). The table above shows 25 GbE TCP making a 13B run communication-bound
# where 100–400 Gb/s RoCE or InfiniBand hides it (with one sequence per GPU instead of eight, even NDR
# would not: try it in the panel). Shard memory with ZeRO/FSDP rather than buying bigger GPUs;
# checkpoint often (a 13B resumable checkpoint is ~180 GB: plan the parallel file system for it) and
# make the job resumable, because at thousands of GPUs failures are routine.
#
# **How to keep it secure.** Workers run as *your* Slurm jobs with *your* permissions: the Dask
# scheduler must not listen on an open port (TLS with per-session credentials, as labkit's `slurm`
# profile sets up; the dashboard behind JupyterHub's authenticated proxy), data and checkpoints
# live in project directories with group permissions, and nothing is downloaded at run time on compute
# nodes. Energy is part of the account: the estimate above gives MWh before you spend them.

# %%
for name in ("A100-80GB", "H100-SXM", "H200", "MI300X"):
    est = estimate_training(count_params(GPTConfig.preset("gpt3-6.7b")).total, 140e9, name, 64, mfu)
    print(f"gpt3-6.7b on 140B tokens, 64 x {gpu(name).name:15s}: {est.days:5.2f} days, {est.gpu_hours:8.0f} GPU-hours")

# %% [markdown]
# ## 7 · Exercises
#
# Fill in each function, then run its cell: the checker tries it on fresh inputs and says what is off.
# Stuck? `print(solution("param_count"))` shows a reference solution.

# %%
from labkit.check.hardware import (check_allreduce_seconds, check_param_count, check_training_days,
                                   check_training_memory, solution)

# %% [markdown]
# **Exercise 1.** The exact parameter count of a nanoGPT-layout GPT (biases, LayerNorms, learned
# position embeddings, LM head tied to the token embedding).

# %%
def param_count(n_layer, n_head, n_embd, vocab_size, block_size):
    raise NotImplementedError  # your code here


check_param_count(param_count)

# %% [markdown]
# **Exercise 2.** GB (1e9 bytes) per GPU of the model states (weights, gradients, AdamW states) in
# mixed precision, under ZeRO stage `zero_stage` over `dp` data-parallel ranks.

# %%
def training_memory_gb(n_params, zero_stage, dp):
    raise NotImplementedError  # your code here


check_training_memory(training_memory_gb)

# %% [markdown]
# **Exercise 3.** Wall-clock days to train `n_params` on `n_tokens` with `n_gpus` GPUs of `peak_flops`
# at a given MFU.

# %%
def training_days(n_params, n_tokens, peak_flops, n_gpus, mfu):
    raise NotImplementedError  # your code here


check_training_days(training_days)

# %% [markdown]
# **Exercise 4.** Seconds of a ring all-reduce of `n_bytes` over `n_ranks` with per-link `bandwidth`
# (bytes/s) and per-step `latency` (s).

# %%
def allreduce_seconds(n_bytes, n_ranks, bandwidth, latency):
    raise NotImplementedError  # your code here


check_allreduce_seconds(allreduce_seconds)

# %%
# print(solution("training_memory"))

# %%
client.close()
cluster.close()

# %% [markdown]
# ## Recap
#
# - Datasheets give **dense** peaks per dtype; real runs sustain 30–45 % of them (MFU).
# - Training compute is $6ND$ (+ attention); memory is $16N$ bytes of model states plus activations,
#   divided by ZeRO/FSDP; the gradient all-reduce must hide behind the backward pass.
# - `inspect_cluster(client)` tells you what you got; `measure_cluster(client)` what it does, against
#   the catalog's peaks (roofline, bus bandwidth).
# - Choose hardware by cost per delivered FLOP and memory per GPU; scale by keeping communication hidden
#   and checkpoints resumable; secure by keeping the scheduler private and data in project storage.
#
# Next: [`03_preprocessing.ipynb`](03_preprocessing.ipynb) turns raw text into token shards, in parallel on the cluster.
