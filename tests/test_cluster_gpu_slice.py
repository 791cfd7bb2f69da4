"""Several worker processes per Slurm job (``workers_per_job``), each with its own slice of the job's GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cloudpickle
import pytest

from labkit.cluster import ClusterConfigError, ClusterError, start_cluster
from labkit.cluster import gpu_slice
from labkit.config import ConfigError, load_config

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # client.run ships these helpers by value


# ---------------------------------------------------------------- the slicing itself (no Slurm)
@pytest.mark.parametrize("job, index, gpus, workers, expected", [
    ("0,1", 0, 1, 2, ["0"]),
    ("0,1", 1, 1, 2, ["1"]),
    ("4,5,6,7", 1, 2, 2, ["6", "7"]),
    ("3,1,2", 2, 1, 3, ["2"]),               # Slurm's order is kept, ids are never renumbered
    ("0,1,2,3", 1, 1, 2, ["1"]),             # a longer list: only the first workers*gpus are handed out
    ("GPU-aa,GPU-bb", 1, 1, 2, ["GPU-bb"]),  # UUIDs, as some sites set them
    ("0,1", 0, 1, 1, ["0", "1"]),            # one worker per job: nothing narrowed
    (" 2 , 3 ,", 1, 1, 2, ["3"]),
])
def test_slice_keeps_this_process_share_of_slurm_list(job, index, gpus, workers, expected):
    assert gpu_slice.slice_gpus(job, index, gpus, workers) == expected


def test_slices_of_a_job_are_disjoint_and_cover_it():
    job = "5,2,7,0,3,1"
    parts = [gpu_slice.slice_gpus(job, i, 2, 3) for i in range(3)]
    assert sum(parts, []) == job.split(",")


@pytest.mark.parametrize("value, expected", [
    ("-1", []),                    # CUDA's "no GPU"
    ("NoDevFiles", []),            # Slurm's value for a job without GPU device files
    ("", []),
    (None, []),
    ("0,1", ["0", "1"]),
    (" 2, 3 ", ["2", "3"]),
    ("0,,1", ["0", "1"]),          # empty entries dropped
    ("0,-1,1", ["0"]),             # CUDA ignores every id after an invalid one
    (["4", " 5 "], ["4", "5"]),
])
def test_parse_ids_is_the_one_reading_of_cuda_visible_devices(value, expected):
    assert gpu_slice.parse_ids(value) == expected


@pytest.mark.parametrize("value", ["-1", "NoDevFiles", " -1 ", ""])
def test_every_gpu_helper_sees_no_gpu_where_cuda_sees_none(monkeypatch, value):
    from labkit.check.cluster import _probe
    from labkit.cluster.handle import _visible_gpus
    from labkit.cluster.local import local_gpu_ids

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert _visible_gpus() == [] and local_gpu_ids() == [] and _probe() == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 2, 3 ")
    assert _visible_gpus() == ["2", "3"] == local_gpu_ids() and _probe() == "2,3"


@pytest.mark.parametrize("job, index, gpus, workers, needle", [
    ("0", 0, 1, 2, "1 GPU(s) in CUDA_VISIBLE_DEVICES=0, but workers_per_job=2 x gpus_per_worker=1 need 2"),
    ("", 0, 1, 2, "CUDA_VISIBLE_DEVICES=(unset or empty)"),
    ("0,1,2", 0, 2, 2, "need 4. Fix: make the job ask --gres=gpu:4"),
    ("0,1", 2, 1, 2, "index 2 is outside 0..1"),
    ("0,1", 0, 0, 2, "gpus_per_worker=0"),
])
def test_slice_refuses_what_it_cannot_give(job, index, gpus, workers, needle):
    with pytest.raises(gpu_slice.GpuSliceError) as err:
        gpu_slice.slice_gpus(job, index, gpus, workers)
    assert needle in str(err.value)


def test_env_for_a_worker_name_and_no_change_for_single_worker_jobs():
    env = {"CUDA_VISIBLE_DEVICES": "2,3", "LABKIT_WORKERS_PER_JOB": "2", "LABKIT_GPUS_PER_WORKER": "1"}
    assert gpu_slice.env_for("labkit-1a2b3c4d-7-1", env) == {"CUDA_VISIBLE_DEVICES": "3", "LABKIT_JOB_GPUS": "2,3"}
    assert gpu_slice.env_for("labkit-1a2b3c4d-7-0", env)["CUDA_VISIBLE_DEVICES"] == "2"
    single = {"CUDA_VISIBLE_DEVICES": "2,3", "LABKIT_GPUS_PER_WORKER": "1"}
    assert gpu_slice.env_for("labkit-1a2b3c4d-7", single) == {}
    with pytest.raises(gpu_slice.GpuSliceError, match="does not end in -<process number>"):
        gpu_slice.env_for("worker", env)


def test_preload_sets_the_spawned_worker_env_on_a_nanny_and_fails_at_load(monkeypatch):
    class FakeNanny:  # what dask_setup uses of a Nanny: its name, env (for the child) and pre_spawn_env
        def __init__(self, name):
            self.name, self.env, self.pre_spawn_env = name, {}, {}

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("LABKIT_WORKERS_PER_JOB", "2")
    monkeypatch.setenv("LABKIT_GPUS_PER_WORKER", "1")
    nannies = [FakeNanny(f"labkit-x-0-{i}") for i in range(2)]
    for n in nannies:
        gpu_slice.dask_setup(n)
    assert [n.env["CUDA_VISIBLE_DEVICES"] for n in nannies] == ["0", "1"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # the nanny process (shared by both) keeps Slurm's list
    bad = FakeNanny("no-index")
    with pytest.raises(gpu_slice.GpuSliceError):
        gpu_slice.dask_setup(bad)
    assert bad.env["CUDA_VISIBLE_DEVICES"] == ""  # never the whole job's list
    # loading the file (as dask does, by path) in a job whose list is too short fails at once
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    r = subprocess.run([sys.executable, gpu_slice.__file__], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "GpuSliceError" in r.stderr and "need 2" in r.stderr


def test_workers_per_job_is_a_validated_profile_key():
    prof = load_config().profile("slurm")
    assert prof.workers_per_job == 1
    assert prof.replace(workers_per_job=3).workers_per_job == 3
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(ConfigError, match="workers_per_job"):
            prof.replace(workers_per_job=bad)


# ---------------------------------------------------------------- against the real local Slurm
def test_job_with_too_few_gpus_fails_loudly(slurm):
    # a prologue that narrows CUDA_VISIBLE_DEVICES stands in for a node whose GRES hands out fewer ids
    with pytest.raises(ClusterError) as err:
        start_cluster("slurm", workers=2, gpus_per_worker=1, workers_per_job=2, timeout=60, say=lambda s: None,
                      prologue=["export CUDA_VISIBLE_DEVICES=0"])
    assert "ended before their worker joined" in str(err.value)
    assert "workers_per_job=2 x gpus_per_worker=1 need 2" in str(err.value)


def test_more_gpus_per_job_than_a_node_has_fails_fast(slurm):
    with pytest.raises(ClusterConfigError, match=r"1 GPUs per worker x workers_per_job=3 asked.*at most 2"):
        start_cluster("slurm", workers=3, gpus_per_worker=1, workers_per_job=3, say=lambda s: None)


def test_multi_worker_jobs_retire_and_are_replaced(slurm):
    import dask

    def _job_and_gpu(_):  # nested: shipped by value, workers cannot import this test module
        time.sleep(0.2)
        return os.environ["SLURM_JOB_ID"], os.environ["CUDA_VISIBLE_DEVICES"]

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "3s"}):
        with start_cluster("slurm", workers=2, gpus_per_worker=1, workers_per_job=2, lifetime="10s",
                           lifetime_stagger="2s", timeout=120, say=lambda s: None) as h:
            first = set(h.job_ids())
            seen: list[tuple[str, str]] = []
            t0 = time.monotonic()
            while not {j for j, _ in seen} - first and time.monotonic() - t0 < 80:
                seen.append(h.client.submit(_job_and_gpu, time.monotonic(), pure=False).result(timeout=60))
                time.sleep(0.5)
            assert {j for j, _ in seen} - first, f"no replacement job: {sorted(set(seen))} vs first {first}"
            h.wait(2, timeout=60)
            assert len(h.job_ids()) == 1 and set(h.job_ids()).isdisjoint(first)
            ids = [tuple(v) for v in h.gpu_map().values()]
            assert len(ids) == 2 and all(len(v) == 1 for v in ids) and len(set(ids)) == 2


def _gpu_env():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("LABKIT_JOB_GPUS"), os.environ.get("SLURM_JOB_ID")


def _pretend_cuda():
    """Runs on a worker: torch.cuda reports the GPUs of CUDA_VISIBLE_DEVICES (the GPU is the only mock)."""
    import os
    import types

    import torch

    ids = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: len(ids)
    torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(uuid=f"GPU-{ids[i]}")
    torch.cuda.set_device = lambda i: os.environ.__setitem__("LABKIT_TEST_CUDA_SET", str(i))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shared_job(slurm):
    """Two 1-GPU workers in ONE Slurm job (workers_per_job=2)."""
    lines: list[str] = []
    handle = start_cluster("slurm", workers=2, gpus_per_worker=1, workers_per_job=2, timeout=120, say=lines.append)
    handle.say_lines = lines
    yield handle
    handle.close()


def test_one_job_two_workers_each_its_own_gpu(shared_job):
    h = shared_job
    script = h.cluster.job_script()
    assert "#SBATCH --gres=gpu:2" in script and "--nworkers 2" in script and "--resources GPU=1" in script
    assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH --mem=8G" in script  # cores, memory per worker x 2
    assert len(h.job_ids()) == 1
    job = h.job_ids()[0]
    gres = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=15).stdout
    assert "gres/gpu=2" in gres or "gres:gpu:2" in gres, gres
    gmap = h.gpu_map()
    assert len(gmap) == 2 and all(name.startswith(h.session.job_name + "-0-") for name in gmap), gmap
    ids = [tuple(v) for v in gmap.values()]
    assert all(len(v) == 1 for v in ids) and len(set(ids)) == 2, gmap
    env = h.client.run(_gpu_env)
    job_lists = {e[1] for e in env.values()}
    assert len(job_lists) == 1  # both keep Slurm's list for the job...
    slurm_list = job_lists.pop().split(",")
    assert sorted(v[0] for v in ids) == sorted(slurm_list)  # ...and their slices are exactly it
    assert {e[2] for e in env.values()} == {job}
    info = h.workers()
    assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in info.values())
    st = h.status()
    assert sorted(r.gpus for r in st.workers) == sorted(ids) and st.target == 2
    assert any("2 workers per job (--gres=gpu:2)" in line for line in h.say_lines)


def test_gpu_tasks_and_ranks_use_the_worker_own_gpu(shared_job):
    from labkit.core.ranks import RankProbe, _probe_worker, choose_backend, run_ranks

    h = shared_job
    futs = [h.client.submit(lambda i: os.environ["CUDA_VISIBLE_DEVICES"], i, resources={"GPU": 1}, pure=False)
            for i in range(4)]
    assert {f.result(timeout=30) for f in futs} <= {v[0] for v in h.gpu_map().values()}
    h.client.run(_pretend_cuda)
    probes = [RankProbe(a, p["host"], p["cuda"], tuple(p["gpu_ids"])) for a, p in h.client.run(_probe_worker).items()]
    assert choose_backend(probes) == "nccl"  # one distinct GPU per rank, though both share a job and a host

    def _rank_facts(ctx):  # local, so it travels by value (Slurm workers cannot import this test module)
        import os

        return ctx.device, ctx.local_rank, os.environ["CUDA_VISIBLE_DEVICES"], os.environ["LABKIT_TEST_CUDA_SET"]

    facts = run_ranks(h.client, _rank_facts, backend="gloo", timeout=60)
    assert sorted(f[1] for f in facts) == [0, 1]  # same host: local ranks 0 and 1...
    assert [f[0] for f in facts] == ["cuda:0", "cuda:0"] and [f[3] for f in facts] == ["0", "0"]  # ...each its only GPU
    assert len({f[2] for f in facts}) == 2


def test_scale_counts_workers_and_rounds_to_whole_jobs(shared_job):
    h = shared_job  # the node has 2 GPUs: one 2-GPU job at a time
    first = h.job_ids()
    h.scale(1, wait=True, timeout=60)  # 1 worker at 2 per job: still that one job, both workers
    assert h.target == 2 and h.job_ids() == first and len(h.client.nthreads()) == 2
    assert any("1 workers asked, 2 per Slurm job: 1 job(s), 2 workers" in line for line in h.say_lines)
    h.scale(0, wait=True, timeout=60)
    assert h.job_ids() == [] and len(h.client.nthreads()) == 0
    h.scale(2, wait=True, timeout=120)  # a new job, again split in two
    assert len(h.job_ids()) == 1 and h.job_ids() != first
    ids = [tuple(v) for v in h.gpu_map().values()]
    assert len(ids) == 2 and all(len(v) == 1 for v in ids) and len(set(ids)) == 2
