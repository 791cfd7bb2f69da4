"""A toy-size smoke run of bench.encryption: it runs end to end and reports sane numbers (no timing goals here)."""

from bench import encryption as bench


def test_bench_encryption_quick_runs_and_reports_ratios(capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: ") and "flags:" in out.splitlines()[0]
    for what in ("pipeline", "shard write", "checkpoint write, file", "checkpoint write, sharded"):
        line = next(line for line in out.splitlines() if line.startswith(what))
        assert float(line.split()[-2].rstrip("x")) > 0, line
    from labkit.model import cpu_flags

    assert ("aes" in out.splitlines()[0].split("flags:")[1].split()) == ("aes" in cpu_flags())
