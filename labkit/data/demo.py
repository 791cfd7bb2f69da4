"""A small messy corpus for teaching: real stdlib text with the trouble web data has.

Exact and near copies, look-alike Unicode and CRLF line ends (equal after normalising),
control characters, e-mail addresses and IPs, invalid UTF-8, NUL bytes, a binary file, an
empty file, a dangling symlink and a symlink loop. Built in well under a second.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from .sources import stdlib_root

MODULES = ("bisect.py", "heapq.py", "glob.py", "fnmatch.py", "shlex.py", "textwrap.py", "colorsys.py",
           "keyword.py", "stat.py", "this.py", "token.py", "copy.py", "numbers.py", "operator.py")
_FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"}


def make_messy_corpus(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the messy corpus into ``out_dir`` (replacing what it held) and return the folder."""
    out = Path(out_dir)
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = random.Random(seed)
    root = stdlib_root()
    texts = [(root / m).read_text(encoding="utf-8") for m in MODULES if (root / m).is_file()]
    if len(texts) < 4:
        raise FileNotFoundError(f"too few standard library modules under {root} to build the demo corpus: this Python "
                                "ships without its .py sources; use a full Python install, or pass your own folder of texts")
    for i, t in enumerate(texts):
        (out / f"doc_{i:02d}.txt").write_text(t, encoding="utf-8")
    (out / "z_exact_copy_of_01.txt").write_text(texts[1], encoding="utf-8")
    look_alike = "".join(_FULLWIDTH.get(c, c) if rng.random() < 0.2 else c for c in texts[2]).replace("\n", "\r\n")
    (out / "z_fullwidth_crlf_copy_of_02.txt").write_bytes(look_alike.encode("utf-8"))
    lines = texts[3].splitlines()
    for k in rng.sample(range(len(lines)), max(1, len(lines) // 30)):  # change ~3% of the lines
        lines[k] = lines[k] + "  # edited"
    (out / "z_near_copy_of_03.txt").write_text("\n".join(lines), encoding="utf-8")
    (out / "pii.txt").write_text(
        "Contact the maintainer at jane.doe@example.org or ops@lab.example.com.\n"
        "The build server is at 192.168.17.4, the mirror at 10.0.0.12; version 3.11.7 is not an address.\n" * 3)
    (out / "control_chars.txt").write_text("Terminal output\x1b[0m with a bell\x07 and a zero\u200bwidth space; "
                                           "these characters are invisible but they are still tokens.\n" * 3)
    (out / "invalid_utf8.txt").write_bytes(b"Caf\xe9 cr\xe8me, written in Latin-1 by mistake. "
                                           + texts[0][:400].encode("utf-8"))
    (out / "with_nul.txt").write_bytes(texts[4][:600].encode("utf-8") + b"\x00\x00\x00")
    (out / "binary.dat").write_bytes(bytes(rng.randrange(256) for _ in range(2048)))
    (out / "empty.txt").write_bytes(b"")
    (out / "nonsense.txt").write_text("▓▒░ ■□▪▫ ◆◇◈ " * 40)
    try:
        (out / "dangling_link.txt").symlink_to(out / "does_not_exist.txt")
        (out / "loop").symlink_to(out)
    except (OSError, NotImplementedError):  # no symlinks on this file system
        pass
    return out
