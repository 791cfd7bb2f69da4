"""labkit.core.heap: a training process keeps freed memory instead of faulting it back in every step.

Each check runs in a fresh Python with ``MALLOC_TRIM_THRESHOLD_=65536``, the setting Dask's nanny
gives its workers, where glibc hands every freed block back to the kernel at once."""

import json
import os
import subprocess
import sys

import pytest

STEP_LOOP = r"""
import json, resource, sys, torch

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def steps(n):
    # a step's activations: 8 blocks of 4 MiB written, then all freed (what backward does)
    for _ in range(n):
        blocks = [torch.ones(1 << 20) for _ in range(8)]
        del blocks

def measure():
    steps(2)
    f0 = faults()
    steps(10)
    return (faults() - f0) / 10

out = {"before": measure()}
if sys.argv[1] == "heap":
    from labkit.core.heap import keep_freed_memory
    out["applied"] = keep_freed_memory()
else:
    from labkit.train import TrainConfig, prepare_process
    prepare_process(TrainConfig(device="cpu", num_threads=1), torch.device("cpu"), keep_heap=True)
    out["applied"] = True
out["after"] = measure()
if sys.argv[1] == "heap":
    from labkit.core.heap import return_freed_memory
    out["rss_kept_mib"] = rss_mib()
    out["returned"] = return_freed_memory()
    out["rss_returned_mib"] = rss_mib()
print(json.dumps(out))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", STEP_LOOP, mode], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and getrusage page faults: Linux")
@pytest.mark.parametrize("mode", ["heap", "prepare_process"])
def test_freed_memory_is_kept_so_steps_stop_faulting(mode):
    out = _run(mode)
    assert out["applied"]
    # 32 MiB written per step: ~8,000 fresh 4 KiB pages when glibc returns it all, ~none when kept
    assert out["before"] > 4000, out
    assert out["after"] < out["before"] / 20, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and getrusage page faults: Linux")
def test_returned_memory_leaves_the_process():
    """return_freed_memory (what a memory cap needs) undoes keep_freed_memory: the 32 MiB a step freed
    and the heap kept go back to the kernel, so the process's resident memory falls by about that much.
    (Whether the next steps fault again depends on where glibc's free chunks lie: not asserted.)"""
    out = _run("heap")
    assert out["returned"]
    assert out["rss_kept_mib"] - out["rss_returned_mib"] > 24, out
