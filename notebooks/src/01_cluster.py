# %% [markdown]
# # 01 · Dask workers on Slurm GPU nodes, safely
#
# One call, `labkit.start_cluster()`, gives you Dask workers: processes on this machine (laptop,
# Binder), or Slurm jobs on GPU nodes (HPC JupyterHub). The notebook code is the same in both places;
# the *profile* decides.
#
# **Learning goals**
# 1. Start a cluster, see where its workers run and which GPU each one owns.
# 2. Watch it live: workers, memory, tasks, and Slurm jobs still pending with their reason.
# 3. Grow and shrink it, and pin a task to a GPU worker with Dask *resources*.
# 4. Close it so nothing is left running (and know what `labkit cleanup` is for).

# %% parameters
scale = None            # None: the lab's setting; or "tiny", "binder", "workshop", "full"
profile = None          # None: auto (Slurm when a site/user file configures it and sbatch answers, else local)
workers = 2             # one worker per GPU on Slurm
gpus_per_worker = 1     # on a machine without GPUs the local profile hands out labelled fake GPU slots

# %% [markdown]
# ## Start
#
# `start_cluster` prints which profile it picked and why. On Slurm it first checks the partition,
# GPUs, walltime, memory and account (a bad value fails in seconds, naming the fix), then submits one
# job per worker with `--gres=gpu:N`, and reports pending jobs with squeue's reason while it waits.
# Workers talk TLS with keys made for this session only.

# %%
import labkit

cluster = labkit.start_cluster(profile, workers=workers, gpus_per_worker=gpus_per_worker, timeout=300)
cluster

# %% [markdown]
# ## Inspect
#
# Each worker sees only its own GPUs through `CUDA_VISIBLE_DEVICES` (set by Slurm from the job's GRES,
# never overwritten by labkit). The dashboard listens on 127.0.0.1; on JupyterHub the link goes through
# jupyter-server-proxy.

# %%
print("GPUs per worker:", cluster.gpu_map())
print("dashboard:      ", cluster.dashboard_link)
print("Slurm jobs:     ", [j.describe() for j in cluster.jobs()] or "none (local workers)")

# %% [markdown]
# ## Watch
#
# The panel refreshes itself in the background every two seconds while you keep working.

# %%
from labkit.widgets.cluster_panel import ClusterPanel

panel = ClusterPanel(cluster)
panel

# %% [markdown]
# ## Scale
#
# Ask for one more worker, look at the panel (on a busy Slurm the new job may show
# `PENDING (Resources)`), then go back.

# %%
import time

cluster.scale(workers + 1)
time.sleep(3)
snapshot = cluster.status()
cluster.scale(workers)
print(snapshot.text())

# %% [markdown]
# ## Exercise: a task that needs a GPU
#
# Dask only sends a task to a worker that has the *resources* it asks for; labkit gives every GPU
# worker the resource `GPU`. Write `submit_on_a_gpu` so `fn` runs on a worker that owns a GPU.
# Replace the body with your own one line (hint: `client.submit` takes `resources=`); the checker calls
# it with a probe that reports what the worker sees. Stuck? `print(show_solution("gpu_task"))`.

# %%
from labkit.check.cluster import check_gpu_task, show_solution, solution


def submit_on_a_gpu(client, fn):
    """Submit fn so that it runs on a worker that owns a GPU; return the future."""
    return solution("gpu_task")(client, fn)  # replace this line with your own


print(check_gpu_task(cluster, submit_on_a_gpu))

# %% [markdown]
# ## Close
#
# `close()` cancels every job of this session and deletes its keys. If a kernel dies without closing,
# its workers notice the scheduler is gone and end their jobs by themselves; `labkit cleanup` in a
# terminal cancels anything left over. In scripts, prefer `with labkit.start_cluster(...) as cluster:`.

# %%
cluster.close()
print(panel.refresh().text())

# %% [markdown]
# ## Recap
#
# - `labkit.start_cluster()` gives a local or a Slurm cluster from the same code; the profile decides.
# - One Slurm job per worker, its GPUs from `--gres`, its `CUDA_VISIBLE_DEVICES` from Slurm.
# - TLS with per-session keys; dashboard on localhost (proxied on JupyterHub).
# - Pin GPU work with `resources={"GPU": 1}`; watch the cluster with `ClusterPanel`.
# - Always close; `labkit cleanup` is the safety net.
#
# Next: [`02_hardware.ipynb`](02_hardware.ipynb): what a GPU cluster is made of.
