"""bench.serve at toy size: every engine and level is measured, the ratios are printed, texts agree."""

from bench.serve import ENGINES, report, run


def test_bench_serve_smoke():
    result = run(levels=(1, 3), requests=4, new_tokens=3, long_tokens=12, model="tiny", max_batch_size=4)
    assert sorted((r["engine"], r["clients"]) for r in result["rows"]) == sorted(
        (e, c) for e in ENGINES for c in (1, 3))
    assert all(r["tokens_per_s"] > 0 and r["ttft_p95_ms"] >= r["ttft_p50_ms"] > 0 for r in result["rows"])
    assert all(r["requests"] == 4 for r in result["rows"])
    assert set(result["ratios"]) == {(c, b) for c in (1, 3) for b in ("static", "unbatched")}
    assert result["kv"]["new_tokens"] == 12 and result["kv"]["recompute_tok_s"] > 0
    assert result["same_texts"]
    text = report(result)
    assert "KV cache / recompute x" in text and "flags:" in text
    assert text.count("vs    static: tokens/s x") == 2 and text.count("vs unbatched: tokens/s x") == 2
    for engine in ENGINES:
        assert f"3 {engine:>10}" in text
