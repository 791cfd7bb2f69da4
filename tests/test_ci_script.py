"""`.ci/run` runs the README's test command with CI=1 exported and passes its exit status on."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _ci_run(tmp_path: Path, make_exit: int) -> tuple[subprocess.CompletedProcess, str]:
    """Run the real .ci/run with a stand-in `make` first on PATH that records its arguments and CI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    seen = tmp_path / "seen"
    fake = bin_dir / "make"
    fake.write_text(f'#!/bin/sh\necho "args=$* CI=${{CI:-unset}}" > "{seen}"\nexit {make_exit}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # as on a fresh machine
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    r = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    return r, seen.read_text().strip()


def test_ci_run_exports_ci_and_calls_make_test(tmp_path):
    r, seen = _ci_run(tmp_path, 0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert seen == "args=test CI=1"


def test_ci_run_fails_when_the_tests_fail(tmp_path):
    r, _ = _ci_run(tmp_path, 2)  # make exits 2 when pytest fails, exit 5 (no tests collected) included
    assert r.returncode == 2 and "exited 2" in r.stdout
