"""bench.gpu, the one script for a GPU session, kept runnable: its whole path at toy size on the CPU
(gloo where a GPU would take nccl), and a clear refusal where CUDA is asked for and absent."""

import json
import math

import torch

from bench import gpu


def test_dry_run_on_cpu_goes_through_every_part(tmp_path, capsys):
    torch.set_num_threads(1)
    assert gpu.main(["--device", "cpu", "--output", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("\n{") + 1:])
    att = report["attention"]
    assert att["formula_float32_max_abs_diff"] < 1e-5 and att["online_float32_max_abs_diff"] < 1e-5
    assert att["formula_bfloat16_max_abs_diff"] < 0.1 and att["online_bfloat16_time_vs_sdpa"] > 0
    m = report["matmul"]
    assert m["fp32_tflops"] > 0 and m["bf16_vs_fp32"] > 0 and m["copy_gb_s"] > 0 and "tf32_tflops" not in m
    t = report["training"]
    assert t["auto_means"] == ("bfloat16" if report["device"]["bf16_is_fast"] else "float32")
    assert math.isfinite(t["fp32_final_loss"]) and abs(t["auto_final_loss"] - t["fp32_final_loss"]) < 0.1
    rank = report["distributed"]["rank"]
    assert rank["backend"] == rank["process_group_backend"] == "gloo" and rank["device"] == "cpu"
    assert rank["all_reduce_sum"] == 1.0  # a world of one: the sum is its own value
    trace = report["distributed"]["trace"]
    assert trace.startswith(str(tmp_path)) and json.loads(open(trace).read())["traceEvents"]
    assert {"forward_ms", "backward_ms", "optimizer_ms"} <= set(report["distributed"]["breakdown"][0])
    assert "run_ranks chose gloo" in text and "precision='auto' takes bf16 here" in text


def test_without_a_gpu_it_measures_nothing_and_says_where_to_run(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    assert "torch sees no GPU here" in capsys.readouterr().out
