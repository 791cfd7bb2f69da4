"""The lesson code of notebook 06 (labkit.rank_code): DDP ranks end identical and equal to one process
on the whole batch; FSDP ranks hold different pieces that put together are the same model."""

from __future__ import annotations

import pytest
import torch
from dask.distributed import Client, LocalCluster

from labkit.rank_code import LessonConfig, diff, gather_watched, run_lesson


@pytest.fixture(scope="module")
def client2():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0", memory_limit=0) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def reports(client2):
    return {v: run_lesson(client2, v) for v in ("single", "ddp", "fsdp")}


def test_ddp_ranks_hold_identical_weights_equal_to_one_process(reports):
    single, ddp = reports["single"][0], reports["ddp"]
    assert [r["rank"] for r in ddp] == [0, 1] and {r["world_size"] for r in ddp} == {2}
    assert ddp[0]["digest"] == ddp[1]["digest"]  # bit-identical replicas after every step
    assert ddp[0]["losses"] != ddp[1]["losses"]  # ... although each saw other rows
    # the mean of the ranks' losses is the whole batch's loss; the weights match one process on it
    for step, loss in enumerate(single["losses"]):
        assert (ddp[0]["losses"][step] + ddp[1]["losses"][step]) / 2 == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(ddp[0]["watched"], single["watched"], atol=1e-5)  # float32 rounding, summed in another order


def test_fsdp_ranks_hold_shards_of_the_same_model(reports):
    ddp, fsdp = reports["ddp"], reports["fsdp"]
    assert fsdp[0]["digest"] != fsdp[1]["digest"]
    rows = fsdp[0]["watched_shape"][0]
    assert [r["watched"].shape[0] for r in fsdp] == [rows // 2, rows - rows // 2]
    assert torch.allclose(gather_watched(fsdp), ddp[0]["watched"], atol=1e-6)
    assert fsdp[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-5)


def test_the_diffs_show_only_the_lines_that_change():
    d = diff("single", "ddp")
    added = [l for l in d.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert any("DistributedDataParallel(cfg.model())" in l for l in added)
    assert any("x[rank::world]" in l for l in added)
    assert not any("loss.backward()" in l for l in added)  # the loop itself does not change
    f = diff("ddp", "fsdp")
    assert "+        fully_shard(block)" in f and "-    model = DistributedDataParallel(cfg.model())" in f
    with pytest.raises(ValueError, match="valid: single, ddp, fsdp"):
        diff("single", "zero")


def test_a_small_config_trains():
    cfg = LessonConfig(steps=2)
    x, y = cfg.batch(0)
    assert x.shape == (cfg.batch_size, cfg.block_size) and torch.equal(x[:, 1:], y[:, :-1])


def test_ranks_agree_on_the_all_reduced_loss_and_know_how_they_were_launched(reports):
    ddp = reports["ddp"]
    assert ddp[0]["run_losses"] == ddp[1]["run_losses"]  # the all-reduced loss: one number for all ranks
    for step, loss in enumerate(reports["single"][0]["losses"]):
        assert ddp[0]["run_losses"][step] == pytest.approx(loss, rel=1e-5)
    for r in ddp:
        seen = r["launch"]["labkit"]
        assert seen["RANK"] == r["rank"] and seen["WORLD_SIZE"] == 2 and seen["LOCAL_RANK"] == r["rank"]
        assert seen["MASTER_PORT"] > 0 and seen["MASTER_ADDR"] == ddp[0]["launch"]["labkit"]["MASTER_ADDR"]
        assert r["launch"]["env"]["RANK"] is None  # labkit hands them to init_process_group, not the environment
        assert r["launch"]["backend"] == "gloo"


def test_a_rank_that_never_joins_times_out_the_collective(client2):
    import time

    from labkit.rank_code import collective_timeout

    t0 = time.monotonic()
    line = collective_timeout(client2, timeout=1.0)
    assert line.startswith("rank 0 on worker") and "Timed out waiting 1000ms" in line, line
    assert time.monotonic() - t0 < 15


def test_the_timeout_lesson_leaves_the_workers_log_as_it_was(client2):
    import logging

    from labkit.rank_code import collective_timeout

    before = client2.run(lambda: logging.getLogger("distributed.worker").level)
    assert "Timed out" in collective_timeout(client2, timeout=1.0)
    assert client2.run(lambda: logging.getLogger("distributed.worker").level) == before
