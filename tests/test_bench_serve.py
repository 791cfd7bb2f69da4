"""bench.serve at toy size: both servers run as processes, answer, and agree text for text."""

import pytest

from bench.serve import report, run


@pytest.mark.slow
def test_bench_serve_smoke():
    result = run(levels=(1, 3), requests=3, max_new_tokens=2, max_batch_size=4, max_wait_ms=20)
    assert sorted((r["mode"], r["concurrency"]) for r in result["rows"]) == [
        ("batched", 1), ("batched", 3), ("unbatched", 1), ("unbatched", 3)]
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in result["rows"])
    assert result["same_texts"] and result["engine"]["same_texts"] and result["engine"]["requests"] == 3
    text = report(result, (1, 3))
    assert "batched / unbatched" in text and "throughput x" in text
