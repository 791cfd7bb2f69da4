"""``labkit preprocess``: the data pipeline from a terminal (e.g. on a login node, before a workshop)."""

from __future__ import annotations

import argparse

from distributed import Client, LocalCluster

from ..core.crypto import Encryption, EncryptionKeyError
from .config import DataConfig, default_shard_dir
from .pipeline import preprocess
from .sources import SourceError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sources, output folder, scale and the main knobs."""
    parser.add_argument("sources", nargs="*", default=["stdlib"],
                        help="stdlib (default), stdlib-docs, files, folders, .jsonl, hf:NAME[:SPLIT]")
    parser.add_argument("--out", default=None, help="output folder (default: runs/shards-<scale>)")
    parser.add_argument("--scale", default=None, help="tiny, binder, workshop or full (default: the active scale)")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0, help="local Dask workers (0 = run in this process)")
    parser.add_argument("--near-dup-threshold", type=float, default=None)
    parser.add_argument("--scrub-pii", action="store_true", help="replace e-mail addresses and IPs")
    parser.add_argument("--key-file", default=None, help="write the shards encrypted with this key file (mode 0600; "
                        "`labkit key new PATH`); default: $LABKIT_KEY_FILE or $LABKIT_DATA_KEY when set, else plaintext")


def cli(args: argparse.Namespace) -> int:
    """Run the pipeline and print the report; non-zero exit when it cannot run."""
    overrides = {}
    if args.near_dup_threshold is not None:
        overrides["near_dup_threshold"] = args.near_dup_threshold
    if args.scrub_pii:
        overrides["scrub_pii"] = True
    try:
        encryption = Encryption.from_file(args.key_file) if args.key_file else Encryption.from_environment()
        cfg = DataConfig.for_scale(args.scale, **overrides)
        out = args.out or default_shard_dir(args.scale)
        if args.workers > 0:
            with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as c, \
                    Client(c) as client:
                report = preprocess(args.sources, out, client=client, config=cfg, vocab_size=args.vocab_size,
                                    encryption=encryption)
        else:
            report = preprocess(args.sources, out, config=cfg, vocab_size=args.vocab_size, encryption=encryption)
    except (SourceError, ValueError, EncryptionKeyError) as exc:
        print(f"labkit preprocess: {exc}")
        return 2
    print(report)
    for path, reason in report.skipped + report.repaired:
        print(f"  {path}: {reason}")
    return 0
