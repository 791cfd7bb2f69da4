"""All-reduce and DDP training tokens/s within one node and across nodes on Slurm workers, in one run.

    python -m bench.multinode                  # the local Slurm: partition nodes, 2 nodes, CPU ranks (gloo)
    python -m bench.multinode --part a         # (a) all-reduce only;  --part b: (b) training only
    python -m bench.multinode --quick          # toy sizes (a smoke run, not a measurement)
    python -m bench.multinode --partition gpu --interface ib0 --gpus-per-worker 1 \\
        --nodes gpu01,gpu02 --ranks-per-node 4 --cores 8 --memory 32GiB   # a real site (nccl)

One cluster of ``--ranks-per-node`` x nodes Dask workers (one Slurm job each, or
``--workers-per-job`` per job) is started with ``labkit.cluster.start_cluster``; the workers are
grouped by the host they run on, and the same workers serve every layout:

(a) all-reduce through ``labkit.core.ranks.run_ranks`` (``labkit.hardware.measure.allreduce_rank``):
latency as the median of many all-reduces of a small tensor (8 bytes), and bus bandwidth
(2(n-1)/n x bytes / time, nccl-tests' definition) of 4 MiB and 64 MiB float32 tensors, for 2 ranks
within one node, 2 ranks on 2 nodes and all ranks over all nodes; layouts interleaved round by
round, medians over the rounds, printed as ratios against the within-node pair.

(b) ``labkit.train.train_distributed`` (DDP) of a tiny GPT (4 layers, 4 heads, 128 dims, T=128, 16
sequences per rank and step), a fixed number of steps, on 1 rank, 2 ranks in one node, 2 ranks on 2
nodes and all ranks over all nodes; tokens/s of all ranks together (first step left out), medians
over interleaved rounds, printed as ratios against the single rank measured in the same run.

The backend is run_ranks' choice: nccl where every rank has its own GPU, gloo otherwise. On the
development VM these are CPU figures on a shared 2-core machine: the "nodes" are namespaces of one
kernel whose "network" is a Linux bridge (labkit0), and four ranks share two cores. They show the
method, not real interconnect numbers; the output says so whenever the nodes share this machine's
kernel or the ranks run on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from labkit.cluster import slurmcli, start_cluster
from labkit.data.shards import make_tiny_shards
from labkit.hardware.inspect import probe
from labkit.hardware.measure import MeasureConfig, measure_allreduce
from labkit.model import cpu_flags
from labkit.train import TrainConfig, train_distributed

from bench.train import BATCH, SHAPE

MIB = 1024**2
# the flags that decide CPU speed for this work: vector width and bf16 (labkit.model.bf16_is_fast)
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
QUICK = dict(sizes_mib=(1.0,), latency_repeats=20, repeats=3, rounds=1, steps=3, train_rounds=1, batch=2,
             shape=dict(n_layer=1, n_head=2, n_embd=32, block_size=32))


# ------------------------------------------------------------------------------- helpers


def cpu_line(host: str, model: str, cores: int, flags: Sequence[str]) -> str:
    """The CPU flags line of one host: its CPU, core count and which of ``FLAGS`` it has."""
    have = [f for f in FLAGS if f in flags]
    return f"CPU {host}: {model}, {cores} cores; flags: {' '.join(have) or 'none'} (of {' '.join(FLAGS)})"


def host_facts(dask_worker: Any = None) -> dict[str, Any]:
    """Runs on each worker (and here): hostname, CPU, core count, load, and the kernel's boot id
    (the same on namespaces of one machine, different on real nodes)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    hw = probe(dask_worker)
    return {"host": hw.host, "boot_id": boot, "cpus": hw.host_cpus, "model": hw.cpu_model,
            "flags": sorted(cpu_flags() & set(FLAGS)), "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0}


def group_by_host(hosts: dict[str, str]) -> dict[str, list[str]]:
    """Worker address -> host, turned into host -> its worker addresses (both sorted, so runs repeat)."""
    out: dict[str, list[str]] = {}
    for addr, host in sorted(hosts.items()):
        out.setdefault(host, []).append(addr)
    return dict(sorted(out.items()))


def layouts(hosts: dict[str, str], nodes: int = 2, per_node: int = 2) -> dict[str, list[str]] | None:
    """The rank layouts of this benchmark, label -> worker addresses in rank order (node by node), or
    None when the workers do not yet fill ``per_node`` ranks on each of ``nodes`` hosts."""
    full = [(h, a[:per_node]) for h, a in group_by_host(hosts).items() if len(a) >= per_node]
    if nodes < 2 or per_node < 2 or len(full) < nodes:
        return None
    (_, first), (_, second) = full[0], full[1]
    every = [a for _, addrs in full[:nodes] for a in addrs]
    return {"1 rank, 1 node": first[:1], "2 ranks, 1 node": first[:2], "2 ranks, 2 nodes": [first[0], second[0]],
            f"{len(every)} ranks, {nodes} nodes": every}


def ratios(values: dict[str, float], base: str) -> dict[str, float]:
    """Each value divided by the value of ``base`` (which gives 1.0)."""
    return {k: v / values[base] for k, v in values.items()}


def bus_bandwidth(n_bytes: float, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce, bytes/s: 2(n-1)/n x bytes / time."""
    return 2 * (ranks - 1) / ranks * n_bytes / seconds


def caveat(facts: dict[str, dict[str, Any]], here: dict[str, Any], backend: str) -> str | None:
    """What the figures are not, when the nodes share this machine's kernel or the ranks run on CPU."""
    same = {f["boot_id"] for f in facts.values()} == {here["boot_id"]} and bool(here["boot_id"])
    if not same and backend == "nccl":
        return None
    cpus = sorted({f["cpus"] for f in facts.values()})
    parts = []
    if backend != "nccl":
        parts.append(f"CPU figures ({backend} on CPU ranks)")
    if same:
        parts.append(f"the nodes are namespaces of this one machine ({'/'.join(map(str, cpus))} cores shared by "
                     f"every rank and by other work; load average {here['load']:.1f}) and the 'network' between "
                     f"them never leaves its kernel (scripts/local-slurm.sh: a Linux bridge between namespaces)")
    return "NOTE: " + "; ".join(parts) + ". They show the method, not real interconnect numbers."


def allreduce_report(rows: dict[str, dict[str, Any]], base: str) -> str:
    """The all-reduce table: latency and bus bandwidth per layout, and each as a ratio against ``base``."""
    sizes = sorted({s for r in rows.values() for s in r["busbw"]})
    lat = ratios({k: r["latency_s"] for k, r in rows.items()}, base)
    bw = {s: ratios({k: r["busbw"][s] for k, r in rows.items()}, base) for s in sizes}
    head = f"  {'layout':<18} {'latency':>10} {'x':>6}" + "".join(f" {_size(s) + ' busbw':>17} {'x':>6}" for s in sizes)
    lines = [head]
    for k, r in rows.items():
        line = f"  {k:<18} {r['latency_s'] * 1e6:>7.0f} us {lat[k]:>5.2f}x"
        line += "".join(f" {r['busbw'][s] / 1e9:>11.3f} GB/s {bw[s][k]:>5.2f}x" for s in sizes)
        lines.append(line)
    lines.append(f"  (x: against {base}; latency above 1x and bandwidth below 1x are slower)")
    return "\n".join(lines)


def training_report(rows: dict[str, dict[str, Any]], base: str) -> str:
    """The training table: tokens/s per layout and its ratio against ``base`` (the single rank)."""
    tps = ratios({k: r["tokens_per_s"] for k, r in rows.items()}, base)
    lines = [f"  {'layout':<18} {'tokens/s':>10} {'x':>6}  per rank"]
    for k, r in rows.items():
        lines.append(f"  {k:<18} {r['tokens_per_s']:>10,.0f} {tps[k]:>5.2f}x  {tps[k] / r['ranks']:.2f}x")
    lines.append(f"  (x: against {base}; per rank: x / ranks, 1.00x is linear scaling)")
    return "\n".join(lines)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / MIB:g} MiB" if n_bytes >= MIB else f"{n_bytes} B"


def _rotate(items: Sequence[Any], r: int) -> list[Any]:
    """The items starting at position ``r``: each round begins with another layout, so load hits all alike."""
    r %= len(items)
    return list(items[r:]) + list(items[:r])


# ------------------------------------------------------------------------------- the cluster


def exclude_for(nodes: Sequence[str], partition: str) -> list[str]:
    """``--exclude`` for the job template so that every job lands on one of ``nodes`` (a single
    template cannot name one node per job)."""
    listed = slurmcli.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N"]).split()
    missing = sorted(set(nodes) - set(listed))
    if missing:
        raise SystemExit(f"--nodes {','.join(missing)}: not in partition {partition!r}, which has {', '.join(listed)}")
    others = sorted(set(listed) - set(nodes))
    return [f"--exclude={','.join(others)}"] if others else []


def place(handle: Any, nodes: int, per_node: int, tries: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Layouts from the workers of ``handle``; while Slurm put too few on some node, ask for
    ``per_node`` more (at most ``tries`` times). Returns the layouts and address -> host."""
    for attempt in range(tries + 1):
        hosts = handle.client.run(socket.gethostname)
        found = layouts(hosts, nodes, per_node)
        if found:
            return found, hosts
        if attempt < tries:
            have = len(hosts)
            print(f"workers per host {({h: len(a) for h, a in group_by_host(hosts).items()})}: "
                  f"asking for {per_node} more", flush=True)
            handle.scale(have + per_node, wait=True)
    raise SystemExit(f"Slurm placed the workers {group_by_host(hosts)}: not {per_node} on each of {nodes} nodes; "
                     f"ask for one job per node (--workers-per-job {per_node} --job-extra=--exclusive) or more "
                     f"--cores per worker")


# ------------------------------------------------------------------------------- part (a)


def part_a(client: Any, plan: dict[str, list[str]], sizes: Sequence[int], latency_bytes: int = 8,
           latency_repeats: int = 200, repeats: int = 10, rounds: int = 3, backend: str = "auto") -> dict[str, Any]:
    """All-reduce latency and bus bandwidth per layout of 2+ ranks: medians over interleaved rounds."""
    lat_cfg = MeasureConfig(allreduce_sizes=(latency_bytes,), warmup=10, repeats=latency_repeats)
    bw_cfg = MeasureConfig(allreduce_sizes=tuple(sizes), warmup=2, repeats=repeats)
    multi = [k for k, addrs in plan.items() if len(addrs) > 1]
    seen: dict[tuple[str, str, int], list[float]] = {}  # (layout, "latency" or "bandwidth", bytes) -> seconds
    used = "?"
    for r in range(rounds):
        for k in _rotate(multi, r):
            for what, cfg in (("latency", lat_cfg), ("bandwidth", bw_cfg)):
                for p in measure_allreduce(client, cfg, workers=plan[k], backend=backend, timeout=300):
                    seen.setdefault((k, what, p.n_bytes), []).append(p.seconds)
                    used = p.backend
        print(f"(a) round {r + 1} of {rounds} done", flush=True)
    rows = {}
    for k in multi:
        med = {(what, n): statistics.median(v) for (lay, what, n), v in seen.items() if lay == k}
        [(_, small)] = [key for key in med if key[0] == "latency"]
        n = len(plan[k])
        rows[k] = {"ranks": n, "latency_s": med["latency", small], "latency_bytes": small,
                   "seconds": {b: t for (what, b), t in med.items() if what == "bandwidth"},
                   "busbw": {b: bus_bandwidth(b, t, n) for (what, b), t in med.items() if what == "bandwidth"}}
    return {"backend": used, "rows": rows}


# ------------------------------------------------------------------------------- part (b)


def train_config(steps: int, batch: int = BATCH, threads: int = 1, shape: dict[str, int] | None = None) -> TrainConfig:
    """The tiny GPT run each layout trains: ``steps`` steps of ``batch`` sequences per rank, no evaluation."""
    return TrainConfig().replace(**(shape or SHAPE), batch_size=batch, max_steps=steps, warmup_steps=1,
                                 eval_interval=0, sample_tokens=0, checkpoint_dir=None, log_interval=max(1, steps),
                                 precision="auto", device="auto", num_threads=threads)


def part_b(client: Any, plan: dict[str, list[str]], data_dir: Path, config: TrainConfig, rounds: int = 3,
           backend: str = "auto") -> dict[str, Any]:
    """DDP tokens/s per layout (all ranks together, first step left out): medians over interleaved rounds."""
    every = max(plan.values(), key=len)
    train_distributed(client, config.replace(max_steps=2), data_dir, workers=every, backend=backend)  # warm
    seen: dict[str, list[float]] = {k: [] for k in plan}
    for r in range(rounds):
        for k in _rotate(list(plan), r):
            res = train_distributed(client, config, data_dir, workers=plan[k], backend=backend, timeout=300)
            seen[k].append(res.tokens_per_s)
        print(f"(b) round {r + 1} of {rounds} done", flush=True)
    tokens = config.batch_size * config.model.block_size
    return {"steps": config.max_steps, "tokens_per_rank_step": tokens,
            "rows": {k: {"ranks": len(plan[k]), "tokens_per_s": statistics.median(v), "runs": v}
                     for k, v in seen.items()}}


# ------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    """The command line: where the workers go (partition, nodes, GPUs, interface) and the sizes."""
    ap = argparse.ArgumentParser(prog="python -m bench.multinode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_argument_group("where the ranks run")
    where.add_argument("--profile", default="slurm", help="labkit cluster profile (default slurm)")
    where.add_argument("--partition", default="nodes", help="Slurm partition (default nodes, the local Slurm's)")
    where.add_argument("--interface", default="labkit0",
                       help="network interface of the nodes for Dask and torch.distributed (default labkit0)")
    where.add_argument("--nodes", default="", help="comma-separated node names to use (default: any of the partition)")
    where.add_argument("--node-count", type=int, default=2, help="nodes to spread over (default 2; --nodes sets it)")
    where.add_argument("--ranks-per-node", type=int, default=2, help="ranks per node in the all-nodes layout (default 2)")
    where.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs per rank (default 0: CPU ranks, gloo)")
    where.add_argument("--cores", type=int, default=1, help="cores per worker (default 1)")
    where.add_argument("--memory", default="2GiB", help="memory per worker (default 2GiB)")
    where.add_argument("--workers-per-job", type=int, default=1, help="Dask workers per Slurm job (default 1)")
    where.add_argument("--job-extra", action="append", default=[], help="extra #SBATCH line, repeatable")
    where.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    where.add_argument("--timeout", type=float, default=180, help="seconds for the workers to join")
    a = ap.add_argument_group("(a) all-reduce")
    a.add_argument("--sizes", default="4,64", help="bus-bandwidth tensor sizes in MiB (default 4,64)")
    a.add_argument("--latency-bytes", type=int, default=8, help="latency tensor size (default 8)")
    a.add_argument("--latency-repeats", type=int, default=200, help="all-reduces whose median is the latency")
    a.add_argument("--repeats", type=int, default=10, help="timed all-reduces per bandwidth size and round")
    a.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the layouts (default 3)")
    b = ap.add_argument_group("(b) DDP training")
    b.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    b.add_argument("--train-rounds", type=int, default=3, help="interleaved rounds over the layouts (default 3)")
    b.add_argument("--batch", type=int, default=BATCH, help=f"sequences per rank and step (default {BATCH})")
    b.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank (default 1)")
    b.add_argument("--data-dir", default=None,
                   help="token shards every node sees (default: tiny shards made under ~/.cache/labkit, not /tmp)")
    ap.add_argument("--part", choices=("a", "b", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="toy sizes (a smoke run, not a measurement)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    return ap


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the workers, measure the parts asked for, print the tables; returns every figure."""
    quick = QUICK if args.quick else {}
    pick = lambda key: quick.get(key, getattr(args, key))  # noqa: E731 - --quick's value, else the option's
    names = [n for n in args.nodes.split(",") if n]
    node_count = len(names) or args.node_count
    per_node = args.ranks_per_node
    if node_count < 2 or per_node < 2:
        raise SystemExit(f"needs 2+ nodes and 2+ ranks per node (got {node_count} and {per_node}): "
                         f"the layouts compare ranks within a node with ranks across nodes")
    extra = list(args.job_extra) + (exclude_for(names, args.partition) if names else [])
    expected = args.backend if args.backend != "auto" else ("nccl" if args.gpus_per_worker else "gloo")
    out: dict[str, Any] = {}
    handle = start_cluster(args.profile, workers=node_count * per_node, gpus_per_worker=args.gpus_per_worker,
                           partition=args.partition, interface=args.interface, memory=args.memory, cores=args.cores,
                           workers_per_job=args.workers_per_job, job_extra=extra, timeout=args.timeout, say=say)
    try:
        plan, hosts = place(handle, node_count, per_node, tries=node_count)
        facts = handle.client.run(host_facts, workers=sorted({a for v in plan.values() for a in v}))
        by_host = {f["host"]: f for f in facts.values()}
        out["cpu"] = [cpu_line(h, f["model"], f["cpus"], f["flags"]) for h, f in sorted(by_host.items())]
        print("\n".join(out["cpu"]), flush=True)
        out["note"] = note = caveat(facts, host_facts(), expected)
        if note:
            print(note, flush=True)
        out["layouts"] = {k: [hosts[a] for a in v] for k, v in plan.items()}
        print("layouts (ranks in order, by host): "
              + "; ".join(f"{k}: {' '.join(hosts[a] for a in v)}" for k, v in plan.items()), flush=True)
        if args.part in ("a", "all"):
            sizes = [int(float(s) * MIB) for s in (quick.get("sizes_mib") or args.sizes.split(","))]
            out["a"] = part_a(handle.client, plan, sizes, args.latency_bytes, pick("latency_repeats"), pick("repeats"),
                              pick("rounds"), args.backend)
            print(f"(a) all-reduce, {out['a']['backend']}: latency the median of {pick('latency_repeats')} x "
                  f"{args.latency_bytes} B; bus bandwidth 2(n-1)/n x bytes / time; medians of {pick('rounds')} rounds")
            print(allreduce_report(out["a"]["rows"], "2 ranks, 1 node"))
        if args.part in ("b", "all"):
            with tempfile.TemporaryDirectory(prefix="bench-multinode-", dir=_shared_cache()) as tmp:
                data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "shards"
                if not args.data_dir:
                    make_tiny_shards(data_dir)
                config = train_config(pick("steps"), pick("batch"), args.threads, quick.get("shape"))
                out["b"] = part_b(handle.client, plan, data_dir, config, pick("train_rounds"), args.backend)
            m = config.model
            print(f"(b) DDP training tokens/s, GPT {m.n_layer} layers, {m.n_head} heads, {m.n_embd} dims, "
                  f"T={m.block_size}, {config.batch_size} sequences per rank and step, {config.max_steps} steps, "
                  f"{args.threads} thread(s) per CPU rank; medians of {pick('train_rounds')} rounds")
            print(training_report(out["b"]["rows"], "1 rank, 1 node"))
        used = out.get("a", {}).get("backend", expected)
        out["note_after"] = after = caveat(facts, host_facts(), used)  # the load average now, after the runs
        if after:
            print(after)
    finally:
        handle.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


def _shared_cache() -> str:
    """A folder under $HOME (which the nodes share), never /tmp (node-local on the nodes)."""
    path = Path.home() / ".cache" / "labkit"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run; exit status 0 (a report, no goals to miss)."""
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
