"""labkit.model: the GPT's shape, causality, precision choice, sampling and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from labkit import checkpoint as C
from labkit import model as M
from labkit.model import GPT, GPTConfig, KVCache

torch.set_num_threads(1)


def tiny(**kw) -> GPTConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, precision="float32")
    base.update(kw)
    return GPTConfig(**base)


def test_module_names_and_weight_tying():
    m = GPT(tiny())
    blk = m.transformer.h[1]
    assert blk.attn.c_attn.weight.shape == (3 * 2 * 16, 32)
    assert blk.attn.c_proj.weight.shape == (32, 32)
    assert (blk.attn.n_head, blk.attn.head_dim) == (2, 16)
    assert blk.mlp.c_fc.weight.shape == (128, 32) and blk.mlp.c_proj.weight.shape == (32, 128)
    assert m.lm_head.weight is m.transformer.wte.weight
    names = {n for n, _ in m.named_modules()}
    assert {"transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head", "transformer.h.0.ln_1",
            "transformer.h.0.ln_2"} <= names
    # tied weight counted once; non-embedding count leaves out wpe only
    total = sum(p.numel() for p in m.parameters())
    assert m.num_params(non_embedding=False) == total
    assert m.num_params() == total - 16 * 32


def test_forward_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    m = GPT(tiny())
    x = torch.randint(0, 50, (4, 16))
    logits, loss = m(x, torch.randint(0, 50, (4, 16)))
    assert logits.shape == (4, 16, 50) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(50)) < 0.3
    logits2, none = m(x)
    assert none is None and torch.equal(logits, logits2)


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    a, _ = m(x)
    b, _ = m(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_input_and_bad_config_say_what_to_do():
    m = GPT(tiny())
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="valid: auto"):
        GPTConfig(precision="fp8")
    with pytest.raises(ValueError, match="one per layer"):
        GPTConfig(n_layer=2, layer_heads=(1,))


def test_pruned_shapes_are_a_gpt_that_runs_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(head_dim=8, layer_heads=(3, 0), layer_ffn=(10, 64))
    m = GPT(cfg)
    assert m.transformer.h[0].attn.c_attn.weight.shape == (3 * 3 * 8, 32)
    assert m.transformer.h[0].attn.c_proj.weight.shape == (32, 24)
    assert m.transformer.h[1].attn.n_head == 0
    assert m.transformer.h[0].mlp.c_fc.weight.shape == (10, 32)
    x = torch.randint(0, 50, (2, 16))
    logits, loss = m(x, x)
    loss.backward()
    C.save(m, tmp_path / "p.pt")
    m2, extra = C.load(tmp_path / "p.pt")
    assert m2.config.layer_heads == (3, 0) and m2.config.layer_ffn == (10, 64)
    assert torch.equal(m2(x)[0], m(x)[0])
    out = m2.generate(x[:, :4], 5, temperature=0)
    assert out.shape == (2, 9)


def test_precision_auto_follows_the_cpu_flags_and_a_measured_bf16_speedup(monkeypatch):
    flags = M.cpu_flags()
    has_flag = bool(M.CPU_BF16_FLAGS & flags)
    measured = M.cpu_bf16_speedup()
    assert measured > 0 and M.cpu_bf16_speedup() == measured, "measured once per process, then cached"
    expected = has_flag and measured >= M.CPU_BF16_MIN_SPEEDUP
    assert M.bf16_is_fast("cpu") == expected
    assert M.autocast_dtype("auto", "cpu") == (torch.bfloat16 if expected else None)
    assert M.autocast_dtype("float32", "cpu") is None
    assert M.autocast_dtype("bfloat16", "cpu") == torch.bfloat16
    # without those flags, auto means float32, whatever a probe would say
    monkeypatch.setattr(M, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(M, "cpu_bf16_speedup", lambda: 5.0)
    assert M.autocast_dtype("auto", "cpu") is None
    # with them, the measurement decides: AMX-fast takes bf16; a CPU that reports AVX512-BF16 but runs
    # bf16 matmuls at half float32's speed (an Intel VM without AMX, measured 0.53x) keeps float32
    monkeypatch.setattr(M, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert M.autocast_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(M, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(M, "cpu_bf16_speedup", lambda: 0.53)
    assert M.autocast_dtype("auto", "cpu") is None
    monkeypatch.setattr(M, "cpu_bf16_speedup", lambda: M.CPU_BF16_MIN_SPEEDUP)
    assert M.autocast_dtype("auto", "cpu") == torch.bfloat16
    # the line notebook 06 prints: the claim, the measurement and the choice, as the rule above took it
    assert M.cpu_bf16_report() == "flags: avx512_bf16; bf16 matmuls run at 1.30x float32's here; " \
                                  "precision='auto' takes bf16: True"
    monkeypatch.setattr(M, "cpu_flags", lambda: frozenset({"avx2"}))
    assert M.cpu_bf16_report().startswith("flags: no bf16 flag;") and M.cpu_bf16_report().endswith("bf16: False")


def test_the_bf16_probe_tells_an_emulated_bf16_from_float32():
    """Without AVX512-BF16 or AMX, torch emulates bf16 matmuls (measured 0.05-0.08x of float32 on an
    AVX2-only EPYC): the probe must see that. Where the hardware has it, it must at least run."""
    import os
    import subprocess
    import sys

    code = "from labkit.model import cpu_bf16_speedup; print(cpu_bf16_speedup())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
               MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) < M.CPU_BF16_MIN_SPEEDUP


def test_bf16_on_cuda_needs_compute_capability_8_of_the_given_device(monkeypatch):
    # no GPU here: fake one GPU per index with its capability; pre-Ampere only emulates bf16
    caps = {0: (7, 0), 1: (8, 0), 2: (9, 0), 3: (7, 5)}
    current = [1]
    asked = []

    def capability(device=None):
        index = current[0] if device is None or torch.device(device).index is None else torch.device(device).index
        asked.append(index)
        return caps[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what emulation reports
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    assert M.bf16_is_fast("cuda:0") is False          # V100 (7.0)
    assert M.bf16_is_fast("cuda:3") is False          # T4 (7.5)
    assert M.bf16_is_fast("cuda:1") is True           # A100 (8.0)
    assert M.bf16_is_fast(torch.device("cuda", 2)) is True  # H100 (9.0)
    assert asked == [0, 3, 1, 2], "the capability of the device passed, not of the current one"
    current[0] = 0
    assert M.bf16_is_fast("cuda") is False            # no index: the current device
    assert M.autocast_dtype("auto", "cuda:0") is None
    assert M.autocast_dtype("auto", "cuda:2") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.bf16_is_fast("cuda:2") is False


def test_bf16_path_is_close_to_float32():
    torch.manual_seed(0)
    m = GPT(tiny())
    x = torch.randint(0, 50, (2, 16))
    _, l32 = m(x, x)
    m.config.precision = "bfloat16"
    logits, l16 = m(x, x)
    assert logits.dtype == torch.float32
    assert abs(l16.item() - l32.item()) / l32.item() < 0.02
    assert l16.item() != l32.item()  # it did run in bf16


def test_generate_is_reproducible_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    m = GPT(tiny())
    start = torch.zeros(1, 1, dtype=torch.long)
    a = m.generate(start, 20, generator=torch.Generator().manual_seed(3))
    b = m.generate(start, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 21)
    greedy = m.generate(start, 20, temperature=0)
    assert torch.equal(m.generate(start, 20, top_k=1, generator=torch.Generator().manual_seed(9)), greedy)
    assert m.training  # generate restores the mode


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def f(x): return x + 1", "import os\nprint(os.sep)"] * 5,
                            trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return tok


def test_checkpoint_round_trip_carries_config_tokenizer_and_extra(tmp_path):
    torch.manual_seed(0)
    m = GPT(tiny(dropout=0.1, bias=False))
    tok = _tokenizer()
    path = C.save(m, tmp_path / "sub" / "ck.pt", tokenizer=tok, step=7, note="hi")
    ck = C.load(path)
    model, extra = ck
    assert extra["step"] == 7 and extra["note"] == "hi"
    assert model.config == m.config
    assert ck.tokenizer().encode("import os").ids == tok.encode("import os").ids
    for (k, a), (_, b) in zip(m.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not list(tmp_path.joinpath("sub").glob("*.tmp"))


def test_corrupt_and_truncated_checkpoints_are_refused(tmp_path):
    m = GPT(tiny())
    path = C.save(m, tmp_path / "ck.pt")
    data = bytearray(path.read_bytes())
    (tmp_path / "trunc.pt").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.load(tmp_path / "trunc.pt")
    data[-100] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match="checksum"):
        C.load(tmp_path / "flip.pt")
    (tmp_path / "junk.pt").write_bytes(b"hello\n")
    with pytest.raises(C.CheckpointError, match="not a labkit checkpoint"):
        C.load(tmp_path / "junk.pt")
    with pytest.raises(C.CheckpointError, match="no checkpoint"):
        C.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("attention", ["labkit", "online"])
def test_labkit_attention_options_match_sdpa(attention):
    """The formula as written and the online-softmax version give SDPA's logits and gradients."""
    torch.manual_seed(0)
    m = GPT(tiny())
    x = torch.randint(0, 50, (2, 13))  # odd length: blocks that do not divide T
    a, loss_a = m(x, x)
    loss_a.backward()
    m2 = GPT(tiny(attention=attention))
    m2.load_state_dict(m.state_dict())
    b, loss_b = m2(x, x)
    loss_b.backward()
    assert torch.allclose(a, b, atol=1e-5)
    for (name, p1), p2 in zip(m.named_parameters(), m2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5), name
    with pytest.raises(ValueError, match="no attention dropout"):
        tiny(attention=attention, dropout=0.1)


def test_cpu_attention_runs_in_float32_under_bf16_autocast(monkeypatch):
    """The CPU flash-attention kernel is slow in bf16, so the model keeps attention in fp32 there
    while the matmuls around it run in bf16; the output keeps the autocast dtype."""
    import torch.nn.functional as F

    from labkit import model as M

    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.dtype)
        return real(q, k, v, **kw)

    monkeypatch.setattr(M.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, precision="bfloat16"))
    x = torch.randint(0, 64, (2, 16))
    _, loss = gpt(x, x)
    loss.backward()
    assert seen == [torch.float32, torch.float32]
    ref = M.GPT(M.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, precision="float32"))
    ref.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        ref_loss = ref(x, x)[1].item()
    assert abs(ref_loss - loss.item()) < 0.05


def test_resolve_device_auto_names_and_a_missing_gpu(monkeypatch):
    """One choice of device for training, pruning and serving: auto follows the GPU, names are checked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.resolve_device() == torch.device("cpu") and M.resolve_device("auto") == torch.device("cpu")
    assert M.resolve_device("cpu") == torch.device("cpu") and M.resolve_device(torch.device("cpu")).type == "cpu"
    for name in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="no GPU.*'cpu'"):
            M.resolve_device(name)
    with pytest.raises(ValueError, match="unknown device 'gpu'.*'cuda:N'"):
        M.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as far as selection goes
    assert M.resolve_device("auto") == torch.device("cuda") and M.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_train_prune_and_serve_resolve_the_device_alike(monkeypatch, capsys):
    from labkit.lab.cli import build_parser
    from labkit.prune.speed import time_models
    from labkit.serve.cli import cli as serve_cli, pick_device
    from labkit.train import TrainConfig, run_loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for refused in (lambda: pick_device("cuda"),
                    lambda: time_models({"m": torch.nn.Linear(2, 2)}, torch.zeros(1, 2), device="cuda"),
                    lambda: run_loop(TrainConfig.for_scale("tiny").replace(device="cuda"), "/nonexistent")):
        with pytest.raises(ValueError, match="torch sees no GPU here"):
            refused()
    # `labkit serve --device cuda` on a CPU node: exit 2 with the advice, no traceback, no server
    assert serve_cli(build_parser().parse_args(["serve", "--demo", "--device", "cuda"])) == 2
    assert "--device" in (err := capsys.readouterr().err) and "use 'cpu'" in err


def test_exact_gelu_by_default_tanh_on_request_and_for_configs_saved_before(tmp_path):
    torch.manual_seed(0)
    exact = GPT(tiny())
    tanh = GPT(tiny(activation="gelu_tanh"))
    tanh.load_state_dict(exact.state_dict())
    x = torch.randint(0, 50, (2, 16))
    a, b = exact(x)[0], tanh(x)[0]
    assert not torch.equal(a, b)  # a different function ...
    assert torch.allclose(a, b, atol=1e-3)  # ... that the tanh form approximates
    with pytest.raises(ValueError, match="activation='relu'.*gelu, gelu_tanh"):
        tiny(activation="relu")
    old = {k: v for k, v in tiny().to_dict().items() if k != "activation"}  # written before the key existed
    assert GPTConfig.from_saved(old).activation == "gelu_tanh"
    assert GPTConfig.from_dict(old).activation == "gelu"  # a new config dict takes the new default
    path = C.save(tanh, tmp_path / "ck.pt")
    loaded, _ = C.load(path)
    assert loaded.config.activation == "gelu_tanh" and torch.equal(loaded(x)[0], b)


# ----------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("prompt_len,steps", [(1, 20), (5, 40), (13, 30)])
def test_kv_cache_logits_equal_recompute_at_every_step(prompt_len, steps):
    """float32 in both paths; only the order of float additions differs (a (1, C) matmul for the new
    token instead of a (T, C) one, SDPA over a masked key range instead of the causal kernel), which
    moves logits of size ~1 by a few 1e-7: atol 1e-5 leaves room and still catches any real error
    (a wrong position or a missing key moves them by > 1e-2). block_size 24 puts most runs past it."""
    torch.manual_seed(prompt_len)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=64, precision="float32")).eval()
    seq = torch.randint(0, 64, (2, prompt_len))
    cache = m.new_cache(2, prompt_len + steps)
    worst = 0.0
    for _ in range(steps):
        cached = m.next_logits(seq, cache)
        with torch.no_grad():
            plain = m(seq[:, -24:])[0][:, -1, :]
        worst = max(worst, (cached - plain).abs().max().item())
        seq = torch.cat([seq, cached.argmax(-1, keepdim=True)], dim=1)
    print(f"prompt {prompt_len}, {steps} steps (to length {seq.shape[1]}): max |cached - recompute| = {worst:.2e}")
    assert worst < 1e-5


def test_generate_with_and_without_cache_agree_across_block_size():
    torch.manual_seed(1)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, precision="float32"))
    start = torch.randint(0, 64, (3, 4))
    cached = m.generate(start, 30, temperature=0)
    plain = m.generate(start, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(m.generate(start, 30, generator=g()), m.generate(start, 30, generator=g(), use_cache=False))


def test_kv_cache_rows_of_different_lengths_share_a_pass():
    """Per-row positions and a mask: a batch whose rows hold 3 and 7 positions gives each row the
    logits it gets alone."""
    torch.manual_seed(2)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64, precision="float32")).eval()
    a, b = torch.randint(0, 64, (1, 3)), torch.randint(0, 64, (1, 7))
    caches = []
    for x in (a, b):
        c = m.new_cache(1, 12)
        m(x, cache=c)
        caches.append(c)
    both = KVCache.cat(caches)
    nxt = torch.tensor([[5], [9]])
    with torch.no_grad():
        batched = m(nxt, cache=both)[0][:, -1]
        alone = [m(torch.cat([x, nxt[i:i + 1]], 1))[0][:, -1] for i, x in enumerate((a, b))]
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5)
    assert both.lengths.tolist() == [4, 8] and both.select([1]).lengths.tolist() == [8]
    assert both.nbytes() == 2 * 2 * (2 * 2 * 12 * 16) * 4


@pytest.mark.parametrize("shape", [dict(layer_heads=(0, 1), layer_ffn=(16, 0)), dict(attention="labkit"),
                                   dict(attention="online")])
def test_kv_cache_for_pruned_shapes_and_every_attention(shape):
    """A layer with no heads keeps nothing in the cache; labkit's attentions use SDPA over the cache."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, precision="float32", **shape))
    start = torch.randint(0, 64, (2, 3))
    assert torch.equal(m.generate(start, 25, temperature=0), m.generate(start, 25, temperature=0, use_cache=False))
