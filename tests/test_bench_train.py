"""A toy-size smoke run of bench.train (a): it runs end to end and reports sane numbers (no timing goals here)."""

import torch

from bench import train as bench


def test_bench_part_a_smoke(tmp_path):
    from labkit.data.shards import make_tiny_shards

    torch.set_num_threads(1)
    make_tiny_shards(tmp_path / "shards")
    out = bench.part_a(tmp_path / "shards", rounds=1, steps_per_round=1, loss_steps=3)
    assert out["plain_tokens_per_s"] > 0 and out["labkit_tokens_per_s"] > 0
    assert 0 < out["mfu_labkit"] < 1 and 0 < out["mfu_plain_fp32"] < 1 and 0 < out["mfu_labkit_fp32"] < 1
    assert out["labkit_fp32_tokens_per_s"] > 0 and out["speedup_fp32"] > 0
    # as training runs: each trainer in its own process, labkit's set up by prepare_process
    assert out["own_plain_tokens_per_s"] > 0 and out["own_labkit_fp32_tokens_per_s"] > 0 and out["own_speedup_fp32"] > 0
    assert out["faults_per_step_plain"] >= 0 and out["faults_per_step_labkit"] >= 0
    # the CPU decides the fast precision: the report names the flags that decide it, as this CPU has them
    from labkit.model import cpu_flags

    for flag in ("avx2", "avx512_bf16", "amx_bf16"):
        assert (flag in out["cpu"].split("flags:")[1].split()) == (flag in cpu_flags()), (flag, out["cpu"])
    # and so does a measurement: bf16 only where it measured fast enough, as precision="auto" decides
    from labkit.model import CPU_BF16_FLAGS, CPU_BF16_MIN_SPEEDUP

    assert out["bf16_matmul_speedup"] > 0
    assert (out["dtype"] == "bfloat16") == (bool(CPU_BF16_FLAGS & cpu_flags())
                                            and out["bf16_matmul_speedup"] >= CPU_BF16_MIN_SPEEDUP)
    assert out["loss_rel_diff"] < 0.05  # 3 steps in: the two precisions are still close


def test_plain_gpt_has_the_same_shape_as_labkits():
    from labkit.model import GPT, GPTConfig

    plain = bench.PlainGPT(512, **bench.SHAPE)
    lab = GPT(GPTConfig(vocab_size=512, **bench.SHAPE))
    assert sum(p.numel() for p in plain.parameters()) == lab.num_params(non_embedding=False)


def test_bench_part_c_smoke(tmp_path):
    from labkit.data.shards import make_tiny_shards

    torch.set_num_threads(1)
    make_tiny_shards(tmp_path / "shards")
    out = bench.part_c(tmp_path / "shards", rounds=1, steps_per_round=2)
    assert out["bare_tokens_per_s"] > 0 and out["loop_log1_tokens_per_s"] > 0 and out["loop_log10_tokens_per_s"] > 0
    assert out["ratio_log1"] > 0 and out["ratio_log10"] > 0


def test_torchrun_entry_rebuilds_the_config_from_json():
    import json

    from labkit.train import TrainConfig

    config = bench._first_step_config()
    assert TrainConfig(**json.loads(json.dumps(config.to_dict()))) == config  # what part (b) hands torchrun
