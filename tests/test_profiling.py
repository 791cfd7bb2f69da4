"""torch.profiler on chosen ranks and steps (labkit.profiling): trace, per-step breakdown, its view."""

from __future__ import annotations

import json

import pytest

from labkit.core.events import Recorder
from labkit.profiling import PHASES
from labkit.train import TrainConfig, train, train_distributed


def cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig().replace(max_steps=4, eval_interval=0, sample_tokens=0, checkpoint_dir=None, device="cpu",
                                 num_threads=1, profile_dir=str(tmp_path / "prof"), **kw)


def test_ddp_rank_0_steps_2_to_3_writes_a_trace_and_a_breakdown(client, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("KINETO_LOG_LEVEL", "5")
    res = train_distributed(client, cfg(tmp_path, profile_steps=(2, 3), profile_ranks=(0,)), shards)
    assert res.world_size == 2 and len(res.profiles) == 1
    prof = res.profiles[0]
    assert prof["rank"] == 0 and prof["trace"].endswith("rank0-steps2-3.json")
    names = {e.get("name") for e in json.loads(open(prof["trace"]).read())["traceEvents"]}
    assert {"labkit:forward", "labkit:backward", "labkit:step 2", "labkit:step 3"} <= names
    assert [r["step"] for r in prof["breakdown"]] == [2, 3]
    for row in prof["breakdown"]:
        assert all(row[p + "_ms"] > 0 for p in PHASES), row
        assert row["communication_ms"] > 0, row  # DDP's gradient all-reduce (gloo)
        assert sum(row[p + "_ms"] for p in PHASES) <= row["step_ms"] + 1e-6


def test_fsdp_communication_is_counted_too(client, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("KINETO_LOG_LEVEL", "5")
    res = train_distributed(client, cfg(tmp_path, strategy="fsdp", profile_steps=(2, 2), profile_ranks=(0, 1)), shards)
    assert sorted(p["rank"] for p in res.profiles) == [0, 1]
    assert all(p["breakdown"][0]["communication_ms"] > 0 for p in res.profiles)  # all-gather, reduce-scatter


def test_one_process_emits_a_profile_event(shards, tmp_path):
    rec = Recorder()
    res = train(cfg(tmp_path, profile_steps=(2, 2)), shards, sink=rec)
    (event,) = rec.of("profile")
    assert event["trace"] == res.profiles[0]["trace"] and event["breakdown"][0]["communication_ms"] == 0


def test_bad_profile_settings_fail_at_once_naming_the_fix(client, shards, tmp_path):
    with pytest.raises(ValueError, match="raise max_steps"):
        cfg(tmp_path, profile_steps=(3, 9))
    with pytest.raises(ValueError, match="1 <= first <= last"):
        cfg(tmp_path, profile_steps=(3, 2))
    with pytest.raises(ValueError, match="choose ranks in that range or run on more workers"):
        train_distributed(client, cfg(tmp_path, profile_steps=(2, 3), profile_ranks=(2,)), shards)
    with pytest.raises(ValueError, match="0..0"):
        train(cfg(tmp_path, profile_steps=(2, 3), profile_ranks=(1,)), shards)


def _profile(rank: int, comm: float) -> dict:
    row = dict(step=2, step_ms=10.0, data_ms=1.0, forward_ms=3.0, backward_ms=4.0, optimizer_ms=1.5, other_ms=0.5,
               communication_ms=comm, communication_in_backward_ms=comm / 2)
    return {"kind": "profile", "rank": rank, "steps": [2, 2], "trace": f"/x/rank{rank}-steps2-2.json", "breakdown": [row]}


def test_profile_view_renders_a_stacked_bar_per_step():
    from labkit.widgets.profile import ProfileView, profile_figure, profile_table

    fig = profile_figure([_profile(1, 2.0), _profile(0, 2.0)])
    assert [t.name for t in fig.data] == [*PHASES, "other", "communication (overlaps)"]
    assert list(fig.data[0].x) == ["rank 0 step 2", "rank 1 step 2"] and fig.layout.barmode == "stack"
    assert list(fig.data[2].y) == [4.0, 4.0] and list(fig.data[-1].y) == [2.0, 2.0]
    assert "2.00 (1.00 in backward)" in str(profile_table([_profile(0, 2.0)]))
    view = ProfileView(mode="widget")
    view({"kind": "train", "step": 1})
    view(_profile(0, 1.0))
    assert len(view.widget.data) == 6 and list(view.widget.data[1].y) == [3.0]


def test_breakdown_takes_the_union_of_overlapping_collectives():
    from types import SimpleNamespace as NS

    from labkit.profiling import breakdown

    ev = lambda name, a, b: NS(name=name, time_range=NS(start=a, end=b))  # noqa: E731
    rows = breakdown([ev("labkit:step 5", 0, 10_000), ev("labkit:backward", 2_000, 8_000),
                      ev("gloo:all_reduce", 5_000, 9_000), ev("gloo:all_reduce", 6_000, 7_000),
                      ev("labkit:forward", 0, 2_000), ev("gloo:all_reduce", 20_000, 30_000)])
    (r,) = rows
    assert r["step"] == 5 and r["communication_ms"] == 4.0 and r["communication_in_backward_ms"] == 3.0
    assert r["backward_ms"] == 6.0 and r["other_ms"] == 2.0


def test_ladder_climbs_from_fp32_where_bf16_is_emulated_and_says_why():
    from bench.ladder import RUNGS, climbing, report

    assert climbing(fast_bf16=True) == RUNGS
    slow = climbing(fast_bf16=False)
    assert [r.precision for r in slow] == ["float32", "bfloat16", "float32", "float32", "float32"]
    rows = [dict(rung=r.name, precision=r.precision, micro_batch=r.micro_batch, grad_accum=32 // r.micro_batch,
                 tokens_per_s=t, vs_fp32=t / 1000, vs_previous=v) for r, t, v in
            zip(slow[:3], (1000, 300, 1010), (1.0, 0.3, 1.01))]
    rows += [dict(rung=slow[3].name, precision="float32", micro_batch=16, grad_accum=2, skipped="no C++ compiler")]
    text = report(rows, slow[:4])
    assert "emulated" in text and "skipped torch.compile: no C++ compiler" in text and "0.30" in text
