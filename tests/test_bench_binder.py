"""Smoke run of the Binder budget benchmark at toy size (tiny scale, one notebook)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_binder_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "bench.binder", "00", "--scale", "tiny", "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cpu=0" in r.stdout
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line[:1].isalnum()}
    assert rows["empty_kernel"][1] == "base" and rows["00_welcome"][1] == "ok"
    report = json.loads((out / "report.json").read_text())
    [result] = report["results"]
    assert report["context"]["cpus"] == "1", "the kernel must run pinned to one CPU"
    assert result["ok"] and 0 < result["peak_bytes"] < 1.5e9 and result["processes"] >= 2
