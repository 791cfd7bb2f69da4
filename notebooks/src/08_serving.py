# %% [markdown]
# # 08 · Serving: the model behind an authenticated API
#
# A trained model is only useful once people can call it. In this notebook you put the GPT from
# notebook 06 (or, if you have not trained one, a tiny demo GPT with random weights) behind an
# HTTP API, call it, and measure how fast it answers when several clients call at once.
#
# **Learning goals**
# 1. Start and stop an API server from a notebook: `POST /generate`, `POST /embed`, `GET /health`, `GET /metrics`.
# 2. Know what protects it: a bearer token on every route but `/health`, TLS, input limits that answer 4xx.
# 3. Make answers reproducible: the same seed gives the same text, batched or not.
# 4. Measure latency (p50, p95) and throughput under concurrent load, and see what dynamic batching buys.
# 5. Run the same server as a Slurm job on a GPU node.

# %% parameters
scale = None          # None: the lab's setting; or "tiny", "binder", "workshop", "full"
checkpoint = None     # a checkpoint file; None: the newest from notebook 06 or run_dir, else the demo model
run_dir = "runs"      # where training runs write checkpoints (LABKIT_RUN_DIR overrides)
embed = None          # serve MiniLM sentence embeddings on /embed; None: yes, except at tiny scale (~10 s to load)
run_on_slurm = False  # also submit the server as a Slurm job (needs a configured slurm profile)

# %% [markdown]
# ## 1. Pick the model and start the server
#
# `labkit.serve.start` runs the server (FastAPI on uvicorn) in a background thread of this kernel,
# so the notebook stays free. `port=0` picks a free port. Limits and batching come from the scale's
# preset, `ServeConfig.for_scale`. The server requires a token: without `LABKIT_SERVE_TOKEN` set,
# it makes a random one. We keep it in `server.token` and never print it.

# %%
import glob
import os
import tempfile

import labkit
from labkit.serve import LoadPreset, MiniLMEmbedder, ServeConfig, pick_generator, start

scale_name = labkit.load_config().scale(scale).name
config = ServeConfig.for_scale(scale_name, labkit.load_config().scale(scale_name).section("serve"))
embed = scale_name != "tiny" if embed is None else embed
# notebook 06 keeps its checkpoints in a folder labkit-06-* of the temporary directory
run_dirs = [os.environ.get("LABKIT_RUN_DIR", run_dir), *glob.glob(os.path.join(tempfile.gettempdir(), "labkit-06-*"))]
generator, why = pick_generator(checkpoint, run_dirs)
print("serving:", why)
server = start(generator, config=config, embedder=MiniLMEmbedder() if embed else None)
print(server, "| batches of up to", config.max_batch_size, "requests, waiting up to", config.max_wait_ms, "ms")

# %% [markdown]
# ## 2. Call it
#
# `server.client()` is an [httpx](https://www.python-httpx.org/) client that already sends
# `Authorization: Bearer <token>`. `/health` is the one route that needs no token, so a load
# balancer or Slurm can probe it.

# %%
import httpx

client = server.client()
print("health:", client.get("/health").json())
answer = client.post("/generate", json={"prompt": "The cluster", "max_new_tokens": 24, "seed": 7}).json()
print(answer)
print("without the token:", httpx.post(server.url + "/generate", json={"prompt": "hi"}).status_code)
print("too many tokens:", client.post("/generate", json={"prompt": "hi", "max_new_tokens": 10**6}).json()["error"])

# %% [markdown]
# On a shared cluster the token and the texts must not travel in clear: give the server a
# certificate and it speaks HTTPS only. Here a self-signed one, made on the spot; the client trusts
# exactly that certificate.

# %%
from labkit.serve import self_signed

cert, key = self_signed(tempfile.mkdtemp(prefix="labkit-08-tls-"))
with start(generator, config=config, certfile=cert, keyfile=key) as tls_server, tls_server.client() as tls_client:
    print(tls_server.url, "->", tls_client.post("/generate", json={"prompt": "secret", "max_new_tokens": 4}).json())

# %% [markdown]
# **Exercise 1.** Send the same request twice with the same `seed` and check that the texts match.
# (The server gives each request its own random generator, seeded from `seed`; when it batches
# requests together each row still samples with its own generator, so batching changes nothing.)

# %%
from labkit.check import serve as check

body = {"prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 1.0, "seed": 123}
first = client.post("/generate", json=body).json()
second = client.post("/generate", json=body).json()       # TODO: change nothing, or try a different seed
check.reproducible([first["text"], second["text"]], [first["seed"], second["seed"]])

# %% [markdown]
# Sentence embeddings come from the pretrained all-MiniLM-L6-v2 (notebook 05): one unit-length
# vector per text, so a dot product is a cosine similarity.

# %%
if embed:
    import torch

    texts = ["a GPU node in a cluster", "a compute node with accelerators", "a recipe for apple pie"]
    vecs = torch.tensor(client.post("/embed", json={"texts": texts}).json()["embeddings"])
    print("cosine similarities:\n", (vecs @ vecs.T).round(decimals=2))

# %% [markdown]
# ## 3. Latency under concurrent load
#
# `run_load` starts N client threads that send `/generate` requests as fast as answers come back.
# Each answer becomes an event; the live plot draws its latency as it arrives, one line per
# number of concurrent clients. With more clients the server batches more requests into one
# forward pass: each request may wait a little, but the server answers more per second.

# %%
from labkit.serve import run_load
from labkit.widgets.live_plot import LivePlot

preset = LoadPreset.for_scale(scale_name)
plot = LivePlot(metrics=("latency_ms",), x="request", group="concurrency", kinds=["serve_request"],
                title="latency per request (ms), by concurrent clients")
plot

# %%
results = [run_load(server.url, server.token, requests=preset.requests, concurrency=c,
                    max_new_tokens=preset.max_new_tokens, sink=plot) for c in preset.clients]
for r in results:
    print(r.summary())

# %% [markdown]
# The server keeps its own account on `/metrics`: requests per route and status, latency
# percentiles, generated tokens per second, and how large its batches were.

# %%
metrics = client.get("/metrics").json()
print({k: metrics[k] for k in ("requests", "responses_by_status", "tokens_per_second", "mean_batch_size",
                               "max_batch_size_seen")})
print("latency of /generate:", metrics["latency"]["/generate"])

# %% [markdown]
# **Exercise 2.** p50 and p95 are *percentiles*: sort the latencies; the q-th percentile lies
# `q/100` of the way from the first to the last, interpolating linearly between the two
# neighbours at position `(n - 1) * q / 100`. Finish `my_percentile` and check it; the checker
# says what is off. (`check.solution("percentile")` shows one answer.)

# %%
def my_percentile(values, q):
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    # TODO: pos falls between xs[int(pos)] and the next value: interpolate linearly between them
    return xs[round(pos)]          # the nearest value: close, but not the percentile yet


check.percentile(my_percentile)

# %% [markdown]
# ## 4. Stop it
#
# `server.stop()` stops accepting connections, lets the requests in flight finish, then stops the
# batching thread. Afterwards the port is closed.

# %%
client.close()
server.stop()
print(server, "| running:", server.running)

# %% [markdown]
# ## 5. From a terminal, and on a GPU node
#
# The same server runs from the command line:
#
# ```bash
# labkit serve --demo                      # tiny random model, try it in seconds
# labkit serve runs/my-run/step_00000500.pt --port 8000
# labkit serve --self-signed ~/.labkit/tls # TLS with a self-signed certificate
# labkit serve --slurm CHECKPOINT          # a Slurm job on a GPU node (the slurm profile), prints its URL
# ```
#
# As a Slurm job it takes the profile's partition, GPUs, walltime and prologue, listens on the
# node's network with TLS, and writes its URL where you can read it; the token travels in the job's
# environment, never in the script.

# %%
if run_on_slurm:
    from labkit.serve.slurm import submit

    job = submit(labkit.load_config().profile("slurm"), ["--demo", "--no-embed"], job_name="labkit-serve-08")
    print("job", job.job_id, "serving at", job.wait_url(timeout=300))
    job.cancel()

# %% [markdown]
# ## Recap
#
# - `labkit.serve.start(...)` serves a model from a notebook; `labkit serve` from a terminal or as a Slurm job.
# - Every route but `/health` needs the bearer token; TLS when given a certificate; inputs over the
#   limits get a 4xx that names the limit, malformed bodies never a 5xx.
# - Each request samples with its own seeded generator, so the same seed gives the same text, and
#   dynamic batching raises throughput without changing any answer.
# - p50 says what a typical request waits, p95 what the slow ones wait: measure both under load.
#
# That was the last step of the pipeline. Back to the overview: [00_welcome](00_welcome.ipynb).
