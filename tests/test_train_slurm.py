"""A DDP rank whose Slurm job is cancelled mid-run: a clear error naming it, then resume on new jobs.

Runs real Dask workers as Slurm jobs (dask-jobqueue) on the local Slurm; skipped where it does not answer.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from labkit.events import Recorder, subscribe
from labkit.ranks import RankLost
from labkit.train import TrainConfig, list_checkpoints, start_distributed, train_distributed

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


def test_cancelled_slurm_job_is_named_and_resume_continues(slurm, tmp_path):
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

    from labkit.data.shards import make_tiny_shards

    shards = tmp_path / "shards"
    make_tiny_shards(shards)
    name = f"labkit-train-test-{uuid.uuid4().hex[:6]}"
    cluster = SLURMCluster(
        queue="gpu", cores=1, processes=1, memory="1GiB", walltime="00:10:00", job_name=name,
        python=sys.executable, log_directory=str(tmp_path / "logs"),
        job_script_prologue=[f"export PYTHONPATH={REPO}", "export OMP_NUM_THREADS=1"],
        scheduler_options={"dashboard_address": ":0"},
    )
    client = Client(cluster)
    try:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=120)
        config = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_steps=2000,
                             eval_interval=0, sample_tokens=0, precision="float32", num_threads=1,
                             checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_interval=5)
        rec = Recorder()
        sub = subscribe(client, rec, kinds=["checkpoint"])
        run = start_distributed(client, config, shards, timeout=20)
        deadline = time.time() + 120
        while not rec.of("checkpoint") and not run.done() and time.time() < deadline:
            time.sleep(0.1)
        sub.close()
        assert not run.done(), "training ended before a checkpoint was seen"
        rank1 = sorted(client.scheduler_info()["workers"])[1]
        job_id = cluster.workers[client.scheduler_info()["workers"][rank1]["name"]].job_id
        subprocess.run(["scancel", job_id], check=True)
        cancelled = time.monotonic()
        with pytest.raises(RankLost) as err:
            run.result(timeout=60)
        assert time.monotonic() - cancelled < 30
        assert err.value.rank == 1
        # resume from the last checkpoint on the job that is left: one rank now, so it accumulates two
        # micro-batches per step to keep the effective batch (and the data stream) of the two-rank run
        assert len(client.scheduler_info()["workers"]) == 1
        last = int(list_checkpoints(tmp_path / "ckpt")[-1].name[5:13])
        res = train_distributed(client, config.replace(max_steps=last + 3), shards, resume=True, timeout=60)
        assert res.start_step == last and res.steps == 3
        assert res.world_size == 1 and res.effective_batch == 4
    finally:
        client.close()
        cluster.close()
        subprocess.run(["scancel", "--name", name], check=False)
