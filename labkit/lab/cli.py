"""The `labkit` command line: one sub-command per module, each loaded only when used.

A sub-command lives in its module as two functions, ``add_arguments(parser)`` and
``cli(args) -> int``; registering it is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("labkit.lab.doctor", "check this machine, Slurm and the active profile before a session"),
    "preprocess": ("labkit.data.cli", "raw text -> cleaned, deduplicated, tokenized shards (labkit.data)"),
    "serve": ("labkit.serve.cli", "serve a checkpoint (or --demo) over an authenticated HTTP API"),
    "cleanup": ("labkit.cluster.cleanup", "cancel your stale labkit Slurm jobs (owner notebook gone)"),
    "hardware": ("labkit.hardware.cli", "the hardware catalog, and the memory/time/energy plan of a training run"),
    "install-kernel": ("labkit.lab.kernel", "register this environment as a Jupyter kernel (LABKIT_* settings passed through)"),
    "key": ("labkit.core.crypto", "make a key file for encryption at rest (mode 0600), or print a key's id"),
    "run": ("labkit.lab.runner", "execute notebooks headless with a scale/profile; write executed copies and an HTML report"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; sub-command arguments come from their own modules."""
    parser = argparse.ArgumentParser(prog="labkit", description="labkit: build LLMs on HPC clusters from Jupyter.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod = importlib.import_module(module)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``labkit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    return int(mod.cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
