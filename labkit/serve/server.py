"""Run the API in a background thread (notebooks, tests) or in the foreground (CLI, Slurm job)."""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from .app import build_app, wrap
from .config import ServeConfig
from .engine import Batcher, Generator
from .metrics import Metrics

TOKEN_ENV = "LABKIT_SERVE_TOKEN"


@dataclass
class Server:
    """A running server: ``url``, ``token``, ``client()``, ``openai()``, ``stop()``; also a context manager."""

    url: str
    token: str
    token_generated: bool
    certfile: str | None
    batcher: Batcher
    metrics: Metrics
    _uvicorn: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    model_id: str = "labkit-gpt"

    def __repr__(self) -> str:  # never shows the token
        state = "running" if self.running else "stopped"
        return f"<labkit serve {self.url} {state}>"

    @property
    def running(self) -> bool:
        """Whether the HTTP thread still serves."""
        return self._thread.is_alive()

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header to send."""
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client with the base URL, the token and, under TLS, this server's certificate."""
        kwargs.setdefault("timeout", 60.0)
        if self.certfile:
            kwargs.setdefault("verify", ssl.create_default_context(cafile=self.certfile))
        return httpx.Client(base_url=self.url, headers=self.headers, **kwargs)

    def openai(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this server's ``/v1`` routes (the token as the API key;
        under TLS, trusting this server's certificate). Needs ``pip install openai``."""
        import openai  # lazy: only where an OpenAI client is wanted

        if self.certfile:
            kwargs.setdefault("http_client", httpx.Client(verify=ssl.create_default_context(cafile=self.certfile)))
        kwargs.setdefault("api_key", self.token)
        return openai.OpenAI(base_url=self.url + "/v1", **kwargs)

    def request_stop(self) -> None:
        """Ask the server to stop soon (safe from a signal handler); ``wait()`` returns after."""
        self._uvicorn.should_exit = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish, then stop the batching thread."""
        self._uvicorn.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._uvicorn.force_exit = True
            self._thread.join(5)
        self.batcher.stop(timeout)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def resolve_token(token: str | None = None, environ: dict | None = None) -> tuple[str, bool]:
    """The token to require: given, else ``$LABKIT_SERVE_TOKEN``, else a fresh random one (flag True)."""
    env = os.environ if environ is None else environ
    token = token or env.get(TOKEN_ENV)
    if token:
        return token, False
    return secrets.token_urlsafe(24), True


def _public_host(host: str) -> str:
    """The name other machines reach this one by, when listening on all interfaces."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    fqdn = socket.getfqdn()
    return fqdn if "." in fqdn and not fqdn.startswith("localhost") else socket.gethostname()


def default_model_id(info: dict) -> str:
    """The id OpenAI clients pass as ``model``: the generator's name up to any parenthesis, without
    a ``.pt`` suffix, spaces as dashes (``demo``, ``step_00000500``, ``pruned``)."""
    name = str(info.get("model") or "labkit-gpt").split(" (")[0].strip()
    name = name[:-3] if name.endswith(".pt") else name
    return "-".join(name.split()) or "labkit-gpt"


def start(generator: Generator, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None,
          config: ServeConfig | None = None, embedder: Any = None, timeout: float = 30.0,
          model_id: str | None = None) -> Server:
    """Serve ``generator`` in a background thread and return once it answers; ``port=0`` picks a free port.
    ``model_id`` names the GPT on the OpenAI-compatible routes (default: ``default_model_id``)."""
    config = config or ServeConfig()
    if (certfile is None) != (keyfile is None):
        raise ValueError("TLS needs both certfile and keyfile (or neither for plain HTTP)")
    for f in (certfile, keyfile):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"TLS file {f} does not exist; make one with labkit.serve.tls.self_signed()")
    token, generated = resolve_token(token)
    if config.torch_threads:
        import torch  # lazy: torch (~2 s import); `labkit serve --slurm` imports this module only to submit

        torch.set_num_threads(config.torch_threads)
    metrics = Metrics()
    batcher = Batcher(generator, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
                      max_queue=config.max_queue, on_batch=metrics.record_batch, mode=config.batching)
    metrics.bind(batcher)
    info = dict(generator.info())
    info["model_id"] = model_id = model_id or default_model_id(info)
    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    info["max_batch_size"] = config.max_batch_size
    app = build_app(batcher, token=token, config=config, metrics=metrics, embedder=embedder, info=info,
                    model_id=model_id)
    uv_config = uvicorn.Config(
        wrap(app, config=config, metrics=metrics), host=host, port=port, log_level="warning",
        ssl_certfile=str(certfile) if certfile else None, ssl_keyfile=str(keyfile) if keyfile else None,
        timeout_graceful_shutdown=config.request_timeout_s, access_log=False,
        limit_concurrency=config.max_connections,
    )
    uv = uvicorn.Server(uv_config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            uv.run()
        except BaseException as exc:  # noqa: BLE001 - SystemExit from uvicorn when it cannot bind
            errors.append(exc)

    thread = threading.Thread(target=run, name="labkit-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            uv.should_exit = True
            batcher.stop()
            why = repr(errors[0]) if errors else f"no answer within {timeout} s"
            raise RuntimeError(
                f"the server did not start on {host}:{port} ({why}); is the port in use? "
                "pick another with port=N, or port=0 for a free one"
            )
        time.sleep(0.02)
    bound = uv.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if certfile else "http"
    url = f"{scheme}://{_public_host(host)}:{bound}"
    return Server(url, token, generated, str(certfile) if certfile else None, batcher, metrics, uv, thread,
                  model_id=model_id)
