"""`labkit preprocess` from the command line, and a toy-size smoke run of bench/data.py."""

from __future__ import annotations

import json

from labkit.lab.cli import main
from labkit.data import ShardReader


def test_cli_preprocess_writes_shards(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"record {i}: " + "word%d " % i * 30}) for i in range(20)) + "\n")
    rc = main(["preprocess", str(src), "--out", str(tmp_path / "out"), "--scale", "tiny", "--vocab-size", "300"])
    out = capsys.readouterr().out
    assert rc == 0 and "train" in out and "near_dedup" in out
    r = ShardReader(tmp_path / "out")
    assert r.meta["config"]["vocab_size"] == 300 and 257 < r.vocab_size <= 300  # a tiny corpus runs out of merges
    assert main(["preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_bench_smoke(tmp_path):
    from bench.data import main as bench

    res = bench(["--mb", "0.2", "--workers", "1", "--vocab", "300", "--repeat", "1", "--no-pipeline",
                 "--out", str(tmp_path / "r.json")])
    assert res["tokens"] > 10_000 and res["speedup"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["corpus_mb"] >= 0.2
