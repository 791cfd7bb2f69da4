"""labkit.train.train_distributed: DDP ranks on real Dask workers (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from labkit.core.events import Recorder, subscribe
from labkit.core.ranks import RankError, RankLost
from labkit.checkpoint import list_checkpoints
from labkit.train import TrainConfig, start_distributed, train, train_distributed

torch.set_num_threads(1)


def cfg(**kw) -> TrainConfig:
    base = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_steps=20, warmup_steps=3,
                lr=1e-2, eval_interval=10, eval_iters=1, sample_tokens=0, precision="float32", seed=5,
                num_threads=1)
    base.update(kw)
    return TrainConfig().replace(**base)  # model keys (n_layer, ...) go into TrainConfig.model


def _wait_for(pred, seconds: float) -> None:
    deadline = time.time() + seconds
    while not pred() and time.time() < deadline:
        time.sleep(0.05)


def test_two_ranks_of_b_match_one_process_of_2b(client, shards):
    rec = Recorder()
    sub = subscribe(client, rec, kinds=["train"])
    ddp = train_distributed(client, cfg(batch_size=2), shards, timeout=60)
    single = train(cfg(batch_size=4), shards)
    assert ddp.world_size == 2 and ddp.effective_batch == single.effective_batch == 4
    assert len(ddp.losses) == len(single.losses) == 20
    for step, (a, b) in enumerate(zip(ddp.losses, single.losses)):
        assert abs(a - b) / b <= 1e-4, (step, a, b)
    assert ddp.losses[-1] < ddp.losses[0]
    diffs = [(a - b).abs().mean().item() for a, b in zip(ddp.model.parameters(), single.model.parameters())]
    assert max(diffs) < 1e-4  # Adam may amplify rounding in near-zero gradients, but only a little
    # every rank's metrics reached the notebook side live, through the Dask topic
    _wait_for(lambda: len(rec.of("train")) >= 40, 10)
    sub.close()
    ranks = {e["rank"] for e in rec.of("train")}
    assert ranks == {0, 1}
    assert all(e["world_size"] == 2 and e["tokens_per_s"] > 0 for e in rec.of("train"))


def _break_batches_here(dask_worker=None):
    import labkit.train as T

    def broken(*args, **kwargs):
        raise OSError("disk read failed on this worker")

    T._orig_batch_rows = T.batch_rows
    T.batch_rows = broken


def _repair_batches_here(dask_worker=None):
    import labkit.train as T

    if hasattr(T, "_orig_batch_rows"):
        T.batch_rows = T._orig_batch_rows


def test_error_on_one_rank_surfaces_its_traceback_and_cluster_stays_usable(client, shards):
    rank1 = sorted(client.scheduler_info()["workers"])[1]
    client.run(_break_batches_here, workers=[rank1])
    try:
        start = time.monotonic()
        with pytest.raises(RankError) as err:
            train_distributed(client, cfg(), shards, timeout=20)
        assert err.value.rank == 1
        assert "disk read failed on this worker" in str(err.value)
        assert "batch_rows" in err.value.remote_traceback
        assert time.monotonic() - start < 60
    finally:
        client.run(_repair_batches_here, workers=[rank1])
    again = train_distributed(client, cfg(max_steps=3), shards, timeout=60)
    assert again.steps == 3


def test_background_run_does_not_block(client, shards, tmp_path, monkeypatch):
    import shutil

    from labkit.data.config import default_shard_dir

    # no data_dir: the shards of the config's scale, found under runs_dir() (as 03_preprocessing leaves them)
    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))
    shutil.copytree(shards, default_shard_dir("binder"))
    run = start_distributed(client, cfg(max_steps=10, scale="binder"), timeout=60)
    assert not run.done()  # returned at once
    res = run.result(timeout=120)
    assert run.done() and res.steps == 10 and run.exception() is None
    assert not (tmp_path / "runs" / "tiny-shards").exists()
    assert res.losses == train_distributed(client, cfg(max_steps=10), shards, timeout=60).losses


def test_lost_worker_is_named_then_resume_continues(client, shards, tmp_path):
    pids = client.run(os.getpid)
    rank1 = sorted(pids)[1]
    config = cfg(max_steps=5000, checkpoint_dir=str(tmp_path), checkpoint_interval=5, eval_interval=0)
    rec = Recorder()
    sub = subscribe(client, rec, kinds=["checkpoint"])
    run = start_distributed(client, config, shards)  # the default timeout (60 s): RankLost still comes within 30 s
    _wait_for(lambda: rec.of("checkpoint") or run.done(), 60)
    assert not run.done(), "training ended before a checkpoint was seen"
    os.kill(pids[rank1], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(RankLost) as err:
        run.result(timeout=60)
    assert time.monotonic() - killed < 30
    assert err.value.rank == 1 and "resume" in str(err.value)
    sub.close()
    saved = list_checkpoints(tmp_path)
    assert saved
    # the nanny brings a fresh worker back; resume on whatever workers are there now
    client.wait_for_workers(2, timeout=60)
    res = train_distributed(client, config.replace(max_steps=int(saved[-1].name[5:13]) + 5), shards,
                            resume=True, timeout=60)
    assert res.start_step >= 5 and res.steps == 5


def _count_hashes_here(dask_worker=None):
    import labkit.data.shards as S

    S._orig_sha256_file = getattr(S, "_orig_sha256_file", S.sha256_file)
    S._hashed = []
    S.sha256_file = lambda path, *a: S._hashed.append(str(path)) or S._orig_sha256_file(path, *a)


def _hashes_counted_here(dask_worker=None):
    import labkit.data.shards as S

    hashed = list(getattr(S, "_hashed", []))
    if hasattr(S, "_orig_sha256_file"):
        S.sha256_file = S._orig_sha256_file
    return hashed


def test_shards_are_hashed_once_per_run_not_by_every_rank(client, shards, tmp_path):
    import json
    import shutil

    client.run(_count_hashes_here)
    try:
        train_distributed(client, cfg(max_steps=2), shards, timeout=60)
    finally:
        hashed = [p for got in client.run(_hashes_counted_here).values() for p in got]
    meta = json.loads((shards / "meta.json").read_text())
    files = sorted(str(shards / e["file"]) for es in meta["splits"].values() for e in es)
    assert sorted(hashed) == files  # each shard once, by one worker; the two ranks hash none
    # a corrupt shard still stops the run before any rank starts, naming the file and the fix
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    victim = bad / meta["splits"]["train"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[1] ^= 0xFF
    victim.write_bytes(bytes(data))
    from labkit.data.shards import ShardError

    with pytest.raises(ShardError, match=rf"{victim.name} is corrupt.*rebuild the folder"):
        train_distributed(client, cfg(max_steps=2), bad, timeout=60)


def test_ddp_reads_the_losses_back_only_at_sync_points(client, shards):
    ddp = train_distributed(client, cfg(batch_size=2, max_steps=10, eval_interval=0, log_interval=5), shards,
                            timeout=60)
    single = train(cfg(batch_size=4, max_steps=10, eval_interval=0), shards)
    assert ddp.host_syncs == 1 + 10 // 5  # one all-reduce and one read for steps 2-5, one for 6-10
    assert len(ddp.losses) == 10 and ddp.host_syncs < single.host_syncs == 10
    for a, b in zip(ddp.losses, single.losses):  # still every step's loss, averaged over the ranks
        assert abs(a - b) / b <= 1e-4
