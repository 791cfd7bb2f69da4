"""Memory a training rank holds, measured (labkit.train_memory), against training_memory's ZeRO estimate."""

from __future__ import annotations

import pytest
import torch
from dask.distributed import Client, LocalCluster

from labkit.train import TrainConfig
from labkit.train_memory import held_bytes, measure_memory, measure_rank, memory_table, predicted

SHAPE = dict(n_layer=2, n_head=2, n_embd=96, block_size=32)


def cfg(**kw) -> TrainConfig:
    return TrainConfig().replace(**SHAPE, batch_size=2, max_steps=3, warmup_steps=1, precision="float32",
                                 device="cpu", num_threads=1, **kw)


@pytest.fixture(scope="module")
def client2():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0", memory_limit=0) as cluster, \
            Client(cluster) as client:
        yield client


def test_held_bytes_counts_a_storage_once():
    w = torch.zeros(10, 10)
    tied = torch.nn.Linear(10, 10, bias=False)
    tied.weight = torch.nn.Parameter(w)
    assert held_bytes([w, w.view(100), w[2:5], tied.weight]) == 400
    assert held_bytes([w, torch.zeros(5), None]) == 420


def test_one_process_holds_what_the_estimate_says(shards):
    r = measure_rank(cfg(), shards)
    assert r.strategy == "single" and r.world_size == 1
    guess = predicted(cfg(), r.n_params, 1, 0, vocab_size=_vocab(shards))
    assert r.weights_bytes == r.grads_bytes == 4 * r.n_params  # float32, every parameter has a gradient
    assert r.optimizer_bytes == 8 * r.n_params                  # AdamW: exp_avg and exp_avg_sq
    assert r.model_states_bytes == pytest.approx(guess.model_states_bytes, rel=1e-9)
    # the forward keeps its activations for the backward: there are some, and the step peaks above rest
    assert r.activations_bytes > 0
    assert r.step_peak_bytes > r.weights_bytes + r.optimizer_bytes + r.activations_bytes


def test_fsdp_ranks_hold_shards_of_one_model_and_ddp_ranks_replicas(client2, shards):
    ddp = measure_memory(client2, cfg(strategy="ddp"), shards, workers=2)
    fsdp = measure_memory(client2, cfg(strategy="fsdp"), shards, workers=2)
    n = ddp[0].n_params
    assert {r.n_params for r in ddp + fsdp} == {n}
    assert all(r.weights_bytes == 4 * n for r in ddp)
    # the shards of the two ranks add up to the whole model (a dim-0 split pads at most one row a tensor)
    assert 4 * n <= sum(r.weights_bytes for r in fsdp) < 4 * n * 1.05
    assert sum(r.optimizer_bytes for r in fsdp) == pytest.approx(ddp[0].optimizer_bytes, rel=0.05)
    assert max(r.model_states_bytes for r in fsdp) <= 0.55 * ddp[0].model_states_bytes


def test_memory_table_puts_the_measurement_next_to_zero_0_and_3(client2, shards):
    rows = memory_table(client2, cfg(), shards, world_sizes=(2,))
    by = {r["strategy"]: r for r in rows}
    assert set(by) == {"ddp", "fsdp"} and {r["zero_stage"] for r in rows} == {0, 3}
    for r in rows:
        assert 0.85 <= r["states_ratio"] <= 1.15, r  # the goal, on a small model too
        assert r["activations_measured"] > 0 and r["peak_measured"] > r["states_measured"]
    assert 0.45 <= by["fsdp"]["states_vs_ddp"] <= 0.55


def test_encrypted_shards_are_measured_with_their_key_and_refused_without(client2, tmp_path):
    """memory_table on encrypted shards: the vocabulary from meta.json, each rank opening the shards with the
    key file's path it was handed; without the key, the error names the shard and the key."""
    from labkit.core import crypto
    from labkit.core.crypto import EncryptionKeyError
    from labkit.data.shards import make_tiny_shards

    key = crypto.new_key_file(tmp_path / "data.key")
    sealed = make_tiny_shards(tmp_path / "sealed", encryption=key).out_dir
    rows = memory_table(client2, cfg(), sealed, world_sizes=(2,), restart=False, encryption=key)
    assert [r["strategy"] for r in rows] == ["ddp", "fsdp"] and all(r["states_measured"] > 0 for r in rows)
    with pytest.raises(EncryptionKeyError, match=rf"train_00000\.bin is encrypted .*{key.key_id}"):
        measure_rank(cfg(), sealed)


def _vocab(shards) -> int:
    from labkit.data.shards import ShardReader

    return ShardReader(shards, "train", verify=False).vocab_size


def test_bench_memory_report_states_the_goals():
    from bench import memory as bench

    row = dict(n_params=1000, ranks=4, states_measured=4e6, states_predicted=4e6, states_ratio=1.0,
               activations_measured=1e6, activations_predicted=1.1e6, activations_ratio=0.91,
               peak_measured=6e6, peak_predicted=5.1e6, peak_ratio=1.18)
    text = bench.report([dict(row, strategy="ddp"),
                         dict(row, strategy="fsdp", states_measured=1e6, states_vs_ddp=0.25, peak_vs_ddp=0.5)], n_embd=64)
    assert "at 4 ranks <= 0.40: 0.25 (met)" in text and "within 0.85-1.15" in text
    bad = bench.report([dict(row, strategy="ddp", states_ratio=1.3)], n_embd=64)
    assert "NOT met" in bad



def test_memory_views_render_every_row():
    from labkit.widgets.memory import memory_figure, memory_table_view

    row = dict(n_params=1000, ranks=2, zero_stage=0, strategy="ddp", states_measured=4 * MiB, states_predicted=4 * MiB,
               states_ratio=1.0, activations_measured=MiB, activations_predicted=1.1 * MiB, activations_ratio=0.91,
               peak_measured=6 * MiB, peak_predicted=5 * MiB, peak_ratio=1.2)
    fsdp = dict(row, strategy="fsdp", zero_stage=3, states_measured=2 * MiB, states_vs_ddp=0.5, peak_vs_ddp=0.6)
    text = str(memory_table_view([row, fsdp]))
    assert "fsdp (ZeRO-3)" in text and "4.0 / 4.0 (1.00)" in text and "0.50 / 0.60" in text
    fig = memory_figure([row, fsdp])
    assert [t.name for t in fig.data] == ["model states, measured", "model states, predicted",
                                         "step peak, measured", "step peak, predicted"]
    assert list(fig.data[0].y) == [4.0, 2.0]


MiB = 2**20


def test_memory_config_is_the_measured_gpt_in_float32_on_the_given_settings():
    from labkit.train_memory import MEMORY_SHAPE, memory_config

    base = TrainConfig().replace(max_steps=7, seed=3, precision="auto", batch_size=16)
    c = memory_config(base)
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == tuple(MEMORY_SHAPE.values())
    assert c.model.precision == "float32" and c.batch_size == 2  # the estimate's byte sizes, activations kept small
    assert (c.max_steps, c.seed) == (7, 3)  # the rest is the caller's
    assert memory_config(base, n_embd=64).model.n_embd == 64


def test_fresh_workers_are_new_processes_and_as_many(client2):
    import os

    from labkit.train_memory import fresh_workers

    before = client2.run(os.getpid)
    fresh_workers(client2, timeout=300)  # what memory_table gives it: 120 s ran out once under CI load
    after = client2.run(os.getpid)
    assert len(after) == len(before) == 2
    assert not set(before.values()) & set(after.values()), "the workers were not restarted"
