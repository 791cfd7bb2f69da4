"""Estimators: exact where exactness is possible (parameter count, KV cache vs real models), and
validated against published figures with stated tolerances."""

import math

import pytest

from labkit.hardware.estimate import (
    EstimateError,
    GPTConfig,
    activation_bytes,
    allreduce_time,
    compute_optimal,
    count_params,
    energy,
    estimate_training,
    gradient_sync,
    inference_memory,
    pipeline_bubble,
    plan_run,
    storage,
    training_flops,
    training_memory,
)


# ------------------------------------------------------------------ exact checks against real models

def test_param_count_matches_a_real_gpt2_from_transformers():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=32)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=32))
    real = sum(p.numel() for p in hf.parameters())      # tied head counted once
    assert count_params(cfg).total == real


def test_gpt2_small_is_124m():
    # GPT-2 small: 124,439,808 parameters with its 50,257-token vocabulary (nanoGPT reports 123.65M
    # after subtracting the 786,432 position embeddings)
    pc = count_params(GPTConfig.preset("gpt2"))
    assert pc.total == 124_439_808
    assert pc.total - 1024 * 768 == pytest.approx(123.65e6, rel=1e-3)


def test_kv_cache_formula_matches_a_real_cache():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=100, block_size=64)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=100, n_positions=64)).eval()
    hf = hf.to(torch.bfloat16)
    with torch.no_grad():
        out = hf(torch.randint(0, 100, (2, 17)), use_cache=True)
    cache = out.past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(cache)
    real = sum(t.numel() * t.element_size() for kv in layers for t in kv)
    est = inference_memory(cfg, batch=2, seq_len=17, kv_bytes=2)
    assert est.kv_cache_bytes == real
    assert est.weights_bytes == 2 * count_params(cfg).total


# ------------------------------------------------------------------ published figures

def test_gpt3_175b_training_compute():
    # Brown et al. 2020, "Language Models are Few-Shot Learners", Table D.1: GPT-3 175B used
    # 3.14e23 FLOPs (3.64e3 PF-days) for 300B tokens. 6ND must be within 2%; the attention term
    # (which the paper leaves out) adds a few percent, so that total is within +5%.
    assert training_flops(175e9, 300e9).flops == pytest.approx(3.14e23, rel=0.02)
    with_attention = training_flops(175e9, 300e9, GPTConfig.preset("gpt3-175b")).flops
    assert 3.14e23 < with_attention < 3.14e23 * 1.05


def test_chinchilla_compute():
    # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Table 3: Chinchilla
    # (70B parameters, 1.4T tokens) has Gopher's budget, 5.76e23 FLOPs. Tolerance 3%.
    assert training_flops(70e9, 1.4e12).flops == pytest.approx(5.76e23, rel=0.03)



def test_chinchilla_rule_of_20_tokens_per_parameter():
    # Hoffmann et al. 2022: compute-optimal D is about 20 N; Chinchilla itself is 70B on 1.4T tokens, and
    # Gopher's budget (5.76e23 FLOPs) gives back about that size through C = 6 N D
    assert compute_optimal(n_params=70e9).n_tokens == pytest.approx(1.4e12)
    best = compute_optimal(flops=5.76e23)
    assert best.n_params == pytest.approx(70e9, rel=0.02) and best.n_tokens == pytest.approx(1.4e12, rel=0.02)
    assert best.flops == pytest.approx(5.76e23) and best.tokens_per_param == 20
    assert compute_optimal(flops=5.76e23, tokens_per_param=80).n_params == pytest.approx(best.n_params / 2)
    for bad in ({}, {"n_params": 1e9, "flops": 1e20}, {"n_params": -1.0}):
        with pytest.raises(EstimateError):
            compute_optimal(**bad)

@pytest.mark.parametrize("n_params,gpu_hours", [(7e9, 184_320), (13e9, 368_640), (70e9, 1_720_320)])
def test_llama2_gpu_hours(n_params, gpu_hours):
    # Llama 2 model card (Meta, 2023), "CO2 emissions during pretraining": 184,320 / 368,640 /
    # 1,720,320 A100-80GB GPU-hours for 7B / 13B / 70B on 2.0T tokens. At MFU 40% of the dense
    # bf16 peak the estimate is within 15%.
    est = estimate_training(n_params, 2.0e12, "A100-80GB", n_gpus=2048, mfu=0.40)
    assert est.gpu_hours == pytest.approx(gpu_hours, rel=0.15)


def test_llama3_405b_compute_and_gpu_hours():
    # Llama 3 paper (Llama Team, "The Llama 3 Herd of Models", 2024): 405B trained on 15.6T tokens
    # with 3.8e25 FLOPs (within 3%), MFU 38-43% on 16K H100s (Table 4). The Llama 3.1 model card gives
    # 30.84M H100-80GB GPU-hours; at MFU 38% the estimate is within 15% (the card also counts restarts).
    est = estimate_training(405e9, 15.6e12, "H100-SXM", n_gpus=16384, mfu=0.38)
    assert est.flops == pytest.approx(3.8e25, rel=0.03)
    assert est.gpu_hours == pytest.approx(30.84e6, rel=0.15)
    assert est.days == pytest.approx(est.gpu_hours / 16384 / 24)


def test_zero_paper_memory_figure():
    # Rajbhandari et al. 2020, "ZeRO", Figure 1: a 7.5B model, mixed-precision Adam (K = 12, i.e.
    # 16 bytes/param), 64 data-parallel ranks: 120 GB baseline, 31.4 GB (P_os), 16.6 GB (P_os+g),
    # 1.9 GB (P_os+g+p) per GPU. Tolerance: the paper's rounding to 0.1 GB.
    expected = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected.items():
        mem = training_memory(7.5e9, zero_stage=stage, dp=64)
        assert mem.model_states_bytes / 1e9 == pytest.approx(gb, abs=0.05), stage
    assert training_memory(1.0, zero_stage=0).total_bytes == 16


def test_bloom_energy():
    # Luccioni, Viguier, Ligozat 2022, "Estimating the Carbon Footprint of BLOOM": the final training
    # took 1,082,990 A100-80GB GPU-hours and 433,196 kWh (GPU-hours x 400 W TDP). With PUE 1.0 the
    # estimator reproduces it within 0.1%; with Jean Zay's PUE of 1.2 it is 20% more.
    e = energy(1_082_990, "A100-80GB", pue=1.0)
    assert e.kwh == pytest.approx(433_196, rel=1e-3)
    assert energy(1_082_990, "A100-80GB", pue=1.2).kwh == pytest.approx(1.2 * e.kwh)
    # 384 GPUs from 11 March to 5 July 2022 (BLOOM model card): ~116 days
    assert 1_082_990 / 384 / 24 == pytest.approx(116, rel=0.02)


def test_bloom_checkpoint_size():
    # BLOOM model card (BigScience, 2022), "Checkpoint size": bf16 weights 329 GB, full checkpoint with
    # optimizer states 2.3 TB, for 176,247,271,424 parameters. Tolerance 10% (the card rounds, and does
    # not say whether it means GB or GiB).
    n = 176_247_271_424
    assert storage(1e9, n, with_optimizer=False).checkpoint_bytes == pytest.approx(329e9, rel=0.10)
    assert storage(1e9, n).checkpoint_bytes == pytest.approx(2.3e12, rel=0.10)


# ------------------------------------------------------------------ behaviour

def test_bad_configs_give_clear_errors():
    with pytest.raises(EstimateError, match=r"not divisible by n_head=7.*Valid n_head.*12"):
        GPTConfig(n_layer=2, n_head=7, n_embd=768)
    with pytest.raises(EstimateError, match="n_layer must be a positive integer"):
        GPTConfig(n_layer=-1, n_head=2, n_embd=8)
    with pytest.raises(EstimateError, match="n_tokens must be a positive"):
        training_flops(1e9, -5)
    with pytest.raises(EstimateError, match=r"zero_stage must be one of \(0, 1, 2, 3\)"):
        training_memory(1e9, zero_stage=4)
    with pytest.raises(EstimateError, match="mfu"):
        estimate_training(1e9, 1e9, "A100", 8, mfu=1.5)
    with pytest.raises(KeyError, match="valid names"):
        estimate_training(1e9, 1e9, "TPUv4", 8)
    with pytest.raises(EstimateError, match="n_gpus must be a whole number, got 2.5"):
        estimate_training(1e9, 1e9, "A100", 2.5)
    with pytest.raises(EstimateError, match="valid presets: gpt2"):
        GPTConfig.preset("gpt5")
    with pytest.raises(EstimateError, match=r"n_kv_head=5 must .* divide n_head=12.*Valid n_kv_head for this n_head: "
                                            r"1, 2, 3, 4, 6, 12$"):
        GPTConfig(n_layer=2, n_head=12, n_embd=768, n_kv_head=5)
    with pytest.raises(EstimateError, match=r"Valid n_kv_head for this n_head: 1, 7$"):
        GPTConfig(n_layer=2, n_head=7, n_embd=70, n_kv_head=0)
    assert GPTConfig(n_layer=2, n_head=12, n_embd=768, n_kv_head=4).n_kv_head == 4


def test_zero_stages_shard_more_and_checkpointing_saves_activations():
    cfg = GPTConfig.preset("gpt2-xl")
    n = count_params(cfg).total
    totals = [training_memory(n, cfg, zero_stage=s, dp=8, micro_batch=4).total_bytes for s in range(4)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[3]
    # with dp=1 sharding changes nothing
    assert len({training_memory(n, zero_stage=s, dp=1).total_bytes for s in range(4)}) == 1
    full = activation_bytes(cfg, micro_batch=4)
    ckpt = activation_bytes(cfg, micro_batch=4, checkpointing=True)
    flash = activation_bytes(cfg, micro_batch=4, flash_attention=True)
    assert ckpt < flash < full
    # activations grow linearly with batch, and with the a*s^2 term faster than linearly with sequence
    assert activation_bytes(cfg, micro_batch=8) == pytest.approx(2 * full)
    assert activation_bytes(cfg, micro_batch=4, seq_len=2048) > 2 * full


def test_fits_against_gpu_memory():
    cfg = GPTConfig.preset("gpt3-6.7b")
    n = count_params(cfg).total
    assert training_memory(n, cfg, zero_stage=0, dp=8, gpu="A100-40GB").fits is False   # 16 x 6.7B = 107 GB
    assert training_memory(n, cfg, zero_stage=3, dp=64, checkpointing=True, flash_attention=True,
                           gpu="A100-80GB").fits is True
    assert training_memory(n).fits is None


def test_ring_allreduce_formula_and_bus_bandwidth():
    ar = allreduce_time(1e9, 8, bandwidth=100e9, latency_s=1e-5)
    assert ar.seconds == pytest.approx(2 * 7 / 8 * 1e9 / 100e9 + 14 * 1e-5)
    # without latency the bus bandwidth equals the link bandwidth, whatever G is
    for g in (2, 8, 64):
        assert allreduce_time(1e9, g, bandwidth=50e9).bus_bandwidth == pytest.approx(50e9)
    assert allreduce_time(1e9, 1, bandwidth=1e9).seconds == 0
    # small messages are latency bound
    small = allreduce_time(1e3, 64, bandwidth=50e9, latency_s=2e-6)
    assert small.seconds > 2 * 63 * 2e-6 * 0.99 and small.bus_bandwidth < 1e9


def test_gradient_sync_hides_with_big_batches_and_fast_links():
    small_batch = gradient_sync(1.3e9, "A100-80GB", 64, tokens_per_gpu_step=1024, network="IB-HDR-200")
    big_batch = gradient_sync(1.3e9, "A100-80GB", 64, tokens_per_gpu_step=64 * 1024, network="IB-HDR-200")
    assert not small_batch.hidden and small_batch.exposed_s > 0
    assert big_batch.hidden and big_batch.exposed_s == 0
    slow = gradient_sync(1.3e9, "A100-80GB", 64, tokens_per_gpu_step=8192, network="Ethernet-25GbE-TCP")
    fast = gradient_sync(1.3e9, "A100-80GB", 64, tokens_per_gpu_step=8192, network="IB-NDR-400")
    assert slow.seconds > 10 * fast.seconds
    inside = gradient_sync(1.3e9, "A100-80GB", 8, tokens_per_gpu_step=8192, network="Ethernet-25GbE-TCP")
    assert inside.link.startswith("NVLink") and inside.seconds < fast.seconds


def test_storage_and_plan():
    s = storage(1e9, 1e8, vocab_size=50304, keep_checkpoints=2)
    assert s.token_bytes == 2e9 and s.checkpoint_bytes == 14 * 1e8
    assert storage(1e9, 1e8, vocab_size=128_256).token_bytes == 4e9      # needs uint32
    assert s.total_bytes == s.raw_text_bytes + s.token_bytes + 2 * s.checkpoint_bytes
    p = plan_run(GPTConfig.preset("gpt3-175b"), 300e9, "A100-80GB", 8)
    assert p.memory.fits is False and any("does not fit" in n for n in p.notes)
    assert "memory: optimizer" in p.dominant
    ok = plan_run(GPTConfig.preset("gpt2"), 1e10, "H100-SXM", 8, micro_batch=8)
    assert ok.memory.fits and not ok.notes and math.isclose(ok.time.flops, ok.time.gpu_hours * 3600 / 8 * 8 * 989.4e12 * 0.4, rel_tol=1e-9)
    assert ok.energy.kwh == pytest.approx(ok.time.gpu_hours * 0.7 * 1.2)


def test_float32_sizes_split_the_same_16_bytes_and_double_the_activations():
    from labkit.hardware.estimate import activation_bytes, training_memory
    from labkit.model import GPTConfig

    cfg = GPTConfig(vocab_size=1000, n_layer=2, n_head=2, n_embd=64, block_size=32)
    mixed = training_memory(10_000, cfg, micro_batch=2)
    fp32 = training_memory(10_000, cfg, micro_batch=2, weight_bytes=4, grad_bytes=4, optimizer_bytes_per_param=8,
                           activation_value_bytes=4)
    assert fp32.model_states_bytes == mixed.model_states_bytes == 16 * 10_000
    assert (fp32.weights_bytes, fp32.grads_bytes, fp32.optimizer_bytes) == (40_000, 40_000, 80_000)
    logits = 4.0 * 32 * 2 * 1000  # float32 in both
    assert fp32.activations_bytes - logits == pytest.approx(2 * (mixed.activations_bytes - logits))
    assert activation_bytes(cfg, micro_batch=2, value_bytes=4) == fp32.activations_bytes


def test_pipeline_bubble():
    # Narayanan et al. 2021 (Megatron-LM, Sec. 2.2): the bubble is (p-1)/m of the ideal time, i.e. (p-1)/(m+p-1) of the total
    assert pipeline_bubble(1, 1) == 0 and pipeline_bubble(3, 4) == pytest.approx(2 / 6)
    assert pipeline_bubble(8, 1) == pytest.approx(7 / 8) and pipeline_bubble(8, 64) < 0.1
    with pytest.raises(EstimateError):
        pipeline_bubble(0, 4)


def test_an_oom_predicted_then_seen():
    """Each step runs in a fresh process, as the notebook runs it on a fresh worker: a long-lived process
    (this test session) keeps freed heap mapped, and a cap on new mappings would not bite there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from labkit.hardware.oom import adamw_step_under_cap

    need_mib = 16 * 4e6 / 2**20  # training_memory's 16 bytes/param
    for cap, fits in ((need_mib / 4, False), (2 * need_mib, True)):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            step = pool.submit(adamw_step_under_cap, 4e6, cap).result(timeout=120)
        assert step.ok is fits, step
        assert ("the step ran" in str(step)) is fits
