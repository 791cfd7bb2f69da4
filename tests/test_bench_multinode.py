"""bench.multinode: its layouts, ratios and tables on fixed inputs, and a toy-size round on the
local Slurm's two compute hosts (partition ``nodes``) whose printed ratios match its printed figures."""

import re

import pytest

from bench import multinode as bench
from conftest import skip_unless_ci

MIB = 1024**2


def test_layouts_put_ranks_node_by_node_and_wait_for_two_per_node():
    hosts = {"tls://a:5": "node1", "tls://a:1": "node1", "tls://a:3": "node1", "tls://a:2": "node1",
             "tls://b:2": "node2", "tls://b:1": "node2"}  # Slurm packed node1 first, then the top-up went to node2
    got = bench.layouts(hosts)
    assert got == {"1 rank, 1 node": ["tls://a:1"], "2 ranks, 1 node": ["tls://a:1", "tls://a:2"],
                   "2 ranks, 2 nodes": ["tls://a:1", "tls://b:1"],
                   "4 ranks, 2 nodes": ["tls://a:1", "tls://a:2", "tls://b:1", "tls://b:2"]}
    assert bench.layouts({"w1": "node1", "w2": "node1", "w3": "node1", "w4": "node1"}) is None, "one node only"
    assert bench.layouts({"w1": "node1", "w2": "node1", "w3": "node1", "w4": "node2"}) is None, "3 + 1 is not 2 + 2"
    three = {f"w{i}": f"node{i % 3}" for i in range(9)}
    assert list(bench.layouts(three, nodes=3, per_node=3))[-1] == "9 ranks, 3 nodes"


def test_bus_bandwidth_and_ratios():
    assert bench.bus_bandwidth(64 * MIB, 0.5, 2) == pytest.approx(64 * MIB / 0.5)  # 2(n-1)/n = 1 for 2 ranks
    assert bench.bus_bandwidth(64 * MIB, 0.5, 4) == pytest.approx(1.5 * 64 * MIB / 0.5)
    assert bench.ratios({"base": 4.0, "other": 3.0}, "base") == {"base": 1.0, "other": 0.75}


def test_reports_print_each_figure_beside_its_ratio():
    rows = {"2 ranks, 1 node": {"ranks": 2, "latency_s": 250e-6, "busbw": {4 * MIB: 1.0e9, 64 * MIB: 2.0e9}},
            "2 ranks, 2 nodes": {"ranks": 2, "latency_s": 500e-6, "busbw": {4 * MIB: 0.5e9, 64 * MIB: 1.5e9}}}
    text = bench.allreduce_report(rows, "2 ranks, 1 node")
    cross = next(line for line in text.splitlines() if line.strip().startswith("2 ranks, 2 nodes"))
    assert re.findall(r"[\d.]+x", cross) == ["2.00x", "0.50x", "0.75x"], text
    assert "4 MiB busbw" in text and "64 MiB busbw" in text and "0.500 GB/s" in cross
    train = {"1 rank, 1 node": {"ranks": 1, "tokens_per_s": 5000.0},
             "4 ranks, 2 nodes": {"ranks": 4, "tokens_per_s": 8000.0}}
    text = bench.training_report(train, "1 rank, 1 node")
    four = next(line for line in text.splitlines() if "4 ranks" in line)
    assert "8,000" in four and "1.60x" in four and "0.40x" in four, text


def test_caveat_names_the_bridge_only_when_the_nodes_share_this_kernel():
    here = {"boot_id": "k1", "load": 3.0}
    same = {"w1": {"boot_id": "k1", "cpus": 2}, "w2": {"boot_id": "k1", "cpus": 2}}
    note = bench.caveat(same, here, "gloo")
    assert "CPU figures" in note and "Linux bridge" in note and "2 cores" in note and "not real interconnect" in note
    real = {"w1": {"boot_id": "a", "cpus": 64}, "w2": {"boot_id": "b", "cpus": 64}}
    assert bench.caveat(real, here, "nccl") is None
    assert "bridge" not in bench.caveat(real, here, "gloo") and "CPU figures" in bench.caveat(real, here, "gloo")


def test_cpu_line_lists_the_flags_it_looks_for():
    line = bench.cpu_line("node1", "AMD EPYC", 2, ["fma", "avx2", "sse4_2"])
    assert line == "CPU node1: AMD EPYC, 2 cores; flags: avx2 fma (of avx2 fma avx512f avx512_bf16 amx_bf16)"
    assert "flags: none" in bench.cpu_line("h", "x", 1, [])


def test_the_command_line_keeps_a_real_cluster_in_reach():
    args = bench.parser().parse_args(["--partition", "gpu", "--interface", "ib0", "--gpus-per-worker", "1",
                                      "--nodes", "g01,g02", "--sizes", "16,256", "--ranks-per-node", "4"])
    assert (args.partition, args.interface, args.gpus_per_worker, args.nodes) == ("gpu", "ib0", 1, "g01,g02")
    assert (args.sizes, args.ranks_per_node, args.backend) == ("16,256", 4, "auto")


def test_a_toy_round_on_two_nodes(slurm, capsys, tmp_path):
    if not any(line.split()[:1] == ["nodes"] for line in slurm.splitlines()):
        skip_unless_ci("no Slurm partition 'nodes' (start it with: scripts/local-slurm.sh up --nodes 2)")
    assert bench.exclude_for(["node1", "node2"], "nodes") == []  # both nodes of the partition: nothing to exclude
    out = bench.run(bench.parser().parse_args(["--quick", "--nodes", "node1,node2", "--json", str(tmp_path / "r.json")]),
                    say=lambda s: None)
    assert out["layouts"]["2 ranks, 1 node"][0] == out["layouts"]["2 ranks, 1 node"][1]
    assert sorted(out["layouts"]["2 ranks, 2 nodes"]) == ["node1", "node2"]
    assert sorted(out["layouts"]["4 ranks, 2 nodes"]) == ["node1", "node1", "node2", "node2"]
    assert out["a"]["backend"] == "gloo" and set(out["a"]["rows"]) == {"2 ranks, 1 node", "2 ranks, 2 nodes",
                                                                       "4 ranks, 2 nodes"}
    assert all(r["tokens_per_s"] > 0 for r in out["b"]["rows"].values()) and len(out["b"]["rows"]) == 4
    printed = capsys.readouterr().out
    assert "Linux bridge" in printed and "CPU node1:" in printed and "flags:" in printed
    training = printed.split("(b) DDP training tokens/s")[1]
    figures = dict(re.findall(r"^\s+(\d ranks?, \d nodes?)\s+([\d,]+)\s", training, re.M))
    ratio = float(re.search(r"^\s+4 ranks, 2 nodes\s+[\d,]+\s+([\d.]+)x", training, re.M).group(1))
    tps = {k: float(v.replace(",", "")) for k, v in figures.items()}
    assert abs(ratio - tps["4 ranks, 2 nodes"] / tps["1 rank, 1 node"]) < 0.01, training  # as printed, to rounding
    assert (tmp_path / "r.json").exists()
