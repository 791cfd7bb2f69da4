"""The OpenAI-compatible routes of labkit.serve, called with the real ``openai`` client; streaming
(also through jupyter-server-proxy) and the Prometheus metrics."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from labkit.serve import ServeConfig, demo_generator, demo_model, start
from labkit.serve.embedder import MiniLMEmbedder
from labkit.serve.engine import ByteTokenizer, GenResult, ModelGenerator
from labkit.serve.openai_api import CHAT_STOP, chat_prompt

TOKEN = "openai-test-key"
CONFIG = ServeConfig.for_scale("tiny").replace(max_prompt_chars=300, max_new_tokens=48, max_body_bytes=8192)


@pytest.fixture(scope="module")
def server():
    """The demo GPT (its model id is "demo") and MiniLM, served for this module."""
    torch.set_num_threads(1)
    with start(demo_generator(), token=TOKEN, config=CONFIG, embedder=MiniLMEmbedder()) as srv:
        yield srv


@pytest.fixture
def oai(server):
    with server.openai(max_retries=0, timeout=60) as client:
        yield client


def _stream_text(stream) -> tuple[str, list, object]:
    """The text assembled from a completions or chat stream, the chunks, and the usage chunk's usage."""
    pieces, chunks, usage = [], [], None
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else c.delta.content
            pieces.append(piece or "")
    return "".join(pieces), chunks, usage


def test_models_lists_the_gpt_and_the_embedder(oai, server):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["demo", "all-MiniLM-L6-v2"] and server.model_id == "demo"
    assert oai.models.retrieve("demo").owned_by == "labkit"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


def test_completion_is_shaped_as_openai_and_reproducible(oai, server):
    a = oai.completions.create(model="demo", prompt="def ", max_tokens=6, seed=3, temperature=1.0)
    b = oai.completions.create(model="demo", prompt="def ", max_tokens=6, seed=3, temperature=1.0)
    assert a.object == "text_completion" and a.model == "demo" and a.id.startswith("cmpl-")
    assert len(a.choices) == 1 and a.choices[0].index == 0 and a.choices[0].finish_reason == "length"
    assert a.choices[0].text == b.choices[0].text
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == (4, 6, 10)
    with server.client() as c:  # the same request as labkit's own route: the same text
        own = c.post("/generate", json={"prompt": "def ", "max_new_tokens": 6, "seed": 3}).json()
    assert own["text"] == a.choices[0].text


def test_n_choices_use_consecutive_seeds(oai):
    many = oai.completions.create(model="demo", prompt="import ", max_tokens=5, seed=10, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for j, choice in enumerate(many.choices):
        one = oai.completions.create(model="demo", prompt="import ", max_tokens=5, seed=10 + j)
        assert choice.text == one.choices[0].text
    assert many.usage.completion_tokens == 15 and many.usage.prompt_tokens == 7  # the prompt counts once
    both = oai.completions.create(model="demo", prompt=["a", "bc"], max_tokens=3, seed=1)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.prompt_tokens == 3


def test_chat_uses_the_documented_template(oai):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a sort."}]
    chat = oai.chat.completions.create(model="demo", messages=messages, max_tokens=8, seed=5)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    msg = chat.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    prompt = chat_prompt([("system", "You are terse."), ("user", "Name a sort.")])
    assert prompt == "<|system|>\nYou are terse.\n<|user|>\nName a sort.\n<|assistant|>\n"
    plain = oai.completions.create(model="demo", prompt=prompt, max_tokens=8, seed=5, stop=list(CHAT_STOP))
    assert plain.choices[0].text == msg.content and plain.usage.prompt_tokens == chat.usage.prompt_tokens
    split = [{"type": "text", "text": "Name "}, {"type": "text", "text": "a sort."}]  # content as text parts
    parts = oai.chat.completions.create(model="demo", max_tokens=8, seed=5,
                                        messages=[messages[0], {"role": "user", "content": split}])
    assert parts.choices[0].message.content == msg.content


def test_stop_strings_end_the_text_before_them(oai):
    free = oai.completions.create(model="demo", prompt="for i in ", max_tokens=40, seed=2, temperature=0.8)
    text = free.choices[0].text
    i, stop = next((i, ch) for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isprintable())
    cut = oai.completions.create(model="demo", prompt="for i in ", max_tokens=40, seed=2, temperature=0.8, stop=stop)
    assert cut.choices[0].text == text[:i] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= free.usage.completion_tokens


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_text_equals_the_answer_for_the_same_seed(oai, kind):
    if kind == "completions":
        make = lambda **kw: oai.completions.create(model="demo", prompt="class ", max_tokens=12, seed=8, **kw)
        whole = make().choices[0].text
    else:
        msgs = [{"role": "user", "content": "hello"}]
        make = lambda **kw: oai.chat.completions.create(model="demo", messages=msgs, max_tokens=12, seed=8, **kw)
        whole = make().choices[0].message.content
    text, chunks, usage = _stream_text(make(stream=True, stream_options={"include_usage": True}))
    assert text == whole
    assert len([c for c in chunks if c.choices]) >= 3  # pieces, then the chunk with the finish_reason
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and usage.completion_tokens == 12
    assert chunks[0].object == ("text_completion" if kind == "completions" else "chat.completion.chunk")


def test_stream_wire_format(server):
    with server.client() as c, c.stream("POST", "/v1/completions", json={
            "prompt": "def ", "max_tokens": 6, "seed": 1, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last  # usage only when asked


def test_embeddings_equal_labkits_embed(oai):
    from labkit.pretrained import embed

    texts = ["a cat sits on the mat", "Slurm GPU partition"]
    out = oai.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    assert out.model == "all-MiniLM-L6-v2" and [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens > 4
    got = torch.tensor([d.embedding for d in out.data])
    assert got.shape == (2, 384) and torch.allclose(got, embed(texts), atol=1e-5)
    packed = oai.embeddings.create(model="all-MiniLM-L6-v2", input="a cat sits on the mat", encoding_format="base64")
    vec = packed.data[0].embedding
    if isinstance(vec, str):  # clients that ask for base64 decode it themselves
        vec = list(struct.unpack("<384f", base64.b64decode(vec)))
    assert torch.allclose(torch.tensor(vec), got[0], atol=1e-6)


def test_wrong_key_unknown_model_and_bad_fields(server, oai):
    with server.openai(api_key="wrong", max_retries=0) as bad, pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="demo", prompt="hi")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4o", prompt="hi")
    assert e.value.code == "model_not_found" and "demo" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="demo", prompt="hi", temperature=7)
    assert e.value.param == "temperature" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="demo", prompt="hi", max_tokens=CONFIG.max_new_tokens + 1)
    assert e.value.param == "max_tokens" and str(CONFIG.max_new_tokens) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="demo", prompt="x" * (CONFIG.max_prompt_chars + 1))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        oai.completions.create(model="all-MiniLM-L6-v2", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="token ids"):
        oai.completions.create(model="demo", prompt=[1, 2, 3])
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=64)
    assert e.value.param == "dimensions"
    # fields this server does not know are ignored, as OpenAI's server does
    ok = oai.completions.create(model="demo", prompt="hi", max_tokens=2, user="ada", extra_body={"frobnicate": 1})
    assert ok.choices[0].finish_reason == "length"


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": "\\ud800"}',
                                 b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', b'{"prompt": "hi", "n": 0}'])
def test_malformed_bodies_get_openai_shaped_400(server, raw):
    with server.client() as c:
        r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_embeddings_without_embedder_is_503():
    with start(demo_generator(), token=TOKEN, config=CONFIG) as srv, srv.openai(max_retries=0) as oai:
        assert [m.id for m in oai.models.list()] == ["demo"]
        with pytest.raises(openai.InternalServerError) as e:
            oai.embeddings.create(model="all-MiniLM-L6-v2", input="x")
    assert e.value.status_code == 503 and "embedding" in e.value.message


class _SlowModel(torch.nn.Module):
    """The demo GPT, slowed down per forward pass, so a stream visibly arrives piece by piece."""

    def __init__(self, delay: float):
        super().__init__()
        self.inner = demo_model()
        self.config, self.delay = self.inner.config, delay

    def forward(self, idx, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(idx, *args, **kwargs)

    def __getattr__(self, name):  # anything else the engine asks of a GPT (e.g. a KV-cache helper)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def _slow_server(delay: float = 0.03):
    gen = ModelGenerator(_SlowModel(delay), ByteTokenizer(), name="slow")
    return start(gen, token=TOKEN, config=CONFIG)


def _timed_events(url: str, headers: dict, body: dict) -> list[tuple[float, str]]:
    """(seconds since the request, data line) for every server-sent event, as they arrive."""
    out = []
    t0 = time.perf_counter()
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append((time.perf_counter() - t0, line[6:]))
    return out


def _arrived_in_pieces(events: list[tuple[float, str]], tokens: int, delay: float) -> None:
    assert events[-1][1] == "[DONE]"
    pieces = [t for t, data in events[:-1] if json.loads(data)["choices"][0]["text"]]
    assert len(pieces) >= 2
    # the first piece arrived while most of the generation was still to come
    assert events[-1][0] - pieces[0] > 0.5 * tokens * delay, events


def test_stream_arrives_as_it_is_generated():
    with _slow_server() as srv:
        events = _timed_events(srv.url + "/v1/completions", srv.headers,
                               {"model": "slow", "prompt": "def ", "max_tokens": 20, "stream": True, "seed": 1})
    _arrived_in_pieces(events, 20, 0.03)


def test_client_disconnect_mid_stream_leaves_the_engine_serving():
    with _slow_server(0.02) as srv, srv.openai(max_retries=0) as oai:
        stream = oai.completions.create(model="slow", prompt="def ", max_tokens=40, seed=1, stream=True)
        next(iter(stream))
        stream.close()  # the client goes away after the first chunk
        after = oai.completions.create(model="slow", prompt="def ", max_tokens=3, seed=1)
        assert after.choices[0].finish_reason == "length" and srv.batcher.alive
        with srv.client() as c:
            assert c.get("/metrics.json").json()["pending"] == 0


def _samples(server) -> dict[str, float]:
    with server.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_prometheus_metrics(server, oai):
    before = _samples(server)
    oai.completions.create(model="demo", prompt="def ", max_tokens=5, seed=1)
    _stream_text(oai.completions.create(model="demo", prompt="def ", max_tokens=5, seed=1, stream=True))
    after = _samples(server)
    p = "labkit_serve_"
    key = p + 'http_requests_total{"route": "/v1/completions", "status": "200"}'
    assert after[key] - before.get(key, 0) == 2
    assert after[p + "generation_tokens_total"] - before[p + "generation_tokens_total"] == 10
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert after[p + hist + "_count"] - before[p + hist + "_count"] == 2
    assert after[p + "inter_token_latency_seconds_count"] > before[p + "inter_token_latency_seconds_count"]
    assert after[p + "batch_size_count"] > before[p + "batch_size_count"]
    assert after[p + "requests_running"] == 0 and after[p + "requests_waiting"] == 0
    assert p + "kv_cache_bytes" in after
    assert after[p + "prompt_tokens_total"] - before[p + "prompt_tokens_total"] == 8


def test_each_server_has_its_own_registry(server):
    with start(demo_generator(), token=TOKEN, config=CONFIG) as other, other.openai(max_retries=0) as oai:
        oai.completions.create(model="demo", prompt="x", max_tokens=2)
        mine = _samples(other)
    assert mine['labkit_serve_http_requests_total{"route": "/v1/completions", "status": "200"}'] == 1


@pytest.mark.browser
def test_stream_through_jupyter_server_proxy(tmp_path):
    """As a browser or a client elsewhere reaches a server in a JupyterLab session: through
    jupyter-server-proxy at <lab>/proxy/<port>/; with Accept: text/event-stream the proxy passes each
    chunk on as it comes."""
    from test_browser import TOKEN as LAB_TOKEN, Lab

    lab = Lab(tmp_path / "lab")
    with _slow_server() as srv:
        try:
            lab.start()
            port = int(srv.url.rsplit(":", 1)[1])
            url = f"{lab.base}/proxy/{port}/v1/completions?token={LAB_TOKEN}"
            headers = {**srv.headers, "Accept": "text/event-stream"}
            events = _timed_events(url, headers, {"model": "slow", "prompt": "def ", "max_tokens": 20,
                                                  "stream": True, "seed": 1})
            direct = _timed_events(srv.url + "/v1/completions", headers,
                                   {"model": "slow", "prompt": "def ", "max_tokens": 20, "stream": True, "seed": 1})
        finally:
            lab.stop()
    _arrived_in_pieces(events, 20, 0.03)
    text = lambda evs: "".join(json.loads(d)["choices"][0]["text"] for _, d in evs[:-1])
    assert text(events) == text(direct)


def test_stream_load_times_each_piece(server, oai):
    from labkit.serve import run_stream_load
    from labkit.widgets.serving import stream_latency_figure

    r = run_stream_load(oai, model="demo", requests=6, concurrency=3, max_tokens=5, first_seed=4)
    assert len(r.timings) == 6 and all(0 < t.ttft <= t.seconds for t in r.timings)
    alone = oai.completions.create(model="demo", prompt="def ", max_tokens=5, seed=5).choices[0].text
    assert r.timings[1].text == alone  # request i used seed first_seed + i
    summary = r.summary()
    assert summary["requests"] == 6 and 0 < summary["ttft_p50_ms"] <= summary["ttft_p95_ms"]
    fig = stream_latency_figure([r])
    assert len(fig.data) == 2 and len(fig.data[0].y) == 6 and len(fig.data[1].y) == len(r.gaps)


def test_served_model_name_and_tls(tmp_path):
    import argparse

    from labkit.serve.cli import add_arguments, job_serve_args
    from labkit.serve.server import default_model_id
    from labkit.serve.tls import self_signed

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--demo", "--served-model-name", "lab-gpt"])
    assert job_serve_args(args, None)[-2:] == ["--served-model-name", "lab-gpt"]  # a Slurm job keeps the name
    assert default_model_id({"model": "step_00000500.pt"}) == "step_00000500"
    assert default_model_id({"model": "demo (tiny GPT, random weights, byte tokens)"}) == "demo"
    cert, key = self_signed(tmp_path)
    with start(demo_generator(), token=TOKEN, config=CONFIG, model_id="lab-gpt", certfile=cert, keyfile=key) as srv:
        with srv.openai(max_retries=0) as oai:  # trusts exactly this server's certificate
            assert [m.id for m in oai.models.list()] == ["lab-gpt"]
            assert oai.completions.create(model="lab-gpt", prompt="x", max_tokens=2).model == "lab-gpt"
        with srv.client() as c:
            assert c.get("/health").json()["model_id"] == "lab-gpt"


class _Broken:
    """A generator whose model fails at every step (a lost GPU, say)."""

    def generate(self, requests, on_token=None):
        raise RuntimeError("the GPU fell off the bus")

    def count_tokens(self, text):
        return len(text)

    def info(self):
        return {"model": "broken"}


def test_an_engine_failure_is_an_openai_shaped_error():
    with start(_Broken(), token=TOKEN, config=CONFIG) as srv, srv.openai(max_retries=0) as oai:
        with pytest.raises(openai.InternalServerError) as e:
            oai.completions.create(model="broken", prompt="hi", max_tokens=2)
        assert e.value.status_code == 500 and "GPU fell off" in e.value.message
        with pytest.raises(openai.APIError, match="GPU fell off"):  # the stream had started: an error event
            _stream_text(oai.completions.create(model="broken", prompt="hi", max_tokens=2, stream=True))
        assert srv.batcher.alive


def test_openai_client_against_the_cli_server(tmp_path):
    """`labkit serve` in its own process, as a user starts it, called with the openai client."""
    repo = Path(__file__).resolve().parent.parent
    url_file = tmp_path / "url"
    env = {**os.environ, "PYTHONPATH": str(repo), "LABKIT_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--demo", "--port", "0", "--no-embed",
                             "--url-file", str(url_file), "--served-model-name", "cli-gpt"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not url_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        url = url_file.read_text().strip()
        with openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0) as oai:
            assert [m.id for m in oai.models.list()] == ["cli-gpt"]
            whole = oai.completions.create(model="cli-gpt", prompt="def ", max_tokens=8, seed=2).choices[0].text
            text, _, _ = _stream_text(oai.completions.create(model="cli-gpt", prompt="def ", max_tokens=8, seed=2,
                                                             stream=True))
            assert text == whole
        scraped = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        assert 'labkit_serve_http_requests_total{route="/v1/completions",status="200"} 2.0' in scraped
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and f"{url}/v1" in out and "'cli-gpt'" in out, out


class _Held(_Broken):
    """A generator that holds the engine until released, then answers each prompt with itself."""

    def __init__(self):
        self.release = threading.Event()

    def generate(self, requests, on_token=None):
        self.release.wait(30)
        return [GenResult(r.prompt, 1, 1) for r in requests]


def test_a_full_queue_is_429_rate_limit():
    gen = _Held()
    config = CONFIG.replace(max_queue=1, max_batch_size=1, max_wait_ms=1)
    with start(gen, token=TOKEN, config=config) as srv, srv.openai(max_retries=0) as oai:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(oai.completions.create, model="broken", prompt="a", max_tokens=1)
            deadline = time.monotonic() + 10
            while srv.batcher.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # the first request holds the engine
            second = pool.submit(oai.completions.create, model="broken", prompt="b", max_tokens=1)
            while srv.batcher.pending == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # the second one waits in the queue, which is now full
            with pytest.raises(openai.RateLimitError) as e:
                oai.completions.create(model="broken", prompt="c", max_tokens=1)
            gen.release.set()
            assert [f.result(30).choices[0].text for f in (first, second)] == ["a", "b"]
    assert e.value.status_code == 429 and e.value.code == "queue_full"
    assert e.value.response.headers["retry-after"] == "1"
