"""labkit.prune on a GPT and on plain modules: masks, sparsity reports, structured shrinking, speed."""

import copy

import pytest
import torch
from torch import nn

from labkit.checkpoint import load, save
from labkit.model import GPT, GPTConfig
from labkit.prune import (
    ffn_importance, head_importance, hold_zeros, magnitude, penalty, prune_ffn, prune_heads, prune_structured,
    select, shrink, sparsity,
)
from labkit.prune.importance import batches_of, gated, normalize_per_layer
from labkit.prune.evaluate import (apply, evaluate_point, measure_point, perplexity, removed_fraction, sparsity_curve,
                                  val_windows)
from labkit.prune.speed import SparseLinear, sparse_kernel_study, speedups, time_models, to_sparse

torch.set_num_threads(1)


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, precision="float32")
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def windows(n=8, t=16, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t + 1), generator=g)


# ---------------------------------------------------------------- unstructured


def test_layer_scope_prunes_each_layer_by_magnitude():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    w0 = net[0].weight.detach().clone()
    magnitude(net, 0.4, scope="layer")
    rep = sparsity(net)
    assert rep["0"].zeros == round(0.4 * 600) and rep["2"].zeros == round(0.4 * 300)
    # the survivors are exactly the largest-magnitude weights, unchanged
    kept = net[0].weight != 0
    assert w0.abs()[~kept].max() <= w0.abs()[kept].min()
    assert torch.equal(net[0].weight[kept], w0[kept])
    # made permanent: plain parameters, no masks or hooks left behind
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in net.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in net.named_buffers())


def test_global_scope_ranks_across_layers():
    net = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(0.01)
        net[1].weight.fill_(1.0)
    magnitude(net, 0.5, scope="global")
    rep = sparsity(net)
    assert rep.rows[0].sparsity == 1.0 and rep.rows[1].sparsity == 0.0
    assert rep.total == pytest.approx(0.5) and float(rep) == rep.total


def test_sparsity_report_counts_flops_and_skips_tied_embedding():
    m = tiny_gpt()
    names = [r.name for r in sparsity(m).rows]
    assert "lm_head" not in names and len(names) == 2 * 4  # c_attn, c_proj, c_fc, c_proj per block
    magnitude(m, 0.75)
    rep = sparsity(m)
    assert rep.total == pytest.approx(0.75, abs=1e-3)
    assert rep.flops == 2 * rep.params and rep.flops_nonzero == 2 * (rep.params - rep.zeros)
    assert torch.equal(m.lm_head.weight, m.transformer.wte.weight)  # tying intact
    d = rep.as_dict()
    assert d["total"] == rep.total and len(d["layers"]) == 8
    assert "total" in rep.table()


def test_repeated_pruning_is_monotone_and_output_still_finite():
    m = tiny_gpt()
    x = windows()
    a = sparsity(magnitude(m, 0.3)).total
    b = sparsity(magnitude(m, 0.6)).total
    assert a < b and b == pytest.approx(0.6, abs=1e-3)
    assert torch.isfinite(m(x[:, :-1])[0]).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, "half"])
def test_bad_amount_is_a_clear_error(bad):
    with pytest.raises((ValueError, TypeError), match="fraction"):
        magnitude(nn.Linear(4, 4), bad)


def test_bad_scope_lists_choices():
    with pytest.raises(ValueError, match="global, layer"):
        magnitude(nn.Linear(4, 4), 0.5, scope="model")


def test_hold_zeros_keeps_pruned_weights_zero_through_training():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    magnitude(net, 0.5)
    zeros = {n: (p == 0) for n, p in net.named_parameters() if n.endswith("weight")}
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    with hold_zeros(net):
        for _ in range(5):
            net(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for n, p in net.named_parameters():
        if n in zeros:
            assert (p[zeros[n]] == 0).all(), n
            assert (p[~zeros[n]] != 0).any()


def test_penalty_l1_l2():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, -4.0]]))
    assert penalty(net, "l1").item() == 7.0 and penalty(net, "l2").item() == 25.0
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        penalty(net, "l3")


# ---------------------------------------------------------------- structured


def test_shrink_keeping_everything_is_the_same_function():
    m = tiny_gpt()
    x = windows()[:, :-1]
    same = shrink(m)
    assert torch.allclose(same(x)[0], m(x)[0], atol=1e-5)


def test_shrink_equals_masking_the_removed_heads_and_neurons():
    """Removing heads/neurons physically gives the same outputs as zeroing their contribution."""
    m = tiny_gpt()
    x = windows()[:, :-1]
    keep_h = [torch.tensor([0, 2]), torch.tensor([1, 2, 3])]
    keep_f = [torch.arange(0, 128, 2), torch.arange(64)]
    small = shrink(m, keep_h, keep_f)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for blk, kh, kf in zip(ref.transformer.h, keep_h, keep_f):
            hd = blk.attn.head_dim
            gone = [h for h in range(4) if h not in kh.tolist()]
            for h in gone:
                blk.attn.c_proj.weight[:, h * hd:(h + 1) * hd] = 0
            drop = torch.ones(128, dtype=torch.bool)
            drop[kf] = False
            blk.mlp.c_proj.weight[:, drop] = 0
    assert torch.allclose(small(x)[0], ref(x)[0], atol=1e-5)
    assert small.config.layer_heads == (2, 3) and small.config.layer_ffn == (64, 64)
    assert m.config.layer_heads is None  # the input model is untouched


def test_pruned_gpt_saves_loads_and_generates(tmp_path):
    m = tiny_gpt()
    p = prune_ffn(prune_heads(m, 0.5), 0.5)
    assert sum(p.config.layer_heads) == 4 and p.config.layer_ffn == (64, 64)
    path = save(p, tmp_path / "pruned.pt")
    q = load(path).model.eval()
    x = windows()[:, :-1]
    assert q.config == p.config
    assert torch.equal(q(x)[0], p(x)[0])
    out = q.generate(x[:1, :4], max_new_tokens=5)
    assert out.shape == (1, 9)
    assert sum(t.numel() for t in q.parameters()) < sum(t.numel() for t in m.parameters())


def test_gradient_importance_finds_a_head_that_does_nothing():
    m = tiny_gpt()
    with torch.no_grad():
        blk = m.transformer.h[1].attn
        hd = blk.head_dim
        blk.c_proj.weight[:, 3 * hd:4 * hd] = 0  # head 3 of layer 1 cannot affect the loss
        m.transformer.h[0].mlp.c_proj.weight[:, 5] = 0  # neuron 5 of layer 0 neither
    data = windows()
    heads = head_importance(m, "gradient", data)
    assert [len(h) for h in heads] == [4, 4]
    assert heads[1][3] == 0 and (heads[1][:3] > 0).all()
    assert ffn_importance(m, "gradient", data)[0][5] == 0
    p = prune_heads(m, 1 / 8, importance="gradient", data=data)
    assert p.config.layer_heads == (4, 3)
    # the pruned model computes what the original did (the removed head contributed nothing)
    assert torch.allclose(p(data[:, :-1])[0], m(data[:, :-1])[0], atol=1e-5)
    assert all(q.grad is None for q in m.parameters())  # no gradients left behind


def test_gradient_importance_needs_data():
    with pytest.raises(ValueError, match="needs data"):
        prune_heads(tiny_gpt(), 0.5, importance="gradient")
    with pytest.raises(ValueError, match="magnitude, gradient"):
        prune_heads(tiny_gpt(), 0.5, importance="random")


def test_gate_gradients_are_taken_per_example_so_opposite_signs_do_not_cancel():
    # two examples whose losses pull the same gates in opposite directions
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    sign = torch.tensor([[1.0], [-1.0]])
    with gated([(lin, 2)]) as gates:  # two groups: inputs (0, 1) and (2, 3)
        (sign * lin(x)).sum().backward()
        gates.accumulate()
        per_example = gates.mean()[0]
    shared = torch.ones(2, requires_grad=True)  # the old way: one gate for the batch, |grad| of the total
    (sign * lin((x.view(2, 2, 2) * shared[:, None]).view(2, 4))).sum().backward()
    assert torch.allclose(per_example, torch.tensor([3.0, 7.0]))  # E|dL_b/dg| = |1+2|, |3+4|
    assert torch.allclose(shared.grad.abs(), torch.zeros(2))      # the signs cancel
    assert gates.examples == 2 and lin._forward_pre_hooks == {}


def _mean_then_abs(model, data):
    """Reference for the old estimate: |dL/dg| of the batch-mean loss, one shared gate per head."""
    blocks = list(model.transformer.h)
    g = [torch.ones(b.attn.n_head, requires_grad=True) for b in blocks]

    def hook(i):
        return lambda mod, args: ((args[0].view(*args[0].shape[:-1], len(g[i]), -1) * g[i][:, None]).flatten(-2),)

    handles = [b.attn.c_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    total, n = [torch.zeros(len(x)) for x in g], 0
    for x, y in batches_of(data):
        model(x, y)[1].backward()
        for t, gi in zip(total, g):
            t += gi.grad.abs()
            gi.grad = None
        n += 1
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return [t / n for t in total]


def test_gpt_gradient_importance_is_the_mean_of_per_sequence_gradients():
    m = tiny_gpt()
    data = windows(16)  # two batches of 8
    imp = head_importance(m, "gradient", data)
    one_by_one = [head_importance(m, "gradient", data[i:i + 1]) for i in range(len(data))]
    for layer, got in enumerate(imp):
        expect = torch.stack([o[layer] for o in one_by_one]).mean(0)
        assert torch.allclose(got, expect, rtol=1e-4, atol=1e-7)
    old = _mean_then_abs(m, data)
    for new, o in zip(imp, old):
        assert (new >= o - 1e-6).all()  # E|a| >= |E a|
    assert sum(float(x.sum()) for x in imp) > 1.2 * sum(float(x.sum()) for x in old)  # signs did cancel before


def test_per_layer_normalisation_lets_every_layer_lose_heads():
    raw = [100 * torch.tensor([1.0, 5.0, 5.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 8.0]), torch.zeros(3)]
    normed = normalize_per_layer(raw)
    assert [float(s.norm()) for s in normed[:2]] == pytest.approx([1.0, 1.0]) and (normed[2] == 0).all()
    assert torch.equal(raw[0], 100 * torch.tensor([1.0, 5.0, 5.0, 5.0]))  # the input is not changed
    scores = raw[:2]
    by_raw = select(scores, 3 / 8, "global")
    by_norm = select(scores, 3 / 8, "global", normalize=True)
    assert [len(k) for k in by_raw] == [4, 1]  # raw scores take every dropped head from layer 1
    assert [k.tolist() for k in by_norm] == [[1, 2, 3], [2, 3]]  # normalised: both layers lose heads


def test_gradient_head_pruning_normalises_per_layer_by_default():
    m = tiny_gpt()
    with torch.no_grad():
        m.transformer.h[0].attn.c_proj.weight.mul_(1e-2)  # layer 0's gate gradients become ~100x smaller
    data = windows()
    raw = head_importance(m, "gradient", data)
    assert raw[0].max() < raw[1].min()
    plain = prune_heads(m, 3 / 8, importance="gradient", data=data, normalize=False)
    assert plain.config.layer_heads == (1, 4)  # raw scores: all three from layer 0
    default = prune_heads(m, 3 / 8, importance="gradient", data=data)
    assert default.config.layer_heads == prune_heads(m, 3 / 8, "gradient", data, normalize=True).config.layer_heads
    assert all(h < 4 for h in default.config.layer_heads) and sum(default.config.layer_heads) == 5
    # magnitude importance keeps the raw global ranking unless asked
    assert prune_heads(m, 3 / 8).config.layer_heads == prune_heads(m, 3 / 8, normalize=False).config.layer_heads


def test_select_global_and_layer_keep_at_least_one():
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]
    assert [k.tolist() for k in select(scores, 0.5, "global")] == [[2], [1, 2]]  # 3 dropped; layer 0 keeps one
    assert [k.tolist() for k in select(scores, 2 / 3, "layer")] == [[2], [2]]
    assert all(len(k) >= 1 for k in select(scores, 0.99, "global"))


# ---------------------------------------------------------------- evaluation and schedule


def test_perplexity_curve_and_apply():
    m = tiny_gpt()
    val = windows(8)
    base = perplexity(m, val)
    assert 1 < base < 200  # an untrained model is near the uniform 64
    pts = sparsity_curve(m, val, amounts=(0.0, 0.5), methods=("unstructured", "structured"))
    assert [(p.method, p.amount) for p in pts] == [("unstructured", 0.0), ("unstructured", 0.5),
                                                  ("structured", 0.0), ("structured", 0.5)]
    assert pts[0].perplexity == pytest.approx(base)
    assert pts[1].sparsity == pytest.approx(0.5, abs=1e-3) and pts[1].params == pts[0].params
    assert pts[3].params < pts[2].params and 0.4 < pts[3].sparsity < 0.6
    with pytest.raises(ValueError, match="unstructured, heads, ffn, structured"):
        apply(m, "channels", 0.5)
    assert removed_fraction(m, m) == 0.0


def test_measure_point_scores_and_times_the_pruned_copy():
    m = tiny_gpt()
    val = windows(4)
    before = {n: p.clone() for n, p in m.state_dict().items()}
    row = measure_point(m, "unstructured", 0.5, val, repeats=1, warmup=0)
    point = evaluate_point(m, "unstructured", 0.5, val)
    assert set(row) == {"method", "amount", "sparsity", "perplexity", "perplexity_dense", "ms", "ms_dense", "speedup"}
    assert (row["method"], row["amount"]) == ("unstructured", 0.5)
    assert row["sparsity"] == pytest.approx(point.sparsity) and row["perplexity"] == pytest.approx(point.perplexity)
    assert row["perplexity_dense"] == pytest.approx(perplexity(m, val)) and row["perplexity_dense"] != row["perplexity"]
    assert row["ms"] > 0 and row["ms_dense"] > 0 and row["speedup"] == pytest.approx(row["ms_dense"] / row["ms"])
    assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())        # the model is not changed
    small = measure_point(m, "structured", 0.5, val, x=val[:1, :8], repeats=1, warmup=0, dense_perplexity=42.0)
    assert small["perplexity_dense"] == 42.0 and 0.4 < small["sparsity"] < 0.6     # given dense value reused
    with pytest.raises(ValueError, match="choose one of"):
        measure_point(m, "channels", 0.5, val)


def test_val_windows_from_a_stream():
    w = val_windows(torch.arange(100), block_size=16, max_windows=4)
    assert w.shape == (4, 17) and w[1, 0] == 16
    with pytest.raises(ValueError, match="too few"):
        val_windows(torch.arange(10), block_size=16)


def test_finetune_reuses_train_and_keeps_zeros(tmp_path):
    from labkit.data.shards import make_tiny_shards
    from labkit.prune.schedule import cubic_schedule, finetune, iterative
    from labkit.train import TrainConfig

    text = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(300))
    reader = make_tiny_shards(tmp_path, text=text, vocab_size=300)
    cfg = TrainConfig.for_scale("tiny", max_steps=6, precision="float32", lr=1e-2)
    m = tiny_gpt(vocab_size=reader.vocab_size)
    magnitude(m, 0.5)
    losses = finetune(m, cfg, tmp_path, steps=6, regularizer="l1", strength=1e-4)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert sparsity(m).total >= 0.5
    sched = cubic_schedule(0.8, 3)
    assert sched[-1] == pytest.approx(0.8) and sched[0] < sched[1] < sched[2]
    val = val_windows(reader, 16, 4)
    res = iterative(tiny_gpt(vocab_size=reader.vocab_size), 0.6, 2, cfg, tmp_path, val, steps_per_round=3)
    assert [h["sparsity"] for h in res.history] == pytest.approx([0.0, cubic_schedule(0.6, 2)[0], 0.6], abs=0.01)
    assert all(h["ppl_finetuned"] > 1 for h in res.history)
    small = iterative(tiny_gpt(vocab_size=reader.vocab_size), 0.5, 2, cfg, tmp_path, val, steps_per_round=2,
                      method="structured")
    assert small.model.config.layer_ffn is not None and sum(small.model.config.layer_ffn) < 2 * 128
    assert 0.3 < small.history[-1]["sparsity"] <= 0.6


def test_finetune_on_encrypted_shards_matches_plaintext_and_needs_the_key(tmp_path):
    """The same text, sealed: fine-tuning with the key reads the same batches (the same losses, bit for
    bit); the iterative and regularisation studies hand the key on; without it the error names the shard."""
    from labkit.core import crypto
    from labkit.core.crypto import EncryptionKeyError
    from labkit.data.shards import make_tiny_shards
    from labkit.prune.schedule import finetune, iterative, regularisation_study
    from labkit.train import TrainConfig

    key = crypto.new_key_file(tmp_path / "data.key")
    text = "\n\n".join(f"def g{i}(y):\n    return y - {i} * {i % 5}" for i in range(300))
    plain = make_tiny_shards(tmp_path / "plain", text=text, vocab_size=300)
    make_tiny_shards(tmp_path / "sealed", text=text, vocab_size=300, encryption=key)
    cfg = TrainConfig.for_scale("tiny", max_steps=4, precision="float32", lr=1e-2)
    torch.manual_seed(0)
    a = tiny_gpt(vocab_size=plain.vocab_size)
    b = copy.deepcopy(a)
    assert finetune(a, cfg, tmp_path / "plain", steps=4) == finetune(b, cfg, tmp_path / "sealed", steps=4,
                                                                     encryption=key)
    val = val_windows(plain, 16, 4)
    res = iterative(copy.deepcopy(a), 0.5, 1, cfg, tmp_path / "sealed", val, steps_per_round=2, encryption=key)
    rows = regularisation_study(copy.deepcopy(a), cfg, tmp_path / "sealed", val, strengths=(("l1", 1e-4),),
                                steps=2, encryption=key)
    assert len(res.history) == 2 and rows[0]["ppl_pruned"] > 1
    with pytest.raises(EncryptionKeyError, match=rf"train_00000\.bin is encrypted .*{key.key_id}"):
        finetune(copy.deepcopy(a), cfg, tmp_path / "sealed", steps=1)


def test_auto_device_follows_cuda(monkeypatch):
    from labkit.prune.speed import pick_device

    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as far as selection goes
    assert pick_device("auto").type == "cuda" and pick_device("cuda:1") == torch.device("cuda", 1)


# ---------------------------------------------------------------- speed


def test_time_models_interleaves_and_reports_throughput():
    m = tiny_gpt()
    x = windows(2)[:, :-1]
    t = time_models({"dense": m, "small": prune_structured(m, 0.5)}, x, repeats=3, warmup=1)
    assert set(t) == {"dense", "small"} and t["dense"].tokens == x.numel()
    assert t["dense"].tokens_per_s > 0 and t["dense"].ms >= t["dense"].ms_min
    assert speedups(t, "dense")["dense"] == 1.0
    with pytest.raises(RuntimeError, match="no GPU") if not torch.cuda.is_available() else pytest.raises(Exception):
        time_models({"m": m}, x, device="cuda")


def test_sparse_linear_matches_dense_and_study_runs():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    magnitude(lin, 0.9)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(SparseLinear(lin)(x), lin(x), atol=1e-5)
    m = tiny_gpt()
    magnitude(m, 0.9)
    sm = to_sparse(m, min_sparsity=0.5)
    assert any(isinstance(mod, SparseLinear) for mod in sm.modules())
    xx = windows(2)[:, :-1]
    assert torch.allclose(sm(xx)[0], m(xx)[0], atol=1e-4)
    study = sparse_kernel_study(64, 64, tokens=8, sparsities=(0.0, 0.99), repeats=2)
    assert [r.sparsity for r in study.rows] == [0.0, 0.99]
    assert all(r.dense_ms > 0 and r.sparse_ms > 0 for r in study.rows)
    assert "CSR" in study.table()


def test_bench_gpt_speed_smoke():
    from bench.prune import gpt_speed

    g = gpt_speed(n_layer=2, n_head=4, n_embd=32, seq_len=16, batch=1, vocab=64, repeats=2)
    assert g["speedup"]["dense"] == 1.0 and g["params"]["structured 50%"] < g["params"]["dense"]
    assert g["sparsity_unstructured"] == pytest.approx(0.5, abs=1e-3)


def test_prune_config_presets_and_overrides(tmp_path, monkeypatch):
    from labkit.prune.config import PruneConfig

    tiny = PruneConfig.for_scale("tiny")
    assert tiny.train_steps < PruneConfig.for_scale("binder").train_steps
    user = tmp_path / "user.yaml"
    user.write_text("scales:\n  tiny:\n    prune:\n      rounds: 5\n      amounts: [0, 0.9]\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    cfg = PruneConfig.for_scale("tiny", finetune_steps=1)
    assert cfg.rounds == 5 and cfg.amounts == (0.0, 0.9) and cfg.finetune_steps == 1
    with pytest.raises(ValueError, match="valid"):
        PruneConfig.for_scale("tiny", bogus=1)


def test_usable_cores_reads_affinity_and_a_cgroup_quota(tmp_path):
    import os

    from labkit.prune.speed import usable_cores

    mine = len(os.sched_getaffinity(0))
    assert usable_cores(str(tmp_path / "missing")) == mine
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(tmp_path / "cpu.max")) == mine
    (tmp_path / "cpu.max").write_text("50000 100000\n")   # half a core: still one thread
    assert usable_cores(str(tmp_path / "cpu.max")) == 1
