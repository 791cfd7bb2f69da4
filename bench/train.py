"""Training speed of labkit's GPT, and time to the first optimizer step on warm Dask workers.

    python -m bench.train            # both parts
    python -m bench.train --part a   # (a) tokens/s vs a plain PyTorch GPT, MFU, loss agreement
    python -m bench.train --part b   # (b) first step: warm Dask workers vs torchrun from cold
    python -m bench.train --part c   # (c) the training loop's tokens/s vs a bare step loop

(a) The same shape and hyper-parameters (4 layers, 4 heads, 128 dims, T=128, B=16, AdamW) on the
same batches, timed interleaved in one process: a plain PyTorch GPT (float32, SDPA, AdamW with
torch's defaults) against ``labkit.model.GPT`` with ``labkit.train.make_optimizer``, once in float32
(the like-for-like figure; once more with GPT-2's tanh GELU, as the plain GPT has, to show what
labkit's exact GELU brings) and once at ``precision="auto"`` (bf16 autocast only where the CPU has
AVX512-BF16/AMX and its bf16 matmuls measure >= 1.3x float32's, ``labkit.model.bf16_is_fast``; elsewhere
that is float32 again). The CPU's name and flags come first. MFU is taken against
a matmul peak measured in this run for the dtype used. Then 200 steps of labkit's path are
compared with 200 float32 steps: the final losses must agree within 2%. Last, the figures the goal is
about: each trainer in a process of its own, as training runs, the processes taking turns round by
round: the plain GPT with PyTorch's and glibc's defaults, labkit's after ``labkit.train.prepare_process``
(what every rank on a Dask worker does: its threads, and a heap that keeps freed memory instead of
faulting the step's activations back in every step, ``labkit.core.heap``); page faults per step
are printed for both.

(b) ``train_distributed`` on 2 already-running Dask workers (second run: imports and data warm)
against ``torchrun --nproc_per_node=2`` launching the same training from a cold start; both timed
from the call to the end of the first optimizer step.

(c) ``labkit.train.train`` (data drawn per step, schedule, clipping, metrics, host syncs at the log
interval) on the shape of (a), against a bare loop of labkit's model and optimizer over batches
drawn in advance that reads the loss on the host every step; timed interleaved, with the loop at
``log_interval=1`` and ``log_interval=10``. The ratio is what the loop costs on top of the math.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
BATCH = 16
LR = 1e-3


# ------------------------------------------------------------------ the baseline: a plain GPT


class PlainBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.h, D // self.h).permute(0, 2, 1, 3) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.permute(0, 2, 1, 3).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """What one writes from the GPT-2 paper with plain PyTorch: float32, SDPA, tanh GELU, tied embeddings."""

    def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(PlainBlock(n_embd, n_head) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------------- helpers


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in ``dtype`` on this CPU, best of a few timed bursts."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def batches(data_dir: Path, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from labkit.train import batch_rows, open_data

    train, _ = open_data(data_dir)
    return [batch_rows(train, SHAPE["block_size"], seed, s, BATCH, 0, BATCH) for s in range(n)]


def step_plain(model, opt, x, y) -> float:
    loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def step_labkit(model, opt, x, y) -> float:
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def make_labkit(vocab: int, precision: str, activation: str = "gelu"):
    from labkit.model import GPT, GPTConfig
    from labkit.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, precision=precision, activation=activation, **SHAPE))
    opt = make_optimizer(model, TrainConfig(lr=LR, min_lr=0.0, weight_decay=0.1))
    return model, opt


def make_plain(vocab: int):
    torch.manual_seed(0)
    model = PlainGPT(vocab, **SHAPE)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    return model, opt


# ------------------------------------------------------------------------------- part (a)


PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_summary(wanted: tuple[str, ...] = PRECISION_FLAGS) -> str:
    """The CPU's name and which of the ``wanted`` flags it has (by default those that decide its fast
    precisions: AVX2, AVX-512, AVX512-BF16, AMX)."""
    from labkit.model import cpu_flags

    name = ""
    try:
        name = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name")), "")
    except OSError:
        pass
    have = [f for f in wanted if f in cpu_flags()]
    return f"{name or 'unknown CPU'}; flags: {' '.join(have) or 'none of ' + ', '.join(wanted)}"


def part_a(data_dir: Path, rounds: int = 5, steps_per_round: int = 10, loss_steps: int = 200) -> dict:
    """Tokens/s of plain PyTorch (float32) against labkit in float32 and in the machine's best precision."""
    from labkit.model import autocast_dtype, cpu_bf16_speedup

    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    data = batches(data_dir, max(loss_steps, steps_per_round * rounds + 3))
    dtype = autocast_dtype("auto", "cpu") or torch.float32
    runners = {"plain": (*make_plain(vocab), step_plain), "labkit_fp32": (*make_labkit(vocab, "float32"), step_labkit),
               # labkit with the plain GPT's tanh GELU: what the rest of labkit's path gains or costs
               "labkit_fp32_tanh": (*make_labkit(vocab, "float32", "gelu_tanh"), step_labkit)}
    if dtype != torch.float32:  # where "auto" is float32 the best precision is the float32 run itself
        runners["labkit_best"] = (*make_labkit(vocab, "auto"), step_labkit)
    for i in range(3):  # warm all
        for m, o, fn in runners.values():
            fn(m, o, *data[i])
    # the peaks are measured before and after the steps and the better kept: one burst that another
    # process slowed down would otherwise make an MFU above 1 (seen on a loaded 2-core machine: 1.2)
    peak32 = matmul_peak(torch.float32)
    peak = matmul_peak(dtype) if dtype != torch.float32 else peak32
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):  # interleaved, so load from other processes hits all alike
        for name, (m, o, fn) in runners.items():
            t0 = time.perf_counter()
            for s in range(steps_per_round):
                fn(m, o, *data[3 + r * steps_per_round + s])
            times[name].append(time.perf_counter() - t0)
    tokens = steps_per_round * BATCH * SHAPE["block_size"]
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    tps.setdefault("labkit_best", tps["labkit_fp32"])
    flops_per_token = runners["labkit_fp32"][0].flops_per_token(SHAPE["block_size"])
    peak32 = max(peak32, matmul_peak(torch.float32))
    peak = max(peak, matmul_peak(dtype)) if dtype != torch.float32 else peak32
    # loss agreement: labkit's path vs the same model in float32, same init and batches
    curves = {}
    for precision in ("auto", "float32"):
        m, o = make_labkit(vocab, precision)
        curves[precision] = [step_labkit(m, o, *data[s]) for s in range(loss_steps)]
    tail = lambda c: statistics.fmean(c[-10:])  # noqa: E731 - mean of the last 10 steps
    rel = abs(tail(curves["auto"]) - tail(curves["float32"])) / tail(curves["float32"])
    # as training runs: each trainer in a process of its own, labkit's set up as its ranks are
    trainers = {"plain": ("plain", "float32"), "labkit_fp32": ("labkit", "float32")}
    if dtype != torch.float32:
        trainers["labkit_best"] = ("labkit", "auto")
    own = own_processes(data_dir, trainers, rounds, steps_per_round)
    own.setdefault("labkit_best", own["labkit_fp32"])
    return {
        "own_plain_tokens_per_s": own["plain"]["tokens_per_s"],
        "own_labkit_fp32_tokens_per_s": own["labkit_fp32"]["tokens_per_s"],
        "own_labkit_tokens_per_s": own["labkit_best"]["tokens_per_s"],
        "own_speedup_fp32": own["labkit_fp32"]["tokens_per_s"] / own["plain"]["tokens_per_s"],
        "own_speedup": own["labkit_best"]["tokens_per_s"] / own["plain"]["tokens_per_s"],
        "faults_per_step_plain": own["plain"]["faults_per_step"],
        "faults_per_step_labkit": own["labkit_fp32"]["faults_per_step"],
        "cpu": cpu_summary(), "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "bf16_matmul_speedup": cpu_bf16_speedup(),
        "vocab": vocab, "plain_tokens_per_s": tps["plain"], "labkit_fp32_tokens_per_s": tps["labkit_fp32"],
        "labkit_tokens_per_s": tps["labkit_best"],
        "labkit_fp32_tanh_tokens_per_s": tps["labkit_fp32_tanh"],
        "speedup_fp32": tps["labkit_fp32"] / tps["plain"], "speedup": tps["labkit_best"] / tps["plain"],
        "speedup_fp32_tanh": tps["labkit_fp32_tanh"] / tps["plain"],
        "goal_speedup": 1.10,
        "matmul_peak_gflops": peak / 1e9, "matmul_peak_fp32_gflops": peak32 / 1e9,
        "mfu_labkit": tps["labkit_best"] * flops_per_token / peak,
        "mfu_labkit_fp32": tps["labkit_fp32"] * flops_per_token / peak32,
        "mfu_plain_fp32": tps["plain"] * flops_per_token / peak32,
        "loss_first": curves["float32"][0], "loss_200_float32": tail(curves["float32"]),
        "loss_200_labkit": tail(curves["auto"]), "loss_rel_diff": rel, "goal_loss_rel_diff": 0.02,
    }


def _faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _trainer_process(conn, data_dir: str, kind: str, precision: str, steps_per_round: int, n_batches: int) -> None:
    """One trainer in a process of its own: build, warm, then run ``steps_per_round`` steps whenever
    the parent says go, and answer (seconds, minor page faults). ``kind`` plain: PyTorch's defaults;
    labkit: the process set up as a rank on a Dask worker is (``prepare_process``)."""
    vocab = json.loads((Path(data_dir) / "meta.json").read_text())["vocab_size"]
    data = batches(Path(data_dir), n_batches)
    if kind == "plain":
        (model, opt), fn = make_plain(vocab), step_plain
    else:
        from labkit.train import TrainConfig, prepare_process

        prepare_process(TrainConfig(device="cpu"), torch.device("cpu"), keep_heap=True)
        (model, opt), fn = make_labkit(vocab, precision), step_labkit
    for i in range(3):
        fn(model, opt, *data[i])
    conn.send("ready")
    r = 0
    while conn.recv():
        f0, t0 = _faults(), time.perf_counter()
        for s in range(steps_per_round):
            fn(model, opt, *data[3 + (r * steps_per_round + s) % (n_batches - 3)])
        conn.send((time.perf_counter() - t0, _faults() - f0))
        r += 1


def own_processes(data_dir: Path, trainers: dict[str, tuple[str, str]], rounds: int,
                  steps_per_round: int) -> dict[str, dict[str, float]]:
    """Tokens/s and page faults per step of each trainer (name -> (kind, precision)) in a process of
    its own, as real training runs: the processes take turns, one round each, so load from elsewhere
    hits them alike, and only one computes at a time."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = {}, {}
    try:
        for name, (kind, precision) in trainers.items():
            parent, child = ctx.Pipe()
            procs[name] = ctx.Process(target=_trainer_process, daemon=True,
                                      args=(child, str(data_dir), kind, precision, steps_per_round, 3 + steps_per_round * 4))
            procs[name].start()
            conns[name] = parent
            if parent.recv() != "ready":  # warm one at a time: no warm-up shares the cores with another
                raise RuntimeError(f"trainer {name} did not start")
        seconds: dict[str, list[float]] = {n: [] for n in trainers}
        faults: dict[str, list[int]] = {n: [] for n in trainers}
        for _ in range(rounds):
            for name, conn in conns.items():
                conn.send(True)
                sec, flt = conn.recv()
                seconds[name].append(sec)
                faults[name].append(flt)
        for conn in conns.values():
            conn.send(False)
    finally:
        for proc in procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    tokens = steps_per_round * BATCH * SHAPE["block_size"]
    return {n: {"tokens_per_s": tokens / statistics.median(seconds[n]),
                "faults_per_step": statistics.median(faults[n]) / steps_per_round} for n in trainers}


# ------------------------------------------------------------------------------- part (b)


def _first_step_config():
    from labkit.model import GPTConfig
    from labkit.train import TrainConfig

    return TrainConfig(model=GPTConfig(**SHAPE, precision="float32"), batch_size=BATCH, max_steps=2, warmup_steps=1,
                       eval_interval=0, sample_tokens=0, num_threads=1)


def part_b(data_dir: Path, repeats: int = 3) -> dict:
    from dask.distributed import Client, LocalCluster

    from labkit.train import train_distributed

    config = _first_step_config()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent)]
                                                     + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
               OMP_NUM_THREADS="1")
    entry = Path(__file__).with_name("_torchrun_entry.py")
    cold = []
    for _ in range(repeats):
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(entry),
                            str(data_dir), json.dumps(config.to_dict())],
                           capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{r.stderr[-3000:]}")
        line = [l for l in r.stdout.splitlines() if l.startswith("{")][-1]
        cold.append(json.loads(line)["first_step_time"] - t0)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        train_distributed(client, config, data_dir)  # the workers are now warm: torch imported, code loaded
        warm = []
        for _ in range(repeats):
            t0 = time.time()
            res = train_distributed(client, config, data_dir)
            warm.append(res.first_step_time - t0)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"torchrun_cold_s": c, "dask_warm_s": w, "ratio": w / c, "goal_ratio": 0.2,
            "cold_runs": cold, "warm_runs": warm}


# ------------------------------------------------------------------------------- part (c)


def _loop_config(steps: int, log_interval: int):
    from labkit.train import TrainConfig

    return TrainConfig().replace(**SHAPE, batch_size=BATCH, max_steps=steps, warmup_steps=1, lr=LR, min_lr=0.0,
                                 eval_interval=0, sample_tokens=0, checkpoint_dir=None, log_interval=log_interval,
                                 precision="auto", device="cpu")


def part_c(data_dir: Path, rounds: int = 5, steps_per_round: int = 20) -> dict:
    from labkit.train import train

    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    data = batches(data_dir, steps_per_round + 1)
    tokens = steps_per_round * BATCH * SHAPE["block_size"]
    times: dict[str, list[float]] = {"bare": [], "loop_log1": [], "loop_log10": []}
    for _ in range(rounds):  # interleaved, so load from other processes hits all alike
        lab, lopt = make_labkit(vocab, "auto")
        step_labkit(lab, lopt, *data[0])  # warm, like the loop's first (untimed) step
        t0 = time.perf_counter()
        for s in range(steps_per_round):
            step_labkit(lab, lopt, *data[1 + s])
        times["bare"].append(tokens / (time.perf_counter() - t0))
        for name, every in (("loop_log1", 1), ("loop_log10", 10)):
            res = train(_loop_config(steps_per_round + 1, every), data_dir)  # its first step is not timed
            times[name].append(res.tokens_per_s)
    tps = {k: statistics.median(v) for k, v in times.items()}
    return {"threads": torch.get_num_threads(), "bare_tokens_per_s": tps["bare"],
            "loop_log1_tokens_per_s": tps["loop_log1"], "loop_log10_tokens_per_s": tps["loop_log10"],
            "ratio_log1": tps["loop_log1"] / tps["bare"], "ratio_log10": tps["loop_log10"] / tps["bare"],
            "rounds": times}


def len_steps(args) -> int:
    return 6 if args.quick else args.loss_steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="toy sizes (a smoke test, not a measurement)")
    p.add_argument("--loss-steps", type=int, default=200, help="steps of the loss comparison (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of 10 steps each")
    args = p.parse_args(argv)
    from labkit.data.shards import make_tiny_shards

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        data_dir = Path(tmp) / "shards"
        make_tiny_shards(data_dir)
        if args.part in ("a", "all"):
            kw = (dict(rounds=2, steps_per_round=2, loss_steps=6) if args.quick
                  else dict(rounds=args.rounds, loss_steps=args.loss_steps))
            out["a"] = part_a(data_dir, **kw)
            a = out["a"]
            print(f"(a) CPU: {a['cpu']}; {a['threads']} threads; bf16 matmuls {a['bf16_matmul_speedup']:.2f}x float32's "
                  f"(precision='auto' takes bf16 from 1.3x on a CPU with AVX512-BF16/AMX): best precision here: {a['dtype']}")
            print(f"    as training runs, each in its own process (labkit's set up as its ranks on Dask workers are), "
                  f"tokens/s, both float32: labkit {a['own_labkit_fp32_tokens_per_s']:,.0f} vs plain PyTorch "
                  f"{a['own_plain_tokens_per_s']:,.0f}: {a['own_speedup_fp32']:.2f}x (goal >= 1.10x); labkit at its "
                  f"best precision ({a['dtype']}): {a['own_labkit_tokens_per_s']:,.0f}: {a['own_speedup']:.2f}x "
                  f"(goal >= 1.10x)")
            print(f"    page faults per step: labkit {a['faults_per_step_labkit']:,.0f} (heap kept), plain "
                  f"{a['faults_per_step_plain']:,.0f} (glibc's defaults)")
            print(f"    model and optimizer alone, interleaved in one process (no process setup), both float32: "
                  f"labkit {a['labkit_fp32_tokens_per_s']:,.0f} vs plain {a['plain_tokens_per_s']:,.0f}: "
                  f"{a['speedup_fp32']:.2f}x; with the plain GPT's tanh GELU instead of the exact one "
                  f"{a['speedup_fp32_tanh']:.2f}x; labkit at {a['dtype']}: {a['speedup']:.2f}x")
            print(f"    MFU: labkit {a['mfu_labkit']:.1%} of a {a['matmul_peak_gflops']:.0f} GFLOP/s {a['dtype']} matmul "
                  f"peak; in float32 labkit {a['mfu_labkit_fp32']:.1%}, plain {a['mfu_plain_fp32']:.1%} of "
                  f"{a['matmul_peak_fp32_gflops']:.0f} GFLOP/s")
            print(f"    loss after {len_steps(args)} steps: {a['loss_200_labkit']:.4f} vs float32 {a['loss_200_float32']:.4f} "
                  f"(from {a['loss_first']:.3f}): {a['loss_rel_diff']:.2%} apart (goal <= 2%)")
        if args.part in ("b", "all"):
            out["b"] = b = part_b(data_dir, repeats=1 if args.quick else 3)
            print(f"(b) time to the first optimizer step: warm Dask workers {b['dask_warm_s']:.2f} s vs "
                  f"torchrun --nproc_per_node=2 from cold {b['torchrun_cold_s']:.2f} s: {b['ratio']:.2f}x (goal <= 0.2x)")
        if args.part in ("c", "all"):
            out["c"] = c = part_c(data_dir, **(dict(rounds=1, steps_per_round=3) if args.quick
                                              else dict(rounds=args.rounds)))
            print(f"(c) tokens/s: labkit.train.train {c['loop_log1_tokens_per_s']:,.0f} (log_interval=1), "
                  f"{c['loop_log10_tokens_per_s']:,.0f} (log_interval=10) vs a bare step loop "
                  f"{c['bare_tokens_per_s']:,.0f}: {c['ratio_log1']:.2f}x / {c['ratio_log10']:.2f}x")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
