"""labkit.core.ranks (torch.distributed ranks on Dask workers) and labkit.core.events (the metrics stream)."""

import os
import signal
import time
from pathlib import Path

import pytest

from labkit.core.events import Recorder, emit, subscribe
from labkit.core.ranks import RankError, RankLost, RankProbe, choose_backend, local_ranks, rank_gpu, run_ranks
from labkit.widgets.live_plot import LivePlot




def _allreduce(ctx, value):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value * (ctx.rank + 1))])
    dist.all_reduce(t)
    emit("test", rank=ctx.rank, step=1, loss=float(t.item()))
    return {"rank": ctx.rank, "sum": t.item(), "backend": ctx.backend, "device": ctx.device,
            "master": ctx.master, "world": ctx.world_size, "pid": os.getpid()}


def test_allreduce_over_two_workers(client):
    rec = Recorder()
    sub = subscribe(client, rec, kinds=["test"])
    out = run_ranks(client, _allreduce, 2.0, timeout=60)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["sum"] == 2.0 + 4.0 for o in out)
    assert {o["backend"] for o in out} == {"gloo"} and {o["device"] for o in out} == {"cpu"}
    assert len({o["pid"] for o in out}) == 2, "each rank is pinned to its own worker process"
    # the metrics the ranks emitted reach the notebook through the Dask topic
    deadline = time.time() + 10
    while len(rec.of("test")) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert sorted(e["rank"] for e in rec.of("test")) == [0, 1]
    sub.close()
    # a second run chooses its own port (never a fixed one)
    again = run_ranks(client, _allreduce, 1.0, timeout=60)
    assert again[0]["sum"] == 3.0
    _assert_ports_chosen_by_the_os([out[0]["master"], again[0]["master"]])


def _assert_ports_chosen_by_the_os(masters: list[str]) -> None:
    """Each run's master port is new, and one the OS handed out (its ephemeral range), not a fixed one."""
    ports = [int(m.rsplit(":", 1)[1]) for m in masters]
    assert len(set(ports)) == len(ports), f"runs in a row got the same master port {ports}: a fixed port?"
    assert 29500 not in ports, "29500 is torch's default MASTER_PORT: two runs at once would collide"
    span = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if span.exists():
        lo, hi = map(int, span.read_text().split())
        assert all(lo <= p <= hi for p in ports), f"ports {ports} not in the OS's ephemeral range {lo}-{hi}"


def test_port_check_can_fail():
    with pytest.raises(AssertionError, match="same master port"):
        _assert_ports_chosen_by_the_os(["h:29500", "h:29500"])
    with pytest.raises(AssertionError, match="29500"):
        _assert_ports_chosen_by_the_os(["h:40001", "h:29500"])


def _fail_on_rank_one(ctx):
    import torch
    import torch.distributed as dist

    if ctx.rank == 1:
        raise ValueError("bad batch on rank one")
    t = torch.ones(1)
    dist.all_reduce(t)  # blocks: rank 1 never joins, so this must end by error or timeout
    return t.item()


def test_error_on_one_rank_names_it_and_cluster_survives(client):
    """The failed rank's process group is freed with it, so rank 0's waiting all-reduce fails at once: the
    error comes in seconds, not after the 120 s timeout, and no rank is left waiting."""
    start = time.monotonic()
    with pytest.raises(RankError) as e:
        run_ranks(client, _fail_on_rank_one, timeout=120)
    assert e.value.rank == 1 and e.value.still_waiting == []
    assert "bad batch on rank one" in str(e.value) and "Traceback" in e.value.remote_traceback
    assert time.monotonic() - start < 60
    out = run_ranks(client, _allreduce, 1.0, timeout=60)
    assert out[1]["sum"] == 3.0


def _fail_on_rank_one_inside_ddp(ctx):
    import time

    import torch
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(torch.nn.Linear(4, 4))  # keeps the process group alive past the error
    if ctx.rank == 1:
        raise ValueError("bad batch on rank one, inside DDP")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # gradient all-reduces that rank 1 never joins
        model(torch.ones(2, 4)).sum().backward()


def _rank_of(ctx):
    return ctx.rank


def test_an_error_inside_ddp_is_reported_before_the_waiting_rank_times_out():
    """Under DDP the failed rank's group outlives it, so rank 0 waits for its collective's timeout; the
    error does not wait with it (rank 0 is still waiting when it comes), and names the rank that waits and
    for how long. The next run says why it does not start at once on rank 0's worker, then runs."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as c:
        with pytest.raises(RankError) as e:
            run_ranks(c, _fail_on_rank_one_inside_ddp, timeout=20)
        assert e.value.rank == 1 and e.value.still_waiting == [0], str(e.value)
        assert "Rank(s) 0 still wait in a collective for rank 1" in str(e.value) and "(20 s)" in str(e.value)
        rank0 = sorted(c.scheduler_info()["workers"])[0]
        with pytest.warns(RuntimeWarning, match=rf"worker\(s\) {rank0} still run a rank of an earlier run"):
            assert run_ranks(c, _rank_of, timeout=60) == [0, 1]


def _die_on_rank_one(ctx):
    import torch
    import torch.distributed as dist

    dist.barrier()
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def test_lost_worker_is_named(client):
    start = time.monotonic()
    with pytest.raises(RankLost) as e:  # the cause, not a survivor's connection error (RankError)
        run_ranks(client, _die_on_rank_one)  # the default timeout: the report must not wait for it
    assert e.value.rank == 1 and "rank 1 was lost" in str(e.value)
    assert time.monotonic() - start < 30
    client.wait_for_workers(2, timeout=60)
    out = run_ranks(client, _allreduce, 1.0, timeout=60)
    assert [o["rank"] for o in out] == [0, 1]


def _die_while_rank_zero_is_busy(ctx, release):
    import torch.distributed as dist
    from distributed import Event

    dist.barrier()
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    # rank 0 is in a long stretch with no collective and no abort check (a slow step, a big eval):
    # nothing on it fails when its peer dies; the test releases it once RankLost came
    Event(release).wait(timeout=90)
    return "released"


def test_lost_worker_is_reported_while_a_survivor_is_busy(client):
    from distributed import Event

    release = f"labkit-test-release-{os.getpid()}-{time.time_ns()}"
    start = time.monotonic()
    try:
        with pytest.raises(RankLost) as e:
            run_ranks(client, _die_while_rank_zero_is_busy, release)  # default timeout (120 s)
        assert e.value.rank == 1
        assert time.monotonic() - start < 30, "waited for the survivor as long as the collective timeout"
    finally:
        Event(release, client=client).set()
    client.wait_for_workers(2, timeout=60)
    out = run_ranks(client, _allreduce, 1.0, timeout=60)
    assert [o["sum"] for o in out] == [3.0, 3.0]


def test_backend_choice():
    gpu = lambda w, i: RankProbe(w, "node1", True, (f"GPU-{i}",))
    assert choose_backend([gpu("a", 0), gpu("b", 1)]) == "nccl"
    assert choose_backend([gpu("a", 0), gpu("b", 0)]) == "gloo", "two ranks on one GPU cannot use nccl"
    cpu = [RankProbe("a", "h", False, ()), RankProbe("b", "h", False, ())]
    assert choose_backend(cpu) == "gloo"
    with pytest.raises(ValueError, match="one distinct GPU per rank"):
        choose_backend(cpu, "nccl")
    with pytest.raises(ValueError, match="auto"):
        choose_backend(cpu, "mpi")


def test_backend_compares_the_gpu_each_rank_uses_when_workers_see_several():
    # ranks use cuda:{local_rank % visible GPUs}, local_rank counting the ranks on the same host
    two = ("GPU-A", "GPU-B")
    probes = [RankProbe("w0", "node1", True, two), RankProbe("w1", "node1", True, two)]
    assert [rank_gpu(p, lr) for p, lr in zip(probes, local_ranks(probes))] == ["GPU-A", "GPU-B"]
    assert choose_backend(probes) == "nccl", "same first GPU, but the ranks use A and B"
    swapped = [RankProbe("w0", "node1", True, two), RankProbe("w1", "node1", True, ("GPU-B", "GPU-A"))]
    assert choose_backend(swapped) == "gloo", "different first GPUs, but both ranks use GPU-A"
    three = probes + [RankProbe("w2", "node1", True, two)]
    assert choose_backend(three) == "gloo", "three ranks on two GPUs: two share one"
    with pytest.raises(ValueError, match="one distinct GPU per rank"):
        choose_backend(three, "nccl")
    # two hosts: local ranks restart at 0 on each, and their GPUs are different devices
    hosts = [RankProbe("w0", "n1", True, ("n1-A", "n1-B")), RankProbe("w1", "n2", True, ("n2-A", "n2-B")),
             RankProbe("w2", "n1", True, ("n1-A", "n1-B"))]
    assert local_ranks(hosts) == [0, 0, 1]
    assert choose_backend(hosts) == "nccl"
    assert choose_backend(hosts + [RankProbe("w3", "n1", False, ())]) == "gloo", "a rank without a GPU"


def test_emit_to_sink_and_liveplot_text(capsys):
    plot = LivePlot(metrics=("loss", "lr"), mode="text", min_interval=0.0, text_every=0.0)
    for step in range(5):
        ev = emit("train", plot, rank=0, step=step, loss=5.0 - step, lr=1e-3)
        assert ev["kind"] == "train" and ev["time"] > 0
    emit("train", plot, rank=1, step=0, loss=9.0)
    emit("other", plot, rank=0, step=9, loss=1.0)  # no kind filter: drawn too
    assert plot.points("loss", 0)[-1] == (9, 1.0)
    assert plot.groups() == [0, 1]
    plot.close()
    assert "loss=" in capsys.readouterr().out


def test_liveplot_widget_mode_updates_figure():
    plot = LivePlot(metrics=("loss",), mode="widget", kinds=["train"], min_interval=0.0)
    emit("train", plot, rank=0, step=0, loss=3.0)
    emit("train", plot, rank=0, step=1, loss=2.0)
    emit("val", plot, rank=0, step=1, loss=99.0)  # filtered out
    plot.draw()
    ys = list(plot.widget.data[0].y)
    assert ys == [3.0, 2.0]


def test_a_failing_sink_warns_and_never_breaks_the_caller():
    """emit() promises that delivery problems cannot break a training run: a sink that raises
    gives a warning naming the event, and the caller still gets its event back."""
    from labkit.core.events import emit

    def broken(event):
        raise RuntimeError("plot went away")

    with pytest.warns(RuntimeWarning, match="failed on a 'train' event.*plot went away"):
        event = emit("train", broken, step=3, loss=1.5)
    assert event["kind"] == "train" and event["step"] == 3


def test_training_goes_on_when_its_sink_fails(shards):
    from labkit.model import GPTConfig
    from labkit.train import TrainConfig, train

    def broken(event):
        raise ValueError("no display")

    cfg = TrainConfig(model=GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, precision="float32"),
                      batch_size=2, max_steps=3, warmup_steps=1, eval_interval=0, sample_tokens=0, num_threads=1)
    with pytest.warns(RuntimeWarning, match="no display"):
        res = train(cfg, shards, sink=broken)
    assert res.steps == 3


def _hold(ctx, seconds):
    time.sleep(seconds)
    return ctx.rank


def test_the_client_refreshing_its_cache_is_not_a_lost_rank(client):
    """The client's periodic refresh (here every 5 ms) replaces the cache that
    ``client.scheduler_info()`` returns with one that lists no workers: a rank watched through that
    cache looked lost now and then (RankLost after 1.8 s in CI, both workers fine). Watched through
    ``workers_now``, 2,000 reads and a 4 s run under that refresh never see a worker missing."""
    import dask
    from distributed import Client

    from labkit.core.workers import workers_now

    with dask.config.set({"distributed.client.scheduler-info-interval": "5ms"}):
        fast = Client(client.scheduler.address, set_as_default=False)
    try:
        assert all(len(workers_now(fast)) == 2 for _ in range(2000))
        assert run_ranks(fast, _hold, 4.0, poll=0.005, timeout=60) == [0, 1]
    finally:
        fast.close()
