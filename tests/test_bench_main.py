"""`python -m bench` (what `make bench` runs) lists every benchmark with its command and runs none."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_python_m_bench_lists_every_benchmark():
    r = _bench()
    assert r.returncode == 0, r.stderr
    modules = sorted(p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("_"))
    assert modules and all(f"python -m bench.{m} " in r.stdout for m in modules), r.stdout
    assert "_torchrun_entry" not in r.stdout and "--all" in r.stdout
    assert "Online-softmax attention" in r.stdout  # each line says what the benchmark measures


def test_unknown_benchmark_names_the_valid_ones():
    r = _bench("atention")
    assert r.returncode == 2 and "valid: attention" in r.stderr
