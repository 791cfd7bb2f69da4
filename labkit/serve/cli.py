"""``labkit serve``: serve a checkpoint (or ``--demo``) over HTTP, here or as a Slurm job (``--slurm``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from labkit.config import ConfigError, load_config, runs_dir
from labkit.core.crypto import Encryption, EncryptionKeyError

from .config import ServeConfig
from .tls import self_signed

RUN_DIR_ENV = "LABKIT_RUN_DIR"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def default_run_dir() -> Path:
    """Where training writes runs: ``labkit.config.runs_dir()`` (``$LABKIT_RUN_DIR``, else the lab's ``runs/``)."""
    return runs_dir()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``labkit serve``."""
    p.add_argument("checkpoint", nargs="?", help="checkpoint file or run directory "
                   f"(default: the newest checkpoint under ${RUN_DIR_ENV}, else the lab's runs/ folder)")
    p.add_argument("--demo", action="store_true", help="serve a tiny random GPT with a byte tokenizer (no checkpoint)")
    p.add_argument("--host", help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 = all; "
                   "a --slurm job always listens on all of its node's)")
    p.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT}; 0 = any free port; "
                   "with --slurm the default is 0)")
    p.add_argument("--cert", help="TLS certificate (PEM); needs --key (with --slurm: a path the node can read)")
    p.add_argument("--key", help="TLS private key (PEM); needs --cert")
    p.add_argument("--key-file", help="at-rest key of an encrypted checkpoint (mode 0600; `labkit key new`), "
                   "decrypted in memory; default: $LABKIT_KEY_FILE or $LABKIT_DATA_KEY when set. Not the TLS --key")
    p.add_argument("--self-signed", metavar="DIR", help="make a self-signed certificate in DIR and serve TLS with it "
                   "(with --slurm: the job makes one for its node when the profile sets tls)")
    p.add_argument("--scale", help="scale preset for the limits (tiny, binder, workshop, full; default: active)")
    p.add_argument("--max-batch-size", type=int, help="requests per batch (1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, help="how long a request waits for companions")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--no-embed", action="store_true", help="do not offer /embed and /v1/embeddings (MiniLM)")
    p.add_argument("--served-model-name", help="the model id OpenAI clients send as 'model' (default: the "
                   "checkpoint's file name without .pt, or 'demo')")
    p.add_argument("--url-file", help="write the URL here once the server answers (used by --slurm)")
    p.add_argument("--slurm", action="store_true", help="submit the server as a Slurm job via the slurm profile")
    p.add_argument("--profile", default=None, help="cluster profile for --slurm (default: slurm)")


def pick_device(name: str = "auto") -> str:
    """The device name to serve on (``labkit.model.resolve_device``): ``auto`` = a GPU when torch sees
    one, else cpu; ``cuda`` where there is no GPU is refused with what to use instead."""
    from labkit.model import resolve_device  # lazy: torch (~2 s import); `labkit --help` imports this module

    return str(resolve_device(name))


def _serve_config(args: argparse.Namespace):
    changes = {k: v for k, v in (("max_batch_size", args.max_batch_size), ("max_wait_ms", args.max_wait_ms))
               if v is not None}
    return ServeConfig.for_scale(args.scale, **changes)


def slurm_refusal(args: argparse.Namespace) -> str | None:
    """Why these options cannot go to a Slurm job (None when they can)."""
    if args.host not in (None, "0.0.0.0"):
        return (f"--host {args.host} does not apply with --slurm: the job listens on all interfaces of the node "
                "Slurm gives it and prints the URL; leave --host out")
    if args.self_signed:
        return ("--self-signed does not apply with --slurm: the job makes a certificate for its own node when the "
                "profile sets 'tls: true' and prints where it is; or give --cert/--key that the node can read")
    return None


def job_serve_args(args: argparse.Namespace, target: Path | None) -> list[str]:
    """The ``labkit serve`` arguments a Slurm job gets for these options (listening and TLS options
    are added by ``labkit.serve.slurm.job_command``); ``target`` is the checkpoint, None = ``--demo``."""
    serve_args = ["--demo"] if target is None else [str(target.resolve())]
    for flag in ("scale", "max_batch_size", "max_wait_ms"):
        value = getattr(args, flag)
        if value is not None:
            serve_args += ["--" + flag.replace("_", "-"), str(value)]
    if args.device != "auto":  # auto is the job's default: the GPU Slurm gave it
        serve_args += ["--device", args.device]
    if args.no_embed:
        serve_args.append("--no-embed")
    if args.served_model_name:
        serve_args += ["--served-model-name", args.served_model_name]
    if getattr(args, "key_file", None):  # a path the node reads on shared storage; the key itself never goes in the job
        serve_args += ["--key-file", str(Path(args.key_file).expanduser().resolve())]
    return serve_args


def _submit(args: argparse.Namespace) -> int:
    # lazy: torch and uvicorn (2-4 s import) stay out of `labkit --help`, which imports this module
    from .checkpoints import newest_checkpoint
    from .slurm import submit

    refusal = slurm_refusal(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    try:
        encryption = Encryption.from_file(args.key_file) if args.key_file else Encryption.from_environment()
        target = None if args.demo else Path(args.checkpoint or newest_checkpoint(default_run_dir(), encryption))
        profile = load_config().profile(args.profile or "slurm")
        job = submit(profile, job_serve_args(args, target), port=args.port or 0, certfile=args.cert,
                     keyfile=args.key)
    except (FileNotFoundError, ValueError, ConfigError, EncryptionKeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # sbatch refused it; the message says why
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted Slurm job {job.job_id} ({job.name}); waiting for the server ...", flush=True)
    try:
        url = job.wait_url()
    except (RuntimeError, TimeoutError) as exc:  # the message carries the job's log or state
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.url_file:
        _write_url(args.url_file, url)
    print(f"serving at {url}")
    print(f"token (shown once): {job.token}")
    if job.certfile:
        print(f"TLS certificate to trust: {job.certfile}")
    print(f"stop it with: scancel {job.job_id}")
    return 0


def _write_url(path: str | Path, url: str) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(url + "\n")
    tmp.replace(path)


def cli(args: argparse.Namespace) -> int:
    """Start the server in the foreground; Ctrl-C or SIGTERM (scancel) stops it cleanly."""
    # lazy: torch and uvicorn (2-4 s import) stay out of `labkit --help`, which imports this module
    from labkit.checkpoint import CheckpointError

    from .checkpoints import NoCheckpoint, NoTokenizer, load_generator, newest_checkpoint
    from .demo import demo_generator
    from .server import start

    if args.demo and args.checkpoint:
        print("error: give a CHECKPOINT or --demo, not both", file=sys.stderr)
        return 2
    if args.slurm:
        return _submit(args)
    try:
        device = pick_device(args.device)
    except ValueError as exc:  # an unknown name, or cuda without a GPU: the message says what to use
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    try:
        encryption = Encryption.from_file(args.key_file) if args.key_file else Encryption.from_environment()
        generator = demo_generator(device=device) if args.demo else load_generator(
            args.checkpoint or newest_checkpoint(default_run_dir(), encryption), device=device, encryption=encryption)
    except (NoCheckpoint, NoTokenizer, EncryptionKeyError) as exc:  # their messages say what to do
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # a junk, truncated or foreign file
        print(f"error: {exc}; or serve another checkpoint (a file or run directory written by labkit.train "
              "or labkit.checkpoint.save), or --demo", file=sys.stderr)
        return 2
    host = args.host or DEFAULT_HOST
    certfile, keyfile = args.cert, args.key
    if args.self_signed:
        certfile, keyfile = self_signed(args.self_signed)
    embedder = None
    if not args.no_embed:
        from .embedder import MiniLMEmbedder  # lazy: torch, transformers (3 s import) unless /embed is served

        embedder = MiniLMEmbedder(device=device)
    try:
        server = start(generator, host=host, port=DEFAULT_PORT if args.port is None else args.port,
                       certfile=certfile, keyfile=keyfile,
                       config=_serve_config(args), embedder=embedder, model_id=args.served_model_name)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: server.request_stop())  # scancel sends SIGTERM
    if args.url_file:
        _write_url(args.url_file, server.url)
    print(f"labkit serve: {generator.info()['model']} on {device} at {server.url} "
          f"(OpenAI-compatible at {server.url}/v1, model {server.model_id!r})", flush=True)
    if not certfile and host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine without TLS: the token and texts travel in clear; "
              "add --self-signed DIR or --cert/--key", flush=True)
    if server.token_generated:
        print(f"token (shown once; set LABKIT_SERVE_TOKEN to choose it): {server.token}", flush=True)
    server.wait()
    print("labkit serve: stopped", flush=True)
    return 0
