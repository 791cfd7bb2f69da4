"""Smoke test of bench/cluster.py at toy size (one round, one CPU worker): it runs and reports a ratio."""


def test_bench_cluster_smoke(slurm, capsys):
    from bench.cluster import main

    result = main(["--rounds", "1", "--workers", "1", "--gpus", "0"])
    assert result["raw_s"] > 0 and result["labkit_s"] > 0
    assert abs(result["ratio"] - result["labkit_s"] / result["raw_s"]) < 1e-9
    assert "ratio" in capsys.readouterr().out
