"""``labkit serve``: serve a checkpoint (or ``--demo``) over HTTP, here or as a Slurm job (``--slurm``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

RUN_DIR_ENV = "LABKIT_RUN_DIR"


def default_run_dir() -> Path:
    """Where training writes runs: ``labkit.config.runs_dir()`` (``$LABKIT_RUN_DIR``, else the lab's ``runs/``)."""
    from labkit.config import runs_dir

    return runs_dir()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``labkit serve``."""
    p.add_argument("checkpoint", nargs="?", help="checkpoint file or run directory "
                   f"(default: the newest checkpoint under ${RUN_DIR_ENV}, else the lab's runs/ folder)")
    p.add_argument("--demo", action="store_true", help="serve a tiny random GPT with a byte tokenizer (no checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--cert", help="TLS certificate (PEM); needs --key")
    p.add_argument("--key", help="TLS private key (PEM); needs --cert")
    p.add_argument("--self-signed", metavar="DIR", help="make a self-signed certificate in DIR and serve TLS with it")
    p.add_argument("--scale", help="scale preset for the limits (tiny, binder, workshop, full; default: active)")
    p.add_argument("--max-batch-size", type=int, help="requests per batch (1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, help="how long a request waits for companions")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--no-embed", action="store_true", help="do not offer /embed (MiniLM)")
    p.add_argument("--url-file", help="write the URL here once the server answers (used by --slurm)")
    p.add_argument("--slurm", action="store_true", help="submit the server as a Slurm job via the slurm profile")
    p.add_argument("--profile", default=None, help="cluster profile for --slurm (default: slurm)")


def pick_device(name: str = "auto") -> str:
    """``auto`` = the first CUDA device torch sees, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _serve_config(args: argparse.Namespace):
    from labkit.config import load_config

    from .config import ServeConfig

    cfg = load_config()
    scale = cfg.scale(args.scale)
    config = ServeConfig.for_scale(scale.name, scale.section("serve"))
    changes = {k: v for k, v in (("max_batch_size", args.max_batch_size), ("max_wait_ms", args.max_wait_ms))
               if v is not None}
    return config.replace(**changes) if changes else config


def _submit(args: argparse.Namespace) -> int:
    from labkit.config import load_config

    from .checkpoints import newest_checkpoint
    from .slurm import submit

    try:
        target = None if args.demo else Path(args.checkpoint or newest_checkpoint(default_run_dir()))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve_args = ["--demo"] if target is None else [str(target.resolve())]
    for flag in ("scale", "max_batch_size", "max_wait_ms"):
        value = getattr(args, flag)
        if value is not None:
            serve_args += ["--" + flag.replace("_", "-"), str(value)]
    if args.no_embed:
        serve_args.append("--no-embed")
    profile = load_config().profile(args.profile or "slurm")
    job = submit(profile, serve_args)
    print(f"submitted Slurm job {job.job_id} ({job.name}); waiting for the server ...", flush=True)
    url = job.wait_url()
    print(f"serving at {url}")
    print(f"token (shown once): {job.token}")
    if job.certfile:
        print(f"TLS certificate to trust: {job.certfile}")
    print(f"stop it with: scancel {job.job_id}")
    return 0


def cli(args: argparse.Namespace) -> int:
    """Start the server in the foreground; Ctrl-C or SIGTERM (scancel) stops it cleanly."""
    from labkit.model import CheckpointError

    from .checkpoints import NoCheckpoint, NoTokenizer, load_generator, newest_checkpoint
    from .demo import demo_generator
    from .server import start

    if args.demo and args.checkpoint:
        print("error: give a CHECKPOINT or --demo, not both", file=sys.stderr)
        return 2
    if args.slurm:
        return _submit(args)
    device = pick_device(args.device)
    try:
        generator = demo_generator(device=device) if args.demo else \
            load_generator(args.checkpoint or newest_checkpoint(default_run_dir()), device=device)
    except (NoCheckpoint, NoTokenizer) as exc:  # their messages say what to do
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # a junk, truncated or foreign file
        print(f"error: {exc}; or serve another checkpoint (a file or run directory written by labkit.train "
              "or labkit.model.save), or --demo", file=sys.stderr)
        return 2
    certfile, keyfile = args.cert, args.key
    if args.self_signed:
        from .tls import self_signed

        certfile, keyfile = self_signed(args.self_signed)
    embedder = None
    if not args.no_embed:
        from .embedder import MiniLMEmbedder

        embedder = MiniLMEmbedder(device=device)
    try:
        server = start(generator, host=args.host, port=args.port, certfile=certfile, keyfile=keyfile,
                       config=_serve_config(args), embedder=embedder)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: server.request_stop())  # scancel sends SIGTERM
    if args.url_file:
        tmp = Path(args.url_file).with_suffix(".tmp")
        tmp.write_text(server.url + "\n")
        tmp.replace(args.url_file)
    print(f"labkit serve: {generator.info()['model']} on {device} at {server.url}", flush=True)
    if not certfile and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine without TLS: the token and texts travel in clear; "
              "add --self-signed DIR or --cert/--key", flush=True)
    if server.token_generated:
        print(f"token (shown once; set LABKIT_SERVE_TOKEN to choose it): {server.token}", flush=True)
    server.wait()
    print("labkit serve: stopped", flush=True)
    return 0
