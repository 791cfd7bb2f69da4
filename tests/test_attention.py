"""labkit.attention matches torch's SDPA in values and gradients, masks included, odd lengths too."""

import math

import pytest
import torch
import torch.nn.functional as F

from labkit import attention as A

torch.set_num_threads(2)
TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(*shape, seed=0, t_k=None):
    g = torch.Generator().manual_seed(seed)
    *lead, t, d = shape
    t_k = t if t_k is None else t_k
    q = torch.randn(*lead, t, d, generator=g, dtype=torch.float32)
    k = torch.randn(*lead, t_k, d, generator=g, dtype=torch.float32)
    v = torch.randn(*lead, t_k, d, generator=g, dtype=torch.float32)
    return [x.requires_grad_() for x in (q, k, v)]


def _grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    return out.detach(), dq, dk, dv


def _assert_same(fn, ref, q, k, v):
    for ours, theirs in zip(_grads(fn, q, k, v), _grads(ref, q, k, v)):
        torch.testing.assert_close(ours, theirs, **TOL)


def _random_bool_mask(b, h, t, s, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, t, s, generator=g) > 0.4
    m[..., 0] = True  # every query sees at least one key
    return m


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_matches_sdpa(t, causal):
    q, k, v = _qkv(2, 3, t, 8, seed=t)
    _assert_same(
        lambda q, k, v: A.scaled_dot_product_attention(q, k, v, causal=causal),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        q, k, v,
    )


def test_naive_bool_and_float_masks_match_sdpa():
    q, k, v = _qkv(2, 2, 11, 4, seed=3, t_k=13)
    m = _random_bool_mask(2, 2, 11, 13, seed=4)
    _assert_same(
        lambda q, k, v: A.scaled_dot_product_attention(q, k, v, mask=m),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v,
    )
    fm = torch.randn(11, 13, generator=torch.Generator().manual_seed(5))
    _assert_same(
        lambda q, k, v: A.scaled_dot_product_attention(q, k, v, mask=fm),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=fm), q, k, v,
    )


def test_true_means_may_attend():
    q, k, v = _qkv(1, 5, 4, seed=6)
    only_first = torch.zeros(5, 5, dtype=torch.bool)
    only_first[:, 0] = True
    out = A.scaled_dot_product_attention(q, k, v, mask=only_first)
    torch.testing.assert_close(out, v[:, :1].expand(1, 5, 4), **TOL)


def test_padding_mask_ignores_padded_keys():
    q, k, v = _qkv(2, 6, 4, seed=7)
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = A.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], mask=A.padding_mask(am))
    short = A.scaled_dot_product_attention(q[1:, :], k[1:, :3], v[1:, :3])
    torch.testing.assert_close(out[1, 0], short[0], **TOL)
    with pytest.raises(ValueError, match="batch, seq_len"):
        A.padding_mask(am[0])


def test_softmax_is_stable_and_handles_fully_masked_rows():
    x = torch.tensor([[1000.0, 1001.0, 999.0], [float("-inf")] * 3])
    p = A.softmax(x)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p[0], torch.softmax(x[0], -1))
    assert p[1].eq(0).all()
    naive = torch.exp(x[0]) / torch.exp(x[0]).sum()
    assert torch.isnan(naive).any()  # what the max subtraction saves us from


@pytest.mark.parametrize("t,block", [(1, 4), (13, 4), (37, 8), (64, 16), (50, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_online_matches_sdpa(t, block, causal):
    q, k, v = _qkv(2, 3, t, 16, seed=t + block)
    _assert_same(
        lambda q, k, v: A.online_softmax_attention(q, k, v, causal=causal, block_size=block),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        q, k, v,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_online_key_padding_mask_matches_sdpa(causal):
    b, h, t = 3, 2, 19
    q, k, v = _qkv(b, h, t, 8, seed=21)
    lengths = torch.tensor([19, 7, 0])  # full, padded, and one with every key masked
    kpm = torch.arange(t)[None, :] < lengths[:, None]  # (B, T_k), True = real token
    full = kpm[:, None, None, :] & (A.causal_mask(t) if causal else True)
    _assert_same(
        lambda q, k, v: A.online_softmax_attention(q, k, v, causal=causal, block_size=4,
                                                   key_padding_mask=kpm[:, None, :]),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=full), q, k, v,
    )
    out = A.online_softmax_attention(q, k, v, causal=causal, block_size=4, key_padding_mask=A.padding_mask(kpm))
    assert out[2].eq(0).all()  # nothing to attend to: zeros, as torch does, not nan
    with pytest.raises(ValueError, match="does not broadcast"):
        A.online_softmax_attention(q, k, v, key_padding_mask=kpm[:2, None, :])


def test_online_cross_attention_and_value_dim():
    q, k, v = _qkv(3, 9, 8, seed=11, t_k=21)
    v2 = torch.randn(3, 21, 5, requires_grad=True)
    for causal in (False, True):
        _assert_same(
            lambda q, k, v: A.online_softmax_attention(q, k, v, causal=causal, block_size=4),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            q, k, v2,
        )


def test_online_saves_no_t_by_t_tensor():
    t = 96
    q, k, v = _qkv(1, 2, t, 8, seed=12)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        A.online_softmax_attention(q, k, v, causal=True, block_size=16)
    assert sizes and max(sizes) <= 2 * t * 8  # O(T): q, k, v, out, lse
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        A.scaled_dot_product_attention(q, k, v, causal=True)
    assert max(sizes) >= 2 * t * t  # the naive one keeps the T x T probabilities


def test_split_merge_heads_roundtrip():
    x = torch.randn(2, 5, 12)
    h = A.split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    torch.testing.assert_close(h[:, 1], x[..., 4:8])
    torch.testing.assert_close(A.merge_heads(h), x)
    with pytest.raises(ValueError, match="not divisible"):
        A.split_heads(x, 5)


@pytest.mark.parametrize("causal", [False, True])
def test_multihead_impls_agree(causal):
    torch.manual_seed(0)
    mods = {impl: A.MultiHeadAttention(16, 4, causal=causal, impl=impl, block_size=4) for impl in A.IMPLS}
    for m in mods.values():
        m.load_state_dict(mods["sdpa"].state_dict())
    x = torch.randn(2, 11, 16)
    ys = {impl: m(x) for impl, m in mods.items()}
    torch.testing.assert_close(ys["naive"], ys["sdpa"], **TOL)
    torch.testing.assert_close(ys["online"], ys["sdpa"], **TOL)
    # gradients too: for the input and for every projection weight, whatever the kernel
    grads = {}
    for impl, m in mods.items():
        xi = x.clone().requires_grad_(True)
        (m(xi) ** 2).sum().backward()
        grads[impl] = [xi.grad] + [p.grad for p in m.parameters()]
    for impl in ("naive", "online"):
        for g, ref in zip(grads[impl], grads["sdpa"]):
            torch.testing.assert_close(g, ref, **TOL)
    y, w = mods["naive"](x, return_weights=True)
    assert w.shape == (2, 4, 11, 11)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 11), **TOL)


def test_multihead_padding_mask_with_causal():
    torch.manual_seed(1)
    sdpa = A.MultiHeadAttention(8, 2, causal=True)
    naive = A.MultiHeadAttention(8, 2, causal=True, impl="naive")
    naive.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 6, 8)
    m = A.padding_mask(torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(sdpa(x, mask=m), naive(x, mask=m), **TOL)
    fm = torch.zeros(m.shape).masked_fill(~m, float("-inf"))  # the same mask, additive
    torch.testing.assert_close(sdpa(x, mask=fm), naive(x, mask=m), **TOL)
    online = A.MultiHeadAttention(8, 2, causal=True, impl="online", block_size=4)
    online.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(online(x, mask=m), naive(x, mask=m), **TOL)
    with pytest.raises(ValueError, match="impl='sdpa'"):
        online(x, mask=fm)


def test_multihead_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="valid choices: sdpa, naive, online"):
        A.MultiHeadAttention(8, 2, impl="flash")
    with pytest.raises(ValueError, match="dropout=0.0"):
        A.MultiHeadAttention(8, 2, impl="online", dropout=0.1)
    with pytest.raises(ValueError, match="pick n_head among"):
        A.MultiHeadAttention(10, 3)


def test_scale_default_is_inverse_sqrt_dk():
    q, k, _ = _qkv(1, 4, 9, seed=13)
    w = A.attention_weights(q, k)
    torch.testing.assert_close(w, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(9), -1), **TOL)


def test_softmax_at_scales_saturates_as_the_scale_grows():
    from labkit.attention import softmax_at_scales

    scores = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 8.0
    rows = softmax_at_scales(scores, 64, (0.5, 1.0, 8.0))
    assert [f for f, _ in rows] == [0.5, 1.0, 8.0]
    for _, p in rows:
        assert torch.allclose(p.sum(), torch.tensor(1.0), atol=1e-6)
    torch.testing.assert_close(rows[1][1], torch.softmax(scores / 8.0, -1))
    peaks = [float(p.max()) for _, p in rows]
    assert peaks[0] < peaks[1] < peaks[2] and peaks[2] > 0.9  # sqrt(d_k) = no scaling: close to one-hot


def test_attention_stats_uniform_one_hot_and_mixed():
    t = 7
    uniform = torch.full((2, 3, t, t), 1.0 / t)
    s = A.attention_stats(uniform)
    assert s["entropy"] == pytest.approx(math.log(t), abs=1e-5)
    assert s["mean_max_weight"] == pytest.approx(1.0 / t, abs=1e-6)
    one_hot = torch.eye(t)[torch.randperm(t, generator=torch.Generator().manual_seed(0))]
    s = A.attention_stats(one_hot)
    assert s["entropy"] == pytest.approx(0.0, abs=1e-6) and s["mean_max_weight"] == pytest.approx(1.0)
    # half the rows uniform over 2 keys, half one-hot: averages of log 2 and 0, of 1/2 and 1
    mixed = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    s = A.attention_stats(mixed)
    assert s["entropy"] == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert s["mean_max_weight"] == pytest.approx(0.75)
