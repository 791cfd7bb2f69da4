"""A DDP rank whose Slurm job is cancelled mid-run: a clear error naming it, then resume on the job
left and on a new job that ``scale`` submits in its place.

Runs real Dask workers as Slurm jobs (labkit.start_cluster on dask-jobqueue) on the local Slurm;
skipped (outside CI only) where it does not answer.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from conftest import training_past_a_checkpoint

from labkit.core.ranks import RankLost
from labkit.checkpoint import list_checkpoints
from labkit.model import GPTConfig
from labkit.train import TrainConfig, train_distributed

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


def test_cancelled_slurm_job_is_named_and_resume_continues(slurm, tmp_path):
    """Cancel rank 1's job: RankLost names it within 30 s; resume on the job that is left; then
    ``scale(2)`` submits a new job in place of the lost one and training resumes on two ranks."""
    from labkit import start_cluster
    from labkit.data.shards import make_tiny_shards

    shards = tmp_path / "shards"
    make_tiny_shards(shards)
    lines: list[str] = []
    handle = start_cluster("slurm", workers=2, gpus_per_worker=1, cores=1, memory="1GiB", timeout=120,
                           say=lines.append, prologue=[f"export PYTHONPATH={REPO}", "export OMP_NUM_THREADS=1"])
    client = handle.client
    try:
        config = TrainConfig(model=GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, precision="float32"),
                             batch_size=2, max_steps=2000, eval_interval=0, sample_tokens=0, num_threads=1,
                             checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_interval=5)
        run = training_past_a_checkpoint(client, config, shards)
        workers = client.scheduler_info()["workers"]
        rank1 = sorted(workers)[1]
        job_id = handle.cluster.workers[workers[rank1]["name"]].job_id
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
        # back to two ranks: the lost job is replaced by a new one, and training resumes on both
        handle.scale(2, wait=True, timeout=120)
        assert job_id not in handle.job_ids() and len(handle.job_ids()) == 2
        assert any(job_id in line and "new ones" in line for line in lines), lines
        res2 = train_distributed(client, config.replace(max_steps=last + 6), shards, resume=True, timeout=60)
        assert res2.start_step == last + 3 and res2.steps == 3 and res2.world_size == 2
    finally:
        handle.close()
