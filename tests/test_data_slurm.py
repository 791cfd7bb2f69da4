"""preprocess() on Dask workers that are real Slurm jobs (dask-jobqueue on the local Slurm)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


from labkit.data import DataConfig, preprocess

REPO = Path(__file__).resolve().parent.parent


def test_same_shards_on_slurm_workers(slurm, tmp_path):
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    cfg = DataConfig.for_scale("tiny", partition_bytes=40_000, corpus_bytes=150_000)
    ref = preprocess("stdlib", tmp_path / "local", config=cfg, progress=False)
    cluster = SLURMCluster(
        queue="gpu", cores=1, processes=1, memory="2GiB", walltime="00:10:00", job_name="labkit-data-test",
        python=sys.executable, job_script_prologue=[f"export PYTHONPATH={REPO}"],
        log_directory=str(tmp_path / "logs"), scheduler_options={"dashboard_address": None},
    )
    try:
        cluster.scale(jobs=1)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            rep = preprocess("stdlib", tmp_path / "slurm", client=client, config=cfg, progress=False)
            jobs_seen = client.run(lambda: __import__("os").environ.get("SLURM_JOB_ID"))
    finally:
        cluster.close()
    assert all(jobs_seen.values()), "the workers did not run inside Slurm jobs"
    a = json.loads((ref.out_dir / "meta.json").read_bytes())
    b = json.loads((rep.out_dir / "meta.json").read_bytes())
    assert a["splits"] == b["splits"] and (ref.out_dir / "meta.json").read_bytes() == (rep.out_dir / "meta.json").read_bytes()
