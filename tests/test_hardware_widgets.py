"""Hardware views: tables in text and HTML, charts against the catalog, the live estimator panel."""

import pytest

from labkit.hardware.inspect import probe
from labkit.hardware.measure import (AllReducePoint, BandwidthResult, ClusterMeasurement, DeviceBench, MatmulResult,
                                    MeasureConfig, fit_allreduce)
from labkit.widgets.hardware import (
    EstimatorPanel,
    busbw_figure,
    catalog_table,
    comparison_table,
    hardware_table,
    measurement_table,
    roofline_figure,
)


def _bench(worker="tcp://w1"):
    return DeviceBench(worker, "vm", "cpu", "AMD EPYC", 1,
                       (MatmulResult("fp32", 256, 2 * 256**3 / 50e9), MatmulResult("bf16", 256, 2 * 256**3 / 20e9)),
                       BandwidthResult("device copy", 1 << 24, (1 << 25) / 10e9, moved_factor=2))


def test_tables_text_and_html(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    t = hardware_table([probe()])
    text, page = str(t), t._repr_html_()
    assert "Slurm job" in text and "77" in text and "<table>" in page and "77" in page
    assert "H100-SXM5-80GB" in str(catalog_table()) and "989.4" in str(catalog_table(["H100-SXM"]))
    m = ClusterMeasurement([_bench()], [], MeasureConfig(), 1.0)
    mt = str(measurement_table(m, peaks={"fp32": 100e9}))
    assert "50.0 (50%)" in mt and "20.0" in mt and "10.0" in mt


def test_comparison_table_uses_the_catalog_on_cpu_and_gpu():
    import dataclasses

    cpu = _bench()
    gpu_like = dataclasses.replace(_bench("tcp://w2"), device="cuda:0", device_name="NVIDIA A100-SXM4-80GB",
                                   device_memory_bytes=80 * 2**30)
    unknown = dataclasses.replace(gpu_like, worker="tcp://w3", device_name="Quadro P1000")
    t = comparison_table(ClusterMeasurement([cpu, gpu_like, unknown], [], MeasureConfig(), 1.0))
    text = str(t)
    assert "generic dual-socket reference node, not this machine's datasheet" in t.title
    rows = {(r[0], r[2]): r for r in t.rows}
    # CPU: 10 GB/s copy against the CPU-node's 614 GB/s, 50 GFLOP/s fp32 against its 16.4 TFLOP/s
    assert rows["tcp://w1", "memory copy"][1:] == ["CPU-node (generic)", "memory copy", "10.0 GB/s", "614 GB/s", "1.63%"]
    assert rows["tcp://w1", "fp32 matmul"][3:] == ["50.0 GFLOP/s", "16400 GFLOP/s", "0.305%"]
    assert rows["tcp://w2", "memory copy"][1] == "A100-SXM4-80GB" and rows["tcp://w2", "memory copy"][-1] == "0.49%"
    assert ("tcp://w2", "bf16 matmul") in rows and "Quadro P1000: not in the catalog" in text
    gpu_only = comparison_table(ClusterMeasurement([gpu_like], [], MeasureConfig(), 1.0))
    assert "generic" not in str(gpu_only)


def test_roofline_and_busbw_charts():
    fig = roofline_figure([_bench()], gpus=("A100-80GB", "H100-SXM"), local_peaks={"fp32": 2e11})
    names = [t.name for t in fig.data]
    assert names[0].startswith("A100-SXM4-80GB") and any("measured" in n for n in names) and len(names) == 5
    a100 = fig.data[0]
    assert max(a100.y) == pytest.approx(312e12) and a100.y[0] == pytest.approx(a100.x[0] * 2039e9)
    pts = [AllReducePoint(1024 * 4**i, 1e-4 + 1024 * 4**i / 1e9, 2, "gloo") for i in range(6)]
    fig = busbw_figure(pts, nets=("IB-NDR-400",), nvlink_of="H100-SXM")
    assert fig.data[0].y[-1] > fig.data[0].y[0]                 # bandwidth grows with message size
    assert len(fig.layout.shapes) == 2                           # NDR and NVLink reference lines
    assert "model" in fig.data[1].name
    fit = fit_allreduce(pts)                                     # the drawn curve is the capability's fit
    assert list(fig.data[1].y) == pytest.approx([fit.bus_bandwidth_at(p.n_bytes) for p in pts])
    assert f"{fit.latency_s * 1e6:.0f} µs/step" in fig.data[1].name
    bundle = fig._repr_mimebundle_()
    spec = bundle["application/vnd.plotly.v1+json"]
    assert not hasattr(fig, "_ipython_display_") and not hasattr(fig, "_repr_html_")
    assert len(spec["data"]) == 2 and spec["layout"]["xaxis"]["type"] == "log" and "traces" in bundle["text/plain"]


def test_estimator_panel_text_mode_follows_set():
    p = EstimatorPanel(mode="text")
    assert p.widget is None and p.plan.memory.fits
    plan = p.set(model="gpt3-175b", n_gpus=8, zero_stage=0)
    assert plan.memory.fits is False and "does NOT fit" in str(p)
    plan = p.set(n_gpus=1024, zero_stage=3, checkpointing=True, micro_batch=1)
    assert plan.memory.fits and plan.time.n_gpus == 1024
    with pytest.raises(TypeError, match="valid: model"):
        p.set(gpus=8)


@pytest.mark.parametrize("figure_widget", [False, True])
def test_estimator_panel_widgets_update_live(figure_widget):
    p = EstimatorPanel(mode="widget", figure_widget=figure_widget)
    before = p.plan.time.days
    p._controls["n_gpus"].value = 64            # as if the learner picked 64 GPUs
    assert p.plan.time.n_gpus == 64 and p.plan.time.days == pytest.approx(before * 8 / 64)
    assert "64 x" in p._summary.value
    p.set(gpu="H100-SXM")
    assert p._controls["gpu"].value == "H100-SXM5-80GB" and p.plan.time.gpu == "H100-SXM5-80GB"
    # weights, gradients, optimizer, activations | compute, hidden and exposed all-reduce
    assert [t.name for t in p._fig.data][-3:] == ["compute (fwd+bwd)", "all-reduce, hidden", "all-reduce, exposed"]
    assert len(p._fig.data) == 7
    assert len(p._fig.layout.shapes) == 1       # the GPU's memory line, not one per update
    step = p._fig.data[4].y[0] + p._fig.data[5].y[0]
    assert step == pytest.approx((p.plan.step_compute_s + p.plan.sync.seconds - p.plan.sync.exposed_s) * 1e3)


def test_cli_catalog_and_plan(capsys):
    from labkit.lab.cli import main

    assert main(["hardware", "catalog"]) == 0
    out = capsys.readouterr().out
    assert "H100-SXM5-80GB" in out and "source: NVIDIA H100 Tensor Core GPU Datasheet" in out and "IB-NDR-400" in out
    assert main(["hardware", "plan", "--model", "gpt2", "--tokens", "1e9", "--gpu", "h100 sxm", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "H100-SXM5-80GB" in out and "GPU-hours" in out
    assert main(["hardware", "plan", "--model", "gpt3-175b", "--gpus", "8", "--zero", "0"]) == 1   # does not fit
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["hardware", "plan", "--gpu", "B200"]) == 2
    assert "valid names" in capsys.readouterr().out
