"""labkit.serve.engine without HTTP: streaming pieces, stop strings, top-p, seeds alone or batched."""

from __future__ import annotations

import time

import pytest
import torch

from labkit.serve import demo_generator, demo_model
from labkit.serve.engine import Batcher, ByteTokenizer, GenRequest, ModelGenerator, TextStream, sample_rows


@pytest.fixture(scope="module")
def gen():
    torch.set_num_threads(1)
    return demo_generator()


def _stream(gen, batcher_kwargs, requests):
    """Submit all requests to one Batcher with on_token; returns (results, pieces per request)."""
    b = Batcher(gen, **batcher_kwargs)
    pieces = [[] for _ in requests]
    try:
        futures = [b.submit(r, on_token=pieces[i].append) for i, r in enumerate(requests)]
        results = [f.result(60) for f in futures]
    finally:
        b.stop()
    return results, pieces


REQS = [GenRequest("Once upon", 20, 1.0, None, seed=s) for s in range(3)] + [
    GenRequest("Hi", 12, 0.7, 5, top_p=0.9, seed=7), GenRequest("GPU nodes", 9, 0.0, seed=3)]


def test_streamed_pieces_join_to_the_text(gen):
    results, pieces = _stream(gen, dict(max_batch_size=8, max_wait_ms=100), REQS)
    for res, ps in zip(results, pieces):
        assert "".join(ps) == res.text and all(ps)
        assert res.finish_reason == "length"
    assert any(len(ps) > 2 for ps in pieces), "pieces came only at the end"


def test_stop_strings_cut_the_text(gen):
    full = gen.generate([GenRequest("Once upon", 30, 1.0, seed=4)])[0].text
    stop = full[10:12]
    cut = full.find(stop)
    results, pieces = _stream(gen, dict(max_batch_size=1), [GenRequest("Once upon", 30, 1.0, seed=4, stop=(stop, "\x00\x01"))])
    res = results[0]
    assert res.text == full[:cut] and res.finish_reason == "stop" and "".join(pieces[0]) == res.text
    assert stop not in "".join(pieces[0])
    never = gen.generate([GenRequest("Once upon", 30, 1.0, seed=4, stop=("\x00\x01\x02",))])[0]
    assert never.text == full and never.finish_reason == "length"


class _Scripted:
    """A tokenizer stand-in: ByteTokenizer's decode, for driving a TextStream by hand."""

    decode = staticmethod(ByteTokenizer().decode)


def test_held_back_stop_prefix_and_incomplete_utf8():
    got = []
    st = TextStream(GenRequest("x", 20, stop=("END",)), [1], _Scripted(), got.append)
    for b in "ab".encode() + "€".encode()[:2]:
        st.push(b)
    assert "".join(got) == "ab"                 # the half-made € is held back
    st.push("€".encode()[2])
    st.push(ord("E"))
    st.push(ord("N"))
    assert "".join(got) == "ab€"               # "EN" may start "END": held back
    st.push(ord("X"))
    assert "".join(got) == "ab€ENX"            # it did not
    for b in b"END tail":
        if st.push(b):
            break
    assert st.done and st.finish_reason == "stop" and st.text == "ab€ENX" == "".join(got)


def test_top_p_one_is_off_and_small_top_p_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    def draw(top_p):
        g = [torch.Generator().manual_seed(s) for s in range(4)]
        return [sample_rows(logits, [1.0] * 4, [None] * 4, g, [top_p] * 4) for _ in range(20)]
    assert draw(1.0) == draw(None)
    peaked = logits.clone()
    peaked[:, 7] = logits.max() + 3.0  # the top token, with most of the mass (but not all)
    g = [torch.Generator().manual_seed(s) for s in range(4)]
    for _ in range(20):
        assert sample_rows(peaked, [1.0] * 4, [None] * 4, g, [0.5] * 4) == [7] * 4


def test_seed_gives_the_same_text_alone_or_batched(gen):
    reqs = REQS + [GenRequest("Once upon", 25, 1.0, seed=1, stop=("e",)), GenRequest("Hi", 15, 1.2, top_p=0.8, seed=9)]
    alone, _ = _stream(gen, dict(max_batch_size=1), reqs)
    together, _ = _stream(gen, dict(max_batch_size=8, max_wait_ms=100), reqs)
    assert alone == together
    assert alone[-2].finish_reason in ("stop", "length")


def test_running_and_cache_bytes(gen):
    b = Batcher(gen, max_batch_size=4, max_wait_ms=50)
    seen = []
    fut = b.submit(GenRequest("Hello", 6), on_token=lambda p: seen.append((b.running, gen.cache_bytes())))
    fut.result(30)
    b.stop()
    assert seen and all(n == 1 for n, _ in seen) and b.running == 0
    # 2 layers x (keys + values) x 2 heads x 11 positions (5 prompt + 6 new) x 16 dims x 4 bytes
    assert seen[0][1] == 2 * 2 * 2 * 11 * 16 * 4 and gen.cache_bytes() == 0


def test_stop_finishes_the_running_requests_and_fails_the_waiting_ones(gen):
    from labkit.serve.engine import ShuttingDown

    b = Batcher(gen, max_batch_size=1)
    started = []
    first = b.submit(GenRequest("Hello", 30), on_token=started.append)
    waiting = [b.submit(GenRequest("Hello", 30, seed=s)) for s in range(3)]
    while not started:
        time.sleep(0.001)
    b.stop()
    assert first.result(5).new_tokens == 30
    for fut in waiting:
        with pytest.raises(ShuttingDown):
            fut.result(5)


def test_on_token_that_raises_fails_only_its_request(gen):
    b = Batcher(gen, max_batch_size=4, max_wait_ms=100)

    def boom(piece):
        raise ConnectionError("client went away")
    bad = b.submit(GenRequest("Hello", 6, seed=1), on_token=boom)
    good = b.submit(GenRequest("Hello", 6, seed=2))
    with pytest.raises(ConnectionError):
        bad.result(30)
    assert good.result(30).new_tokens == 6
    b.stop()


# ------------------------------------------------------------------------- continuous batching


class _Recording(torch.nn.Module):
    """A GPT that records (input shape, with cache?) per forward pass; ``kv=False`` hides new_cache."""

    def __init__(self, inner, kv=True):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []
        if kv:
            self.new_cache = inner.new_cache

    def forward(self, idx, targets=None, cache=None):
        self.calls.append((tuple(idx.shape), cache is not None))
        return self.inner(idx, cache=cache)


def test_step_joins_at_the_next_step_and_finished_rows_leave():
    rec = _Recording(demo_model())
    g = ModelGenerator(rec, ByteTokenizer())
    a, b = g.open_stream(GenRequest("abc", 3, seed=1)), g.open_stream(GenRequest("hello!", 5, seed=2))
    g.step([a])                      # a: prefill of its 3 tokens, first token
    assert g.running == 1 and g.cache_bytes() > 0
    g.step([b])                      # a: one token over the cache; b: prefill, first token
    g.step()                         # both in one pass, rows of lengths 5 and 7
    assert a.done and len(a.new) == 3 and g.running == 1   # a left at once
    for _ in range(3):
        g.step()
    assert b.done and g.running == 0 and g.cache_bytes() == 0
    assert rec.calls == [((1, 3), True), ((1, 1), True), ((1, 6), True), ((2, 1), True)] + [((1, 1), True)] * 3
    assert [a.result(), b.result()] == g.generate([a.request, b.request])  # = the recompute engine


REQS2 = [GenRequest(p, n, t, k, s, top_p=tp, stop=st) for p, n, t, k, s, tp, st in [
    ("Once upon a time", 30, 1.0, None, 1, None, ()), ("Hi", 25, 0.8, 5, 2, None, ()),
    ("GPU", 20, 1.3, None, 3, 0.9, ()), ("x" * 40, 35, 1.0, None, 4, None, ("e",)),  # crosses block_size 64
    ("y" * 80, 10, 0.9, 20, 5, None, ()),                                              # prompt > block_size
    ("The cluster", 12, 0.0, None, 6, None, ()), ("Hello there", 28, 1.0, 40, 7, 0.95, ("th",))]]


def test_continuous_seed_gives_the_same_text_alone_batched_and_as_the_static_engine(gen):
    alone, _ = _stream(gen, dict(max_batch_size=1), REQS2)
    together, pieces = _stream(gen, dict(max_batch_size=8), REQS2)
    static, _ = _stream(gen, dict(max_batch_size=8, max_wait_ms=100, mode="static"), REQS2)
    assert alone == together == static
    assert all("".join(p) == r.text for p, r in zip(pieces, together))
    assert len({r.new_tokens for r in together}) > 2  # rows of different lengths ran together


def test_continuous_without_a_kv_cache_model_recomputes():
    plain = ModelGenerator(_Recording(demo_model(), kv=False), ByteTokenizer())
    results, _ = _stream(plain, dict(max_batch_size=4), REQS2[:4])
    assert results == ModelGenerator(demo_model(), ByteTokenizer()).generate(REQS2[:4])
    assert not any(with_cache for _, with_cache in plain.model.calls)


def test_a_request_joins_the_running_batch_without_waiting_for_it(gen):
    events, sizes = [], []
    b = Batcher(gen, max_batch_size=4, on_batch=lambda size, tokens, s: sizes.append((size, tokens)))
    long = b.submit(GenRequest("long one", 60, seed=1), on_token=lambda p: events.append("long"))
    while not events:
        time.sleep(0.001)
    short = b.submit(GenRequest("short", 3, seed=2), on_token=lambda p: events.append("short"))
    assert short.result(30).new_tokens == 3 and not long.done()  # answered while the long one runs
    long.result(30)
    b.stop()
    assert b.mode == "continuous" and events[-1] == "long" and "short" in events
    assert (2, 2) in sizes and sum(t for _, t in sizes) == 63
