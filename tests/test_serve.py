"""labkit.serve against a running server, through a real HTTP client (httpx) on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from labkit.serve import ServeConfig, demo_generator, demo_model, start
from labkit.serve.embedder import MiniLMEmbedder
from labkit.serve.checkpoints import NoCheckpoint, load_generator, newest_checkpoint
from labkit.serve.engine import Batcher, ByteTokenizer, GenRequest, GenResult, ModelGenerator, QueueFull, ShuttingDown
from labkit.serve.server import resolve_token
from labkit.serve.tls import self_signed

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-123"
CONFIG = ServeConfig.for_scale("tiny").replace(max_prompt_chars=200, max_new_tokens=24, max_body_bytes=4096)


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    srv = start(demo_generator(), token=TOKEN, config=CONFIG, embedder=MiniLMEmbedder())
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def test_health_needs_no_token(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["vocab_size"] == 256 and body["device"] == "cpu"


@pytest.mark.parametrize("method,path", [("post", "/generate"), ("post", "/embed"), ("get", "/metrics"),
                                         ("get", "/metrics.json"), ("get", "/openapi.json")])
def test_auth_refused_without_or_with_wrong_token(server, method, path):
    body = {"prompt": "hi"} if path == "/generate" else {"texts": ["hi"]} if path == "/embed" else None
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        r = httpx.request(method, server.url + path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.json()["error"]


def test_auth_accepted(client):
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    assert client.get("/metrics").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/generate", "/embed", "/health", "/metrics", "/metrics.json", "/v1/completions", "/v1/chat/completions",
            "/v1/models", "/v1/embeddings"} <= set(schema["paths"])
    assert "HTTPBearer" in json.dumps(schema["components"]["securitySchemes"])


def test_token_from_env_or_generated():
    assert resolve_token("given", {"LABKIT_SERVE_TOKEN": "env"}) == ("given", False)
    assert resolve_token(None, {"LABKIT_SERVE_TOKEN": "env"}) == ("env", False)
    a, generated = resolve_token(None, {})
    b, _ = resolve_token(None, {})
    assert generated and a != b and len(a) >= 24


def test_limits_are_enforced_and_named(client):
    r = client.post("/generate", json={"prompt": "x" * 201})
    assert r.status_code == 422 and "200" in r.json()["error"] and "prompt" in r.json()["error"]
    r = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 25})
    assert r.status_code == 422 and "24" in r.json()["error"] and "max_new_tokens" in r.json()["error"]
    r = client.post("/generate", content=b'{"prompt": "' + b"y" * 5000 + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        for _ in range(10):
            yield b"z" * 1000

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/embed", json={"texts": ["a"] * (CONFIG.max_embed_texts + 1)})
    assert r.status_code == 422 and str(CONFIG.max_embed_texts) in r.json()["error"]


@pytest.mark.parametrize("raw", [
    b"{not json", b"", b"[]", b"null", b'"prompt"', b'{"prompt": 5}', b'{"prompt": ""}',
    b'{"prompt": "hi", "extra": 1}', b'{"prompt": "\\ud800"}', b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "hi", "temperature": -1}', b'{"prompt": "hi", "seed": -3}', b'{"prompt": "hi", "top_k": 0}',
    b'{"prompt": "hi", "seed": 99999999999999999999999}', b"\xff\xfe\x00", b'{"\\udfff": 1}',
])
def test_malformed_bodies_get_4xx(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
    assert r.json()["error"]


def test_same_seed_same_text(client):
    body = {"prompt": "The cluster", "max_new_tokens": 12, "temperature": 1.0, "seed": 42}
    a = client.post("/generate", json=body).json()
    b = client.post("/generate", json=body).json()
    c = client.post("/generate", json={**body, "seed": 43}).json()
    assert a["text"] == b["text"] and a["seed"] == 42 and a["new_tokens"] == 12
    assert c["text"] != a["text"]
    # without a seed the server picks one and says which, so the answer can be reproduced
    free = client.post("/generate", json={"prompt": "The cluster", "max_new_tokens": 12}).json()
    again = client.post("/generate", json={**body, "seed": free["seed"]}).json()
    assert again["text"] == free["text"]


def test_embed_with_minilm(client):
    r = client.post("/embed", json={"texts": ["a cat sits on the mat", "a kitten sits on a rug", "Slurm GPU partition"]})
    assert r.status_code == 200, r.text
    body = r.json()
    v = torch.tensor(body["embeddings"])
    assert body["dim"] == 384 and v.shape == (3, 384) and body["model"] == "all-MiniLM-L6-v2"
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-4)
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # meaning, not letters, decides
    from labkit.pretrained import embed

    direct = embed(["a cat sits on the mat", "a kitten sits on a rug", "Slurm GPU partition"])
    assert torch.allclose(v, direct, atol=1e-5)  # the API serves what labkit.pretrained computes


def test_embed_unavailable_is_503_not_500():
    with start(demo_generator(), token=TOKEN, config=CONFIG) as srv, srv.client() as c:
        r = c.post("/embed", json={"texts": ["x"]})
    assert r.status_code == 503 and "embedding" in r.json()["error"]


def _requests():
    reqs = []
    for i in range(12):
        prompt = ["Hello", "GPU nodes", "Hi"][i % 3]  # three token lengths -> three groups
        reqs.append({"prompt": prompt, "max_new_tokens": 4 + i % 5, "temperature": [1.0, 0.7, 0.0][i % 3],
                     "top_k": [None, 5, None, 50][i % 4], "seed": 1000 + i})
    return reqs


def test_concurrent_batched_equals_sequential_unbatched():
    reqs = _requests()
    with start(demo_generator(), token=TOKEN, config=CONFIG.replace(max_batch_size=1)) as solo:
        with solo.client() as c:
            sequential = [c.post("/generate", json=b).json()["text"] for b in reqs]
    with start(demo_generator(), token=TOKEN, config=CONFIG.replace(max_batch_size=8, max_wait_ms=200)) as srv:
        with ThreadPoolExecutor(len(reqs)) as pool:
            def call(body):
                with srv.client() as c:
                    return c.post("/generate", json=body).json()["text"]

            concurrent = list(pool.map(call, reqs))
        with srv.client() as c:
            m = c.get("/metrics.json").json()
    assert concurrent == sequential
    assert m["max_batch_size_seen"] > 1, "the concurrent requests were never batched"
    assert m["max_batch_size_seen"] <= 8
    assert m["requests_by_route"]["/generate"] == len(reqs)


def test_metrics_count_requests_latency_and_tokens(client):
    before = client.get("/metrics.json").json()
    for s in range(3):
        client.post("/generate", json={"prompt": "abc", "max_new_tokens": 5, "seed": s})
    client.post("/generate", json={"prompt": ""})
    m = client.get("/metrics.json").json()
    assert m["requests_by_route"]["/generate"] - before["requests_by_route"].get("/generate", 0) == 4
    assert m["generated_tokens"] - before["generated_tokens"] == 15
    assert m["responses_by_status"]["422"] >= 1
    lat = m["latency"]["/generate"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    assert m["tokens_per_second"] > 0


def test_tls_with_self_signed_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with start(demo_generator(), token=TOKEN, config=CONFIG, certfile=cert, keyfile=key) as srv:
        assert srv.url.startswith("https://")
        with srv.client() as c:  # verifies against the self-signed certificate
            assert c.post("/generate", json={"prompt": "tls", "max_new_tokens": 3}).status_code == 200
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by default
            httpx.get(srv.url + "/health")
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(srv.url.replace("https://", "http://") + "/health")
    with pytest.raises(ValueError, match="both certfile and keyfile"):
        start(demo_generator(), certfile=cert)


def test_clean_shutdown_finishes_requests_in_flight():
    srv = start(demo_generator(), token=TOKEN, config=CONFIG.replace(max_wait_ms=300))
    result = {}

    def slow_call():
        with srv.client() as c:
            result["r"] = c.post("/generate", json={"prompt": "bye", "max_new_tokens": 20, "seed": 1})

    t = threading.Thread(target=slow_call)
    t.start()
    deadline = time.time() + 10
    while srv.batcher.pending == 0 and not result and time.time() < deadline:
        time.sleep(0.01)  # the request waits in the batcher now
    srv.stop()
    t.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["new_tokens"] == 20
    assert not srv.running and not srv.batcher.alive
    host, port = srv.url.rsplit("//", 1)[1].split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2)
    srv.stop()  # stopping twice is harmless


def test_port_in_use_is_a_clear_error(server):
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="port"):
        start(demo_generator(), port=port, token=TOKEN, timeout=10)


class _Slow:
    def __init__(self):
        self.release = threading.Event()
        self.batches = []

    def generate(self, requests):
        self.batches.append(len(requests))
        self.release.wait(10)
        return [GenResult(r.prompt, 1, 0) for r in requests]


def test_batcher_queue_limit_and_stop():
    gen = _Slow()
    b = Batcher(gen, max_batch_size=2, max_wait_ms=1, max_queue=2)
    first = b.submit(GenRequest("a"))
    time.sleep(0.2)  # the first batch is running and holds the thread
    queued = [b.submit(GenRequest(x)) for x in "bc"]
    with pytest.raises(QueueFull, match="max_queue"):
        b.submit(GenRequest("d"))
    gen.release.set()
    assert first.result(5).text == "a" and [f.result(5).text for f in queued] == ["b", "c"]
    assert gen.batches == [1, 2]
    b.stop()
    with pytest.raises(ShuttingDown):
        b.submit(GenRequest("e"))


def test_a_batch_is_counted_before_its_callers_are_answered():
    """A /metrics read right after a response must include that response's tokens."""
    gen = _Slow()
    gen.release.set()
    futures = []
    answered_when_counted = []
    b = Batcher(gen, max_batch_size=1, max_wait_ms=1,
                on_batch=lambda size, tokens, seconds: answered_when_counted.append(futures[-1].done()))
    for p in "abc":
        futures.append(b.submit(GenRequest(p)))
        futures[-1].result(5)
    b.stop()
    assert answered_when_counted == [False, False, False]


class _Picky(_Slow):
    def generate(self, requests):
        if any(r.prompt == "bad" for r in requests):
            raise ValueError("bad prompt")
        return super().generate(requests)


def test_one_bad_request_does_not_fail_its_batch():
    gen = _Picky()
    gen.release.set()
    b = Batcher(gen, max_batch_size=4, max_wait_ms=200)
    futures = [b.submit(GenRequest(p)) for p in ("ok1", "bad", "ok2")]
    assert futures[0].result(5).text == "ok1" and futures[2].result(5).text == "ok2"
    with pytest.raises(ValueError, match="bad prompt"):
        futures[1].result(5)
    b.stop()


def test_checkpoint_serves_like_the_model(tmp_path):
    from labkit.checkpoint import save

    model = demo_model(seed=3)
    runs = tmp_path / "runs"
    old = save(demo_model(seed=4), runs / "a" / "old.pt")
    new = save(model, runs / "b" / "ckpt.pt")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert newest_checkpoint(runs) == new
    broken = runs / "c" / "step_00000009.pt"  # newest, but truncated: skipped
    broken.parent.mkdir()
    broken.write_bytes(new.read_bytes()[:-10])
    assert newest_checkpoint(runs) == new
    gen = load_generator(runs)
    req = GenRequest("checkpoint", 6, 0.9, 20, 7)
    ref = ModelGenerator(model, ByteTokenizer())
    assert gen.generate([req]) == ref.generate([req])
    with pytest.raises(NoCheckpoint, match="--demo"):
        newest_checkpoint(tmp_path / "nothing")


def test_serve_finds_what_06_saves_under_new_run_dir(tmp_path, monkeypatch):
    """06 trains into new_run_dir("gpt", scale)/checkpoints, 07 saves into new_run_dir("pruned", scale);
    08 and `labkit serve` pick the newest of them under the runs folder."""
    from datetime import datetime

    from labkit.config import new_run_dir
    from labkit.checkpoint import save
    from labkit.serve.checkpoints import pick_generator
    from labkit.serve.cli import default_run_dir
    from labkit.checkpoint import FileCheckpointer
    from labkit.strategy import SingleProcess
    from labkit.train import TrainConfig

    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))
    pruned = save(demo_model(seed=4), new_run_dir("pruned", "tiny", now=datetime(2026, 1, 1, 9)) / "pruned.pt")
    os.utime(pruned, (time.time() - 100, time.time() - 100))
    workdir = new_run_dir("gpt", "tiny")
    assert workdir.parent == tmp_path / "runs" / "gpt-tiny"
    model = demo_model(seed=3)
    config = TrainConfig.for_scale("tiny").replace(checkpoint_dir=str(workdir / "checkpoints"))
    run = SimpleNamespace(strategy=SingleProcess(), wrapped=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          rank=0, world_size=1, config=config, model_config=model.config, tokenizer_json=None)
    saved = Path(FileCheckpointer(config.checkpoint_dir).save(run, 5))  # what training writes at step 5
    assert newest_checkpoint(default_run_dir()) == saved
    gen, why = pick_generator(None, [default_run_dir()])
    assert str(saved) in why
    req = GenRequest("run dir", 6, 0.9, 20, 7)
    assert gen.generate([req]) == ModelGenerator(model, ByteTokenizer()).generate([req])
    os.utime(pruned, None)  # 07 ran after 06: the pruned model is served
    assert newest_checkpoint(default_run_dir()) == pruned


def test_cli_demo_serves_and_stops_on_sigterm(tmp_path):
    url_file = tmp_path / "url"
    env = {k: v for k, v in os.environ.items() if k != "LABKIT_SERVE_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--demo", "--port", "0", "--no-embed",
                             "--url-file", str(url_file)], env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # the generated token is shown once, at start
            lines.append(line)
            if line.startswith("token"):
                break
        token = lines[-1].rsplit(" ", 1)[1].strip()
        assert url_file.exists()  # written before the server announces itself
        url = url_file.read_text().strip()
        assert httpx.post(url + "/generate", json={"prompt": "cli"}).status_code == 401
        r = httpx.post(url + "/generate", json={"prompt": "cli", "max_new_tokens": 3},
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["new_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    out = "".join(lines) + out
    assert proc.returncode == 0, out
    assert "stopped" in out and out.count(token) == 1 and url in out


def test_cli_without_checkpoint_explains(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABKIT_RUN_DIR": str(tmp_path / "runs")}
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no checkpoint" in out and "--demo" in out and "train" in out


def _unservable(kind: str, path: Path) -> Path:
    from labkit.checkpoint import save
    from labkit.model import GPT, GPTConfig

    if kind == "junk":
        path.write_bytes(b"PK\x03\x04 not a checkpoint at all")
        return path
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=300, precision="float32"))
    saved = save(model, path)  # a BPE-sized vocabulary, and no tokenizer saved with it
    if kind == "truncated":
        saved.write_bytes(saved.read_bytes()[:-7])
    return saved


@pytest.mark.parametrize("kind,says", [
    ("no-tokenizer", ["carries no tokenizer", "tokenizer=", "shards"]),
    ("junk", ["not a labkit checkpoint", "--demo"]),
    ("truncated", ["truncated", "--demo"]),
])
def test_cli_unservable_checkpoint_is_one_clear_line(tmp_path, kind, says):
    path = _unservable(kind, tmp_path / "model.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABKIT_RUN_DIR": str(tmp_path / "runs")}
    r = subprocess.run([sys.executable, "-m", "labkit", "serve", str(path), "--no-embed", "--port", "0"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and out.strip().count("\n") == 0, out
    assert out.startswith("error: ") and str(path) in out and all(s in out for s in says), out


def test_checkpoint_with_its_bpe_tokenizer_over_http(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from labkit.checkpoint import save
    from labkit.model import GPT, GPTConfig

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    corpus = ["the cluster runs the model", "a GPU node serves tokens", "the model answers the user"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=tok.get_vocab_size(),
                          precision="float32"))
    path = save(model, tmp_path / "runs" / "step_00000001.pt", tokenizer=tok)
    with start(load_generator(path), token=TOKEN, config=CONFIG) as srv, srv.client() as c:
        assert c.get("/health").json()["vocab_size"] == tok.get_vocab_size()
        long_prompt = "the cluster runs the model " * 3  # longer than block_size 8: the last 8 tokens are kept
        r = c.post("/generate", json={"prompt": long_prompt, "max_new_tokens": 5, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["prompt_tokens"] == len(tok.encode(long_prompt).ids) == 15
        assert r.json()["new_tokens"] == 5 and r.json()["text"].strip()
        # whitespace only: this tokenizer makes no tokens of it -> 422 that says so, not 500
        r = c.post("/generate", json={"prompt": "   "})
        assert r.status_code == 422 and "no tokens" in r.json()["error"]


def test_device_choice(monkeypatch):
    from labkit.serve.cli import pick_device

    assert pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no GPU"):  # refused before any model is loaded
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node (mocked: none here)
    assert pick_device("auto") == "cuda" and pick_device("cuda:1") == "cuda:1"


def test_sample_rows_follows_the_distribution():
    from labkit.serve.engine import sample_rows

    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log().repeat(3, 1)
    g = [torch.Generator().manual_seed(s) for s in range(3)]
    counts = torch.zeros(3, 4)
    for _ in range(3000):
        for row, tok in enumerate(sample_rows(logits, [1.0, 1.0, 0.0], [None, 2, None], g)):
            counts[row, tok] += 1
    freq = counts / 3000
    assert torch.allclose(freq[0], probs, atol=0.03)                       # plain sampling
    assert freq[1, 2:].sum() == 0 and abs(freq[1, 0] - 0.6 / 0.85) < 0.03  # top-2 renormalised
    assert freq[2, 0] == 1.0                                               # temperature 0: greedy
    hot = sample_rows(torch.tensor([[1e4, 0.0]]), [1e-300], [None], g[:1])  # no NaN at tiny temperatures
    assert hot == [0]


def test_pick_generator_prefers_the_newest_checkpoint_then_demo(tmp_path):
    from labkit.checkpoint import save
    from labkit.serve import pick_generator

    gen, why = pick_generator(None, [tmp_path / "a", tmp_path / "b"])
    assert "demo" in why and gen.info()["vocab_size"] == 256
    save(demo_model(seed=1), tmp_path / "a" / "x" / "step_00000001.pt")
    newest = save(demo_model(seed=2), tmp_path / "b" / "step_00000002.pt")
    gen, why = pick_generator(None, [tmp_path / "a", tmp_path / "b"])
    assert str(newest) in why and gen.name == newest.name


def test_pruned_shape_checkpoint_serves(tmp_path):
    from labkit.checkpoint import save
    from labkit.model import GPT, GPTConfig

    torch.manual_seed(0)  # a structurally pruned GPT: fewer heads and a narrower FFN per layer
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, precision="float32",
                    layer_heads=(1, 2), layer_ffn=(40, 96))
    path = save(GPT(cfg), tmp_path / "pruned.pt")
    with start(load_generator(path), token=TOKEN, config=CONFIG) as srv, srv.client() as c:
        body = {"prompt": "pruned", "max_new_tokens": 6, "seed": 3}
        first, second = (c.post("/generate", json=body).json() for _ in range(2))
    assert first["new_tokens"] == 6 and first["text"] == second["text"]


def test_pruned_bpe_model_saved_as_notebook_07_does_is_served(tmp_path):
    from labkit.data.shards import ShardReader, make_tiny_shards, tiny_text
    from labkit.checkpoint import save
    from labkit.model import GPT, GPTConfig
    from labkit.prune import prune_ffn, prune_heads
    from labkit.prune.evaluate import val_windows
    from labkit.serve import pick_generator
    from labkit.serve.checkpoints import HFTokenizer

    shards = tmp_path / "shards"  # a real BPE vocabulary (not bytes), as 03_preprocessing makes
    make_tiny_shards(shards, tiny_text(60_000), vocab_size=300)
    tok = ShardReader(shards, "train").tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=tok.get_vocab_size(),
                          precision="float32")).eval()
    val = val_windows(ShardReader(shards, "val"), 32, 4)
    pruned = prune_ffn(prune_heads(model, 0.5, importance="gradient", data=val), 0.5)
    assert sum(pruned.config.layer_heads) == 4 and sum(pruned.config.layer_ffn) == 128
    # as 07 saves it: with the tokenizer of its shards, under the lab's runs/ folder
    runs = tmp_path / "runs"
    path = save(pruned, runs / "pruned-tiny" / "20261128-170000" / "pruned.pt",
                tokenizer=ShardReader(shards, "train").tokenizer())
    gen, why = pick_generator(None, [runs])  # what 08_serving and a bare `labkit serve` do
    assert str(path) in why and gen.info()["vocab_size"] == 300
    prompt = "def parse_args(parser, namespace):"
    ref = ModelGenerator(pruned, HFTokenizer(tok)).generate([GenRequest(prompt, 6, 0.8, 20, 2)])[0]
    with start(gen, token=TOKEN, config=CONFIG) as srv, srv.client() as c:
        r = c.post("/generate", json={"prompt": prompt, "max_new_tokens": 6, "temperature": 0.8, "top_k": 20,
                                      "seed": 2})
    assert r.status_code == 200, r.text
    assert r.json()["prompt_tokens"] == len(tok.encode(prompt).ids) < len(prompt.encode())  # BPE, not bytes
    assert r.json()["new_tokens"] == 6 and r.json()["text"] == ref.text


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.shapes = model, model.config, []

    def forward(self, idx):
        self.shapes.append(tuple(idx.shape))
        return self.inner(idx)


def test_rows_of_different_lengths_catch_up_and_share_passes():
    counting = _CountingModel(demo_model())
    gen = ModelGenerator(counting, ByteTokenizer())
    reqs = [GenRequest("ab", 8, 1.0, None, 1), GenRequest("abcde", 5, 0.8, 4, 2), GenRequest("x" * 30, 1, 1.0, None, 3)]
    together = gen.generate(reqs)
    shapes = list(counting.shapes)
    alone = [gen.generate([r])[0] for r in reqs]
    assert together == alone  # catching up changes no text
    # "ab" runs alone for 3 steps until it is as long as "abcde"; then both share 5 passes.
    # The 30-byte prompt cannot be reached before "ab" finishes, so it runs in the first pass.
    assert shapes[:4] == [(1, 2), (1, 30), (1, 3), (1, 4)]
    assert shapes[4:] == [(2, 5), (2, 6), (2, 7), (2, 8), (2, 9)]
