"""Inspect and measure a live cluster: a real LocalCluster of worker processes, and the real local Slurm."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dask.distributed import Client

from labkit.hardware.inspect import WorkerHardware, inspect_cluster, probe
from labkit.hardware.measure import (
    AllReducePoint,
    MeasureConfig,
    allreduce_rank,
    bench_device,
    compare_with_catalog,
    cpu_peak_flops,
    fit_allreduce,
    host_device_bandwidth,
    measure_cluster,
    median_time,
    peaks_for,
    pick_device,
    ratios,
    supported_dtypes,
)
from conftest import skip_unless_ci

REPO = Path(__file__).resolve().parent.parent
SMALL = MeasureConfig(matmul_n=64, copy_bytes=1 << 20, host_device_bytes=1 << 20,
                      allreduce_sizes=(1024, 64 * 1024, 1 << 20), warmup=1, repeats=3)




def test_probe_reports_this_process(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu")
    info = probe()
    assert info.pid == os.getpid() and info.cores >= 1 and info.host_cpus >= info.cores
    assert info.ram_bytes > 100 * 2**20 and info.cpu_model
    assert (info.slurm_job_id, info.slurm_partition) == ("4242", "gpu")
    assert info.worker == "" and info.as_row()["gpus"] == "-"


def test_probe_explains_a_gpu_it_cannot_use(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a real GPU is visible here; the explanation is for GRES without CUDA")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    info = probe()
    assert info.cuda_visible_devices == "1" and not info.cuda_available and info.gpus == ()
    assert any("CUDA_VISIBLE_DEVICES=1" in n and "torch.cuda is not available" in n for n in info.notes)


def test_inspect_cluster_one_row_per_worker(client):
    rows = inspect_cluster(client)
    workers = sorted(client.scheduler_info()["workers"])
    assert [r.worker for r in rows] == workers
    assert all(isinstance(r, WorkerHardware) for r in rows)
    assert len({r.pid for r in rows}) == 2 and os.getpid() not in {r.pid for r in rows}
    assert all(r.nthreads == 1 and r.memory_limit and r.memory_limit > 0 for r in rows)


def test_measure_cluster_on_two_workers(client):
    m = measure_cluster(client, SMALL)
    assert len(m.devices) == 2 and {d.worker for d in m.devices} == set(client.scheduler_info()["workers"])
    for d in m.devices:
        assert d.device == "cpu" and [x.dtype for x in d.matmul] == ["fp64", "fp32", "bf16"]
        assert all(x.flops_per_s > 1e6 for x in d.matmul) and d.copy.bytes_per_s > 1e6
        assert d.host_to_device is None and any("host<->device" in n for n in d.notes)
    sizes = [p.n_bytes for p in m.allreduce]
    assert sizes == list(SMALL.allreduce_sizes)
    assert {p.backend for p in m.allreduce} == {"gloo"} and {p.world_size for p in m.allreduce} == {2}
    assert all(p.seconds > 0 and p.bus_bandwidth == pytest.approx(p.algo_bandwidth) for p in m.allreduce)
    assert m.latency_s == min(p.seconds for p in m.allreduce)
    for d in m.devices:      # on CPU the copy bandwidth gets a ratio: against the catalog's generic CPU-node
        assert compare_with_catalog(d).memory == pytest.approx(d.copy.bytes_per_s / 614e9) and d.copy.bytes_per_s > 0


def test_hardware_panel_refresh_inspects_again(client):
    from labkit.widgets.hardware import HardwarePanel

    first = inspect_cluster(client)
    panel = HardwarePanel(client, first[:1], mode="widget")          # as if only one worker had started
    assert first[1].worker not in panel._table.value and "1 worker(s)" in panel._status.value
    panel._button.click()                                              # re-runs inspect_cluster(client)
    assert [r.worker for r in panel.rows] == [r.worker for r in first]
    assert all(r.worker in panel._table.value for r in first) and "2 worker(s), inspected at" in panel._status.value
    assert {r.pid for r in panel.rows} == {r.pid for r in first}
    bundle = panel._repr_mimebundle_()       # the widget in Jupyter, the table for viewers without widgets
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    assert first[1].worker in bundle["text/plain"] and first[1].worker in bundle["text/html"]

    def broken(_client):
        raise TimeoutError("worker tcp://gone did not answer")

    panel._inspect = broken
    panel._button.click()                                              # the error shows; the table stays
    assert "inspection failed" in panel._status.value and "tcp://gone" in panel._status.value
    assert all(r.worker in panel._table.value for r in first) and not panel._button.disabled
    with pytest.raises(TimeoutError):
        panel.refresh()                                                 # from code, errors propagate
    text = HardwarePanel(client, mode="text")                          # console fallback
    assert text.widget is None and all(r.worker in str(text) for r in first) and ".refresh()" in str(text)
    assert "application/vnd.jupyter.widget-view+json" not in text._repr_mimebundle_()


def test_median_and_flop_arithmetic():
    calls = []
    t = median_time(lambda: calls.append(1), warmup=2, repeats=5, min_sample_s=0)
    assert len(calls) == 2 + 1 + 5 and t >= 0
    r = bench_device(MeasureConfig(matmul_n=32, copy_bytes=4096, host_device_bytes=4096, warmup=0, repeats=1,
                                   dtypes=("fp32",)))
    (mm,) = r.matmul
    assert mm.flops_per_s == pytest.approx(2 * 32**3 / mm.seconds)
    assert mm.intensity == pytest.approx(2 * 32 / 12)
    assert r.copy.bytes_per_s == pytest.approx(2 * 4096 / r.copy.seconds)
    assert ratios(r, {"fp32": mm.flops_per_s * 4}, memory_bw=r.copy.bytes_per_s * 2) == pytest.approx(
        {"fp32": 0.25, "memory": 0.5})
    peaks, bw, label = peaks_for(r)
    assert "estimated" in label and bw is None and peaks["fp32"] > 0
    gpu_like = dataclasses.replace(r, device="cuda:0", device_name="NVIDIA A100-SXM4-80GB", device_memory_bytes=80 * 2**30)
    peaks, bw, label = peaks_for(gpu_like)
    assert peaks["bf16"] == 312e12 and bw == 2039e9 and label.startswith("A100-SXM4-80GB")


def test_fit_allreduce_recovers_latency_and_bandwidth():
    latency, bw = 7e-6, 12e9
    for g in (2, 4, 8):
        steps = 2 * (g - 1)                                       # ring all-reduce: t = steps/G * bytes/bw + steps * latency
        pts = [AllReducePoint(n, steps / g * n / bw + steps * latency, g, "nccl") for n in (4, 4096, 1 << 20, 1 << 40)]
        fit = fit_allreduce(list(reversed(pts)))                  # order does not matter
        assert fit.n_ranks == g
        assert fit.latency_s == pytest.approx(latency, rel=1e-4) and fit.bus_bandwidth == pytest.approx(bw, rel=1e-4)
        for p in pts:                                             # the model reproduces the points it came from
            assert fit.bus_bandwidth_at(p.n_bytes) == pytest.approx(p.bus_bandwidth, rel=1e-3)
    slow = fit_allreduce([AllReducePoint(1 << 20, 0.5, 4, "gloo")])  # one point: all of its time is latency
    assert slow.latency_s == pytest.approx(0.5 / 6) and slow.bus_bandwidth == pytest.approx((1 << 20) / 0.5 * 1.5)
    with pytest.raises(ValueError, match="measure"):
        fit_allreduce([])
    with pytest.raises(ValueError, match="2 ranks"):
        fit_allreduce([AllReducePoint(1024, 1e-3, 1, "gloo")])


def test_cpu_measurements_compared_with_the_generic_cpu_node():
    from labkit.hardware import gpu

    r = bench_device(MeasureConfig(matmul_n=32, copy_bytes=1 << 16, host_device_bytes=4096, warmup=0, repeats=1))
    node = gpu("CPU-node")
    ref = compare_with_catalog(r)
    assert ref.reference == "CPU-node" and ref.generic and "not this machine's datasheet" in ref.label
    assert ref.memory_bw == node.memory_bw and ref.memory == pytest.approx(r.copy.bytes_per_s / 614e9)
    assert set(ref.flops) == {m.dtype for m in r.matmul} == {"fp64", "fp32", "bf16"}
    assert ref.flops["fp32"] == pytest.approx(r.flops("fp32") / node.peak_flops("fp32"))
    assert ref.flops["bf16"] == pytest.approx(r.flops("bf16") / 32.8e12)
    # a GPU keeps its own datasheet, as peaks_for does; a GPU missing from the catalog gets no comparison
    gpu_like = dataclasses.replace(r, device="cuda:0", device_name="NVIDIA H100 80GB HBM3",
                                   device_memory_bytes=80 * 2**30)
    ref = compare_with_catalog(gpu_like)
    assert ref.reference == "H100-SXM5-80GB" and not ref.generic and ref.label == "H100-SXM5-80GB datasheet"
    assert ref.memory == pytest.approx(r.copy.bytes_per_s / 3350e9) and ref.peak_flops["bf16"] == 989.4e12
    assert peaks_for(gpu_like)[1] == ref.memory_bw
    assert compare_with_catalog(dataclasses.replace(gpu_like, device_name="Quadro P1000")) is None


def test_cuda_path_as_far_as_it_goes(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a real GPU is present: the real path runs in test_measure_cluster_on_two_workers")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        host_device_bandwidth("cpu", 1024)
    assert pick_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a V100
    assert pick_device() == "cuda:0"
    assert supported_dtypes("cuda:0") == ("fp64", "fp32", "tf32", "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert "bf16" in supported_dtypes("cuda:0") and "tf32" not in supported_dtypes("cpu")


def test_allreduce_rank_in_a_one_rank_world(tmp_path):
    import torch.distributed as dist

    class Ctx:
        rank, world_size, backend, device = 0, 1, "gloo", "cpu"

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        pts = allreduce_rank(Ctx(), [4, 4096], warmup=0, repeats=2)
    finally:
        dist.destroy_process_group()
    assert [p.n_bytes for p in pts] == [4, 4096] and all(isinstance(p, AllReducePoint) for p in pts)
    assert all(p.bus_bandwidth == 0 for p in pts)        # G = 1 moves nothing over a link


def test_cpu_peak_from_flags():
    p = cpu_peak_flops(cores=4, ghz=2.0, flags={"avx2", "fma"})
    assert p["fp32"] == 4 * 2e9 * 32 and p["fp64"] == p["fp32"] / 2 and p["bf16"] == p["fp32"]
    q = cpu_peak_flops(cores=4, ghz=2.0, flags={"avx512f", "avx512_bf16"})
    assert q["fp32"] == 2 * p["fp32"] and q["bf16"] == 2 * q["fp32"]


def test_measure_config_presets_and_overrides(tmp_path, monkeypatch):
    tiny = MeasureConfig.for_scale("tiny")
    assert max(tiny.allreduce_sizes) < 256 * 2**20 == max(MeasureConfig.for_scale("workshop").allreduce_sizes)
    assert min(MeasureConfig.for_scale("full").allreduce_sizes) == 1024
    user = tmp_path / "user.yaml"
    user.write_text("scales:\n  tiny:\n    hardware:\n      matmul_n: 64\n      allreduce_sizes: [1024]\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    cfg = MeasureConfig.for_scale("tiny")
    assert cfg.matmul_n == 64 and cfg.allreduce_sizes == (1024,)
    user.write_text("scales:\n  tiny:\n    hardware:\n      matmul_size: 64\n")
    with pytest.raises(ValueError, match="matmul_size.*valid keys: .*matmul_n"):
        MeasureConfig.for_scale("tiny")
    with pytest.raises(ValueError, match="repeats must be positive"):
        MeasureConfig(repeats=0)


def test_probe_inside_a_slurm_job(slurm):
    """A real Slurm job with one GPU as GRES: the probe sees the job, its partition and its GPU id."""
    code = "from labkit.hardware.inspect import probe; import json, dataclasses; print(json.dumps(dataclasses.asdict(probe())))"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        ["srun", "-J", "labkit-hw-test", "-p", "gpu", "--gres=gpu:1", "-n", "1", "-t", "2", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["slurm_job_id"] and info["slurm_job_id"].isdigit()
    assert info["slurm_partition"] == "gpu"
    assert info["cuda_visible_devices"] not in (None, "")


def test_inspect_and_measure_dask_workers_in_slurm_jobs(slurm, tmp_path):
    """Two Dask workers as two real Slurm jobs with one GRES GPU each (dask-jobqueue): each reports its own
    job id, the partition and its own CUDA_VISIBLE_DEVICES; the all-reduce runs between the jobs."""
    import getpass

    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(
        queue="gpu", cores=1, processes=1, memory="1GiB", walltime="00:05:00", job_name="labkit-hw-test",
        job_extra_directives=["--gres=gpu:1"], job_script_prologue=[f"export PYTHONPATH={REPO}"],
        python=sys.executable, scheduler_options={"dashboard_address": ":0"}, log_directory=str(tmp_path),
    )
    try:
        cluster.scale(2)
        with Client(cluster) as client:
            try:
                client.wait_for_workers(2, timeout=180)
            except TimeoutError:
                queue = subprocess.run(["squeue", "-h", "-n", "labkit-hw-test", "-u", getpass.getuser(), "-o", "%T %R"],
                                       capture_output=True, text=True).stdout
                if "PENDING" in queue:
                    skip_unless_ci(f"the shared Slurm node is busy, jobs still pending: {queue.strip()}")
                raise
            rows = inspect_cluster(client)
            assert len(rows) == 2 and len({r.slurm_job_id for r in rows}) == 2
            assert all(r.slurm_partition == "gpu" and r.slurm_job_id.isdigit() for r in rows)
            visible = [r.cuda_visible_devices for r in rows]
            assert None not in visible and len(set(visible)) == 2, visible      # each job its own GPU
            m = measure_cluster(client, SMALL)
            assert len(m.devices) == 2 and [p.n_bytes for p in m.allreduce] == list(SMALL.allreduce_sizes)
            assert {p.backend for p in m.allreduce} == {"gloo"}   # fake GRES: no usable CUDA, so gloo
    finally:
        cluster.close()


def test_bench_smoke(capsys):
    """`python -m bench.hardware` at tiny scale: ratios against the peaks, and the all-reduce line."""
    from bench.hardware import main

    assert main(["--scale", "tiny", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("measured/peak") >= 2 * 2 and "fp32" in out
    assert out.count("memory measured/catalog") == 2 and "generic reference node" in out   # CPU vs CPU-node
    assert "all-reduce (gloo, 2 ranks)" in out and "x device-copy bandwidth" in out
