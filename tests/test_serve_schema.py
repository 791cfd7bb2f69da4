"""schemathesis (v4) fuzzes the served OpenAPI schema on loopback (labkit's routes and the OpenAI-compatible
/v1 ones): no input may cause a 5xx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.serve import MiniLMEmbedder, ServeConfig, demo_generator, start
from conftest import skip_unless_ci

TOKEN = "schema-token"


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(tmp_path):
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    if not Path(st).exists():
        skip_unless_ci("schemathesis' st command is not installed (pip install schemathesis)")
    config = ServeConfig.for_scale("tiny").replace(max_new_tokens=8, max_prompt_chars=64, max_embed_texts=4)
    embedder = MiniLMEmbedder()
    embedder.embed(["warm up"])  # load MiniLM before the clock of the fuzzer starts
    with start(demo_generator(), token=TOKEN, config=config, embedder=embedder) as srv:
        with srv.client() as c:
            schema = c.get("/openapi.json").json()
        (tmp_path / "openapi.json").write_text(json.dumps(schema))
        r = subprocess.run(
            [st, "run", str(tmp_path / "openapi.json"), "--url", srv.url, "-H", f"Authorization: Bearer {TOKEN}",
             "--checks", "not_a_server_error", "--max-examples", "25", "--phases", "examples,coverage,fuzzing",
             "--seed", "1", "--workers", "1", "--generation-database", "none", "--no-color",
             "--request-timeout", "30"],
            capture_output=True, text=True, timeout=400, cwd=tmp_path,
        )
        with srv.client() as c:
            seen = c.get("/metrics.json").json()
    statuses, routes = seen["responses_by_status"], seen["requests_by_route"]
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert not any(s.startswith("5") for s in statuses), statuses
    assert sum(int(n) for s, n in statuses.items() if s.startswith("4")) > 10, statuses  # bad input was sent
    openai_routes = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models"}
    assert all(routes.get(r, 0) > 10 for r in openai_routes), routes  # the OpenAI-compatible routes were fuzzed too
