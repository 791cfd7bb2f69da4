"""Smoke test of bench/cluster.py at toy size (one round, one CPU worker): it runs and prints the
figure the README quotes, consistent with the timings it printed beside it."""

import re


def test_bench_cluster_smoke(slurm, capsys):
    from bench.cluster import main

    result = main(["--rounds", "1", "--workers", "1", "--gpus", "0"])
    assert result["raw_s"] > 0 and result["labkit_s"] > 0
    out = capsys.readouterr().out
    m = re.search(r"raw ([\d.]+) s, labkit ([\d.]+) s, ratio ([\d.]+)x \(goal <= 1\.2x\)", out)
    assert m, out
    raw, lab, ratio = map(float, m.groups())
    assert abs(ratio - lab / raw) < 0.02 + 0.01 * ratio  # the printed figures round to 2 decimals
