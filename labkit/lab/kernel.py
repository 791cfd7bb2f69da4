"""`labkit install-kernel`: register this Python environment as a Jupyter kernel.

On a JupyterHub the server often runs from a different environment than the lab; a kernelspec
that points at this interpreter makes "labkit" selectable in the launcher. The ``LABKIT_*``
variables set when it is installed (site config, profile, scale) are written into the kernelspec,
so every kernel started from it sees the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping

NAME_RE = re.compile(r"^[a-z0-9._-]+$")


def labkit_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``LABKIT_*`` variables of ``environ`` (default: this process), to pass through to kernels."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if k.startswith("LABKIT_")}


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` into a dict; a pair without ``=`` is an error that shows the expected form."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def install_kernel(
    name: str = "labkit",
    display_name: str | None = None,
    *,
    user: bool = False,
    prefix: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    pass_labkit_env: bool = True,
) -> Path:
    """Write a kernelspec for this interpreter and return its folder.

    ``user`` installs for the current user, ``prefix`` under ``PREFIX/share/jupyter/kernels``
    (e.g. ``sys.prefix`` of the environment JupyterHub runs), neither: system-wide.
    """
    from ipykernel.kernelspec import install  # lazy: ipykernel (~0.4 s import); every `labkit` command imports this module

    if not NAME_RE.match(name):
        raise ValueError(f"kernel name {name!r} may use only lowercase letters, digits, '.', '_' and '-'")
    if user and prefix:
        raise ValueError("give either --user or --prefix, not both")
    kernel_env = labkit_environment() if pass_labkit_env else {}
    kernel_env.update(env or {})
    display = display_name or f"labkit (Python {sys.version_info.major}.{sys.version_info.minor})"
    path = install(
        user=user, kernel_name=name, display_name=display,
        prefix=str(prefix) if prefix else None, env=kernel_env or None,
    )
    spec_file = Path(path) / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec.setdefault("metadata", {})["labkit"] = {"python": sys.executable}
    spec_file.write_text(json.dumps(spec, indent=1))
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user (~/.local/share/jupyter)")
    where.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels (e.g. the JupyterHub's environment)")
    parser.add_argument("--name", default="labkit", help="kernelspec name (default: labkit)")
    parser.add_argument("--display-name", default=None, help="name shown in the launcher")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for the kernel (repeatable)")
    parser.add_argument("--no-labkit-env", action="store_true",
                        help="do not copy the LABKIT_* variables of this shell into the kernelspec")


def cli(args: argparse.Namespace) -> int:
    try:
        env = parse_env(args.env)
        path = install_kernel(
            args.name, args.display_name, user=args.user, prefix=args.prefix, env=env,
            pass_labkit_env=not args.no_labkit_env,
        )
    except (ValueError, PermissionError) as exc:
        hint = " (try --user, or --prefix to a folder you can write)" if isinstance(exc, PermissionError) else ""
        print(f"labkit install-kernel: {exc}{hint}", file=sys.stderr)
        return 2
    spec = json.loads((path / "kernel.json").read_text())
    print(f"installed kernel {args.name!r} ({spec['display_name']}) in {path}")
    print(f"  python: {spec['argv'][0]}")
    for key, value in spec.get("env", {}).items():
        print(f"  env {key}={value}")
    return 0
