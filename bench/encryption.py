"""What encryption at rest costs: pipeline, shard and checkpoint write (and read) times, encrypted / plain.

    python -m bench.encryption            # the stdlib pipeline (3 MB), 64 M tokens of shards, a 7 M-parameter GPT
    python -m bench.encryption --quick    # toy sizes (a smoke test, not a measurement)

Each pair is measured in the same run, alternating plain and encrypted, and the median of the rounds
is kept; the ratio is encrypted / plain time (1.00x: free). Encrypted files are AES-256-GCM in
64 KiB chunks (``labkit.core.crypto``), so the cost is the cipher's throughput, which AES-NI
(the CPU flag ``aes``, with ``pclmulqdq`` for GCM's hash, ``vaes`` for wider units) decides:

- **pipeline**: ``labkit.data.preprocess`` end to end in this process (cleaning and tokenizing dominate);
- **shard write**: ``write_shard`` of a large token array alone (the part encryption touches);
- **checkpoint, file**: ``FileCheckpointer.save`` of model + AdamW state (one file, fsync'd);
- **checkpoint, sharded**: ``ShardedCheckpointer.save`` (torch.distributed.checkpoint, one rank);
- and reading each back: ``ShardReader.read`` of the whole stream and of random blocks as training
  draws them (each decrypts the 64 KiB chunks it touches), ``load_latest`` + ``restore``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

QUICK = dict(corpus_bytes=200_000, tokens=1 << 20, blocks=200,
             model=dict(n_layer=1, n_head=2, n_embd=32, block_size=16), rounds=1)
FULL = dict(corpus_bytes=3_000_000, tokens=1 << 26, blocks=2000,
            model=dict(n_layer=4, n_head=6, n_embd=384, block_size=64), rounds=5)


def cpu_summary() -> str:
    """The CPU's name, its cores and the flags that decide AES-GCM's speed (aes, pclmulqdq, vaes, vpclmulqdq, avx2)."""
    from bench.train import cpu_summary as named  # lazy: bench.train imports torch

    name, flags = named(("aes", "pclmulqdq", "vaes", "vpclmulqdq", "avx2")).split("; ", 1)
    return f"{name}, {os.cpu_count()} cores; {flags}"


def paired(rounds: int, plain: Callable[[], Any], sealed: Callable[[], Any]) -> tuple[float, float]:
    """Median seconds of ``plain()`` and ``sealed()``, run alternately ``rounds`` times each after one
    untimed call of each (imports, caches, first allocations)."""
    plain(), sealed()
    times: dict[str, list[float]] = {"plain": [], "sealed": []}
    for _ in range(rounds):
        for name, fn in (("plain", plain), ("sealed", sealed)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["plain"]), statistics.median(times["sealed"])


def run(quick: bool = False) -> list[dict]:
    """One row per measurement: what, plain and encrypted seconds, their ratio, and the bytes involved."""
    import numpy as np
    import torch

    from labkit.checkpoint import FileCheckpointer, ShardedCheckpointer
    from labkit.core.crypto import new_key_file
    from labkit.data import DataConfig, preprocess
    from labkit.data.shards import ShardReader, make_tiny_shards, write_shard
    from labkit.train import TrainConfig, setup, train_step

    size = QUICK if quick else FULL
    rounds = size["rounds"]
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        tmp = Path(tmp)
        key = new_key_file(tmp / "bench.key")
        both = {"plain": None, "sealed": key}

        cfg = DataConfig.for_scale("tiny", corpus_bytes=size["corpus_bytes"], partition_bytes=500_000)
        reports: dict[str, Any] = {}

        def pipeline(which: str) -> Callable[[], None]:
            def go() -> None:
                reports[which] = preprocess("stdlib", tmp / f"pipe-{which}", config=cfg, progress=False,
                                            encryption=both[which])
            return go

        p, s = paired(rounds, pipeline("plain"), pipeline("sealed"))
        rows.append(dict(what=f"pipeline (stdlib {cfg.corpus_bytes / 1e6:.1f} MB, preprocess)", plain_s=p, sealed_s=s,
                         mb=reports["plain"].bytes_in / 1e6))
        ids = np.random.default_rng(0).integers(0, 8192, size["tokens"], dtype=np.uint16)
        (tmp / "shards").mkdir()
        p, s = paired(rounds, lambda: write_shard(tmp / "shards", "train_00000.bin", [ids], 8192),
                      lambda: write_shard(tmp / "shards", "train_00001.bin", [ids], 8192, key))
        rows.append(dict(what=f"shard write ({size['tokens'] >> 20} M tokens)", plain_s=p, sealed_s=s, mb=ids.nbytes / 1e6))

        readers = {w: ShardReader(tmp / f"pipe-{w}", encryption=both[w]) for w in both}
        p, s = paired(rounds, *(lambda r=r: r.read(0, r.num_tokens) for r in readers.values()))
        rows.append(dict(what="shard read, all of the pipeline's train split", plain_s=p, sealed_s=s,
                         mb=readers["plain"].num_tokens * readers["plain"].dtype.itemsize / 1e6))
        n, block = size["blocks"], 257
        starts = np.random.default_rng(1).integers(0, readers["plain"].num_tokens - block, n)

        def blocks(r: Any) -> None:
            for start in starts:
                r.read(int(start), block)

        p, s = paired(rounds, *(lambda r=r: blocks(r) for r in readers.values()))
        rows.append(dict(what=f"shard read, {n:,} random blocks of {block} tokens (training)", plain_s=p, sealed_s=s,
                         mb=n * block * readers["plain"].dtype.itemsize / 1e6))

        data = tmp / "tiny"
        make_tiny_shards(data)
        config = TrainConfig().replace(**size["model"], batch_size=2, device="cpu", precision="float32", sample_tokens=0)
        for kind, cls in (("file", FileCheckpointer), ("sharded", ShardedCheckpointer)):
            cps = {w: cls(str(tmp / f"ck-{kind}-{w}"), keep_last=1, encryption=both[w]) for w in both}
            run_ = setup(config, data, checkpointer=cps["plain"])
            train_step(run_, 0)  # AdamW's state exists from the first step on: it is most of a checkpoint
            step = iter(range(1, 10_000))
            p, s = paired(rounds, *(lambda c=c: c.save(run_, next(step)) for c in cps.values()))
            nbytes = sum(f.stat().st_size for f in (tmp / f"ck-{kind}-plain").rglob("*") if f.is_file())
            rows.append(dict(what=f"checkpoint write, {kind} (model + AdamW)", plain_s=p, sealed_s=s, mb=nbytes / 1e6))

            def restore(c: Any) -> None:
                c.restore(run_, c.load_latest())

            p, s = paired(rounds, *(lambda c=c: restore(c) for c in cps.values()))
            rows.append(dict(what=f"checkpoint read, {kind} (load_latest + restore)", plain_s=p, sealed_s=s,
                             mb=nbytes / 1e6))
    for r in rows:
        r["ratio"] = r["sealed_s"] / r["plain_s"]
    return rows


def report(rows: list[dict], rounds: int) -> str:
    """The rows as a table: seconds plain and encrypted (median of ``rounds``), the ratio, MB/s encrypted."""
    width = max(len(r["what"]) for r in rows)
    lines = [f"{'':<{width}}  {'plain s':>8}  {'encrypted s':>11}  {'ratio':>6}  {'MB':>7}",
             *(f"{r['what']:<{width}}  {r['plain_s']:>8.3f}  {r['sealed_s']:>11.3f}  {r['ratio']:>5.2f}x  {r['mb']:>7.1f}"
               for r in rows),
             f"(median of {rounds} alternating rounds each; ratio = encrypted / plain time)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.encryption", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (a smoke test, not a measurement)")
    args = p.parse_args(argv)
    print(f"cpu: {cpu_summary()}", flush=True)
    rows = run(quick=args.quick)
    print(report(rows, (QUICK if args.quick else FULL)["rounds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
