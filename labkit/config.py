"""Profiles (where workers run) and scales (how big the work is), read from layered YAML.

Layers, later ones overriding earlier ones key by key:

1. the packaged defaults, ``labkit/profiles/defaults.yaml``;
2. a site file an admin drops in: ``$LABKIT_SITE_CONFIG``, else ``/etc/labkit/labkit.yaml``;
3. a user file: ``$LABKIT_USER_CONFIG``, else ``~/.config/labkit/labkit.yaml``;
4. the environment: ``LABKIT_PROFILE`` and ``LABKIT_SCALE`` pick the active ones.

Every error names the file and the key, and lists the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

PACKAGED = Path(__file__).with_name("profiles") / "defaults.yaml"
SITE_DEFAULT = Path("/etc/labkit/labkit.yaml")
USER_DEFAULT = Path("~/.config/labkit/labkit.yaml")
KINDS = ("local", "slurm")
SCALES = ("tiny", "binder", "workshop", "full")


class ConfigError(ValueError):
    """A profile, scale or config file is wrong; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Profile:
    """Where Dask workers run, and with what resources."""

    name: str
    kind: str = "local"
    source: str = "<packaged>"
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | None = "auto"
    dashboard_address: str = "127.0.0.1:0"
    # Slurm only
    partition: str | None = None
    account: str | None = None
    require_account: bool = False
    walltime: str | None = None
    gpus_per_worker: int = 0
    workers_per_job: int = 1
    cores: int = 1
    memory: str | None = None
    memory_mode: str = "mem"
    prologue: tuple[str, ...] = ()
    job_extra: tuple[str, ...] = ()
    interface: str | None = None
    tls: bool = False
    lifetime: str | None = None
    lifetime_stagger: str | None = None
    log_directory: str | None = None
    start_timeout: int = 300
    fake_gpus: bool = False

    def replace(self, **changes: Any) -> "Profile":
        """Return a copy with some keys changed, validated like a file would be."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "source")}
        for key in changes:
            if key not in _PROFILE_KEYS:
                raise ConfigError(
                    f"unknown profile key {key!r}; valid keys: {', '.join(sorted(_PROFILE_KEYS))}"
                )
        data.update(changes)
        return _make_profile(self.name, data, source=f"{self.source} + overrides")


@dataclass(frozen=True)
class Scale:
    """How big the work is: ``tiny`` (tests), ``binder``, ``workshop``, ``full``.

    Each capability module keeps its own presets per scale; ``sections`` holds the overrides a
    site or user file gives, e.g. ``scales: {tiny: {train: {max_steps: 5}}}``.
    """

    name: str
    description: str = ""
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """The overrides for one topic (``data``, ``train``, ...); empty when none are set."""
        return dict(self.sections.get(name, {}))


@dataclass(frozen=True)
class LabConfig:
    """All profiles and scales after layering, plus which ones are active."""

    profiles: Mapping[str, Profile]
    scales: Mapping[str, Scale]
    default_profile: str
    default_scale: str
    layers: tuple[str, ...]
    configured_profiles: frozenset[str] = frozenset()

    def profile(self, name: str | None = None) -> Profile:
        """The named profile, or the active one; ``auto`` resolves to ``local`` here
        (``labkit.cluster`` decides auto with Slurm in view)."""
        name = name or self.default_profile
        if name == "auto":
            name = "local"
        if name not in self.profiles:
            raise ConfigError(
                f"unknown profile {name!r}; valid profiles: {', '.join(sorted(self.profiles))}"
                f" (set by {self._who_set('profile')}). Fix the name, or define it under "
                f"'profiles:' in your user file {USER_DEFAULT}."
            )
        return self.profiles[name]

    def scale(self, name: str | None = None) -> Scale:
        """The named scale, or the active one."""
        name = name or self.default_scale
        if name not in self.scales:
            raise ConfigError(
                f"unknown scale {name!r}; valid scales: {', '.join(self.scales)}"
                f" (set by {self._who_set('scale')})."
            )
        return self.scales[name]

    def _who_set(self, key: str) -> str:
        env = "LABKIT_" + key.upper()
        return f"${env}" if os.environ.get(env) else "the config files " + ", ".join(self.layers)


_PROFILE_KEYS = {f.name for f in dataclasses.fields(Profile)} - {"name", "source"}
_TOP_KEYS = {"profile", "scale", "profiles", "scales"}
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_MEM_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def unknown_fields(cls: Any, names: Any) -> tuple[list[str], list[str]]:
    """The ``names`` that are not fields of dataclass ``cls``, and its valid field names (both
    sorted): what every settings error needs in order to list the valid choices."""
    valid = sorted(f.name for f in dataclasses.fields(cls))
    return sorted(set(names) - set(valid)), valid


def parse_memory(text: str | int, *, key: str = "memory") -> int:
    """Parse ``"4GiB"``, ``"500MB"``, ``"2G"`` or a byte count into bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{key}: {text} must be positive; write it like '4GiB' or a byte count such as 4294967296")
        return text
    m = _MEM_RE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _MEM_UNITS:
        raise ConfigError(
            f"{key}: cannot read {text!r} as an amount of memory; write it like '4GiB', '500MB' or '16G'"
        )
    value = int(float(m.group(1)) * _MEM_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{key}: {text!r} must be more than zero; write it like '4GiB', '500MB' or '16G'")
    return value


_WALL_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


def parse_walltime(text: str, *, key: str = "walltime") -> int:
    """Parse a Slurm walltime (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) into seconds."""
    m = _WALL_RE.match(str(text).strip())
    if not m:
        raise ConfigError(
            f"{key}: cannot read {text!r} as a walltime; write it like '01:30:00' (HH:MM:SS) or '1-00:00:00'"
        )
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        h, mi, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, mi, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, mi, s = 0, parts[0], parts[1]
    else:
        h, mi, s = parts
    if (len(parts) > 1 and (mi >= 60 and days is None and len(parts) == 3)) or s >= 60:
        raise ConfigError(f"{key}: {text!r} has minutes or seconds of 60 or more; carry them into the next unit, e.g. '01:01:00' not '00:61:00'")
    total = int(days or 0) * 86400 + h * 3600 + mi * 60 + s
    if total <= 0:
        raise ConfigError(f"{key}: {text!r} must be longer than zero; write it like '00:30:00' (HH:MM:SS)")
    return total


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror}); fix its permissions or remove it") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}. Fix the file or remove it.") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {sorted(_TOP_KEYS)}, not {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}; valid keys: {', '.join(sorted(_TOP_KEYS))}")
    return data


def _layer_paths(env: Mapping[str, str]) -> list[Path]:
    paths = [PACKAGED]
    site = Path(env["LABKIT_SITE_CONFIG"]) if env.get("LABKIT_SITE_CONFIG") else SITE_DEFAULT
    user = Path(env["LABKIT_USER_CONFIG"]) if env.get("LABKIT_USER_CONFIG") else USER_DEFAULT
    for p in (site, user):
        p = p.expanduser()
        if p.exists():
            paths.append(p)
        elif p is not SITE_DEFAULT and p != USER_DEFAULT.expanduser() and p.name:
            raise ConfigError(f"{p}: config file named by the environment does not exist; fix the path or unset the variable")
    return paths


def _coerce(name: str, key: str, value: Any, where: str) -> Any:
    fld = {f.name: f for f in dataclasses.fields(Profile)}[key]
    typ = str(fld.type)
    if key in ("prologue", "job_extra"):
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: profiles.{name}.{key} must be a list of strings")
        return tuple(value)
    if typ.startswith("int"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: profiles.{name}.{key} must be a whole number >= 0, not {value!r}")
    if typ.startswith("bool") and not isinstance(value, bool):
        raise ConfigError(f"{where}: profiles.{name}.{key} must be true or false, not {value!r}")
    if typ.startswith("str |") and value is not None and not isinstance(value, (str, int)):
        raise ConfigError(f"{where}: profiles.{name}.{key} must be a string, not {value!r}")
    if typ.startswith("str |") and isinstance(value, int):
        value = str(value)
    return value


def _make_profile(name: str, data: Mapping[str, Any], source: str) -> Profile:
    kind = data.get("kind", "local")
    if kind not in KINDS:
        raise ConfigError(f"{source}: profiles.{name}.kind is {kind!r}; valid kinds: {', '.join(KINDS)}")
    values = {}
    for key, value in data.items():
        if key not in _PROFILE_KEYS:
            raise ConfigError(
                f"{source}: unknown key profiles.{name}.{key}; valid keys: {', '.join(sorted(_PROFILE_KEYS))}"
            )
        values[key] = _coerce(name, key, value, source)
    if values.get("workers_per_job", 1) < 1:
        raise ConfigError(f"{source}: profiles.{name}.workers_per_job must be 1 or more (Dask worker processes "
                          f"per Slurm job), not {values['workers_per_job']!r}")
    if values.get("memory_mode", "mem") not in ("mem", "mem-per-gpu"):
        raise ConfigError(f"{source}: profiles.{name}.memory_mode must be 'mem' or 'mem-per-gpu'")
    if values.get("memory") is not None:
        parse_memory(values["memory"], key=f"{source}: profiles.{name}.memory")
    if values.get("memory_limit") not in (None, "auto"):
        parse_memory(values["memory_limit"], key=f"{source}: profiles.{name}.memory_limit")
    if values.get("walltime") is not None:
        parse_walltime(values["walltime"], key=f"{source}: profiles.{name}.walltime")
    return Profile(name=name, source=source, **values)


def load_config(env: Mapping[str, str] | None = None, extra_files: list[Path] | None = None) -> LabConfig:
    """Read every layer and return the merged config; raises ConfigError naming file and key."""
    env = os.environ if env is None else env
    paths = _layer_paths(env) + [Path(p) for p in (extra_files or [])]
    raw_profiles: dict[str, dict[str, Any]] = {}
    raw_scales: dict[str, dict[str, Any]] = {}
    profile_source: dict[str, str] = {}
    configured: set[str] = set()
    default_profile, default_scale = "auto", "binder"
    for path in paths:
        data = _read_yaml(path)
        for key, target in (("profiles", raw_profiles), ("scales", raw_scales)):
            section = data.get(key) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: '{key}' must be a mapping of name -> settings")
            for name, body in section.items():
                body = body or {}
                if not isinstance(body, dict):
                    raise ConfigError(f"{path}: {key}.{name} must be a mapping of settings")
                if key == "profiles":
                    if name not in target:
                        kind = body.get("kind")
                        if kind is None:
                            raise ConfigError(f"{path}: new profile {name!r} needs 'kind: local' or 'kind: slurm'")
                        base = raw_profiles.get(kind if kind in raw_profiles else "local", {})
                        target[name] = copy.deepcopy(base)
                    if path != PACKAGED:
                        configured.add(name)
                    profile_source[name] = str(path)
                target.setdefault(name, {})
                _deep_update(target[name], body)
        if "profile" in data:
            default_profile = str(data["profile"])
        if "scale" in data:
            default_scale = str(data["scale"])
    profiles = {n: _make_profile(n, body, profile_source.get(n, str(PACKAGED))) for n, body in raw_profiles.items()}
    scales = {}
    for name, body in raw_scales.items():
        desc = body.get("description", "")
        sections = {k: v for k, v in body.items() if k != "description"}
        for k, v in sections.items():
            if not isinstance(v, dict):
                raise ConfigError(f"scales.{name}.{k} must be a mapping of knobs, e.g. {{max_steps: 5}}")
        scales[name] = Scale(name=name, description=str(desc), sections=sections)
    if env.get("LABKIT_PROFILE"):
        default_profile = env["LABKIT_PROFILE"]
    if env.get("LABKIT_SCALE"):
        default_scale = env["LABKIT_SCALE"]
    cfg = LabConfig(
        profiles=profiles,
        scales=scales,
        default_profile=default_profile,
        default_scale=default_scale,
        layers=tuple(str(p) for p in paths),
        configured_profiles=frozenset(configured),
    )
    if default_profile != "auto":
        cfg.profile(default_profile)  # validate now: a wrong name fails at load, not later
    cfg.scale(default_scale)
    return cfg


def _deep_update(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def get_profile(name: str | None = None) -> Profile:
    """The named profile or the active one, from a fresh read of every layer."""
    return load_config().profile(name)


def get_scale(name: str | None = None) -> Scale:
    """The named scale or the active one (``LABKIT_SCALE`` or the files)."""
    return load_config().scale(name)


USER_RUNS = "labkit-runs"  # the per-user fallback under $HOME when the lab's own runs/ is not writable


def runs_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the lab keeps what it makes (shards, checkpoints, reports), shared by every notebook.

    ``$LABKIT_RUN_DIR`` when set; else ``runs/`` in the labkit checkout (git-ignored) when labkit
    runs from one; else ``./runs`` in the current folder. When that folder is not writable (a
    checkout shared by a whole class), ``~/labkit-runs``; :func:`runs_dir_choice` says which and why.
    """
    return runs_dir_choice(env)[0]


def runs_dir_choice(env: Mapping[str, str] | None = None, checkout: Path | None = None) -> tuple[Path, str]:
    """The runs folder and a few words on why it was chosen (``labkit doctor`` prints them).

    ``checkout`` is the labkit checkout to look in (default: the one this module runs from, if any).
    """
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if env.get("LABKIT_RUN_DIR"):  # "~/x" is each user's own (kernelspecs and spawners pass it unexpanded)
        given = env["LABKIT_RUN_DIR"]
        path = home / given[2:] if given.startswith("~/") else Path(given).expanduser()
        return path, "from $LABKIT_RUN_DIR"
    root = Path(__file__).resolve().parent.parent if checkout is None else Path(checkout)
    if (root / "pyproject.toml").is_file() and (root / "labkit").is_dir():
        lab, where = root / "runs", "the labkit checkout's runs/"
    else:
        lab, where = Path.cwd() / "runs", "runs/ in the current folder"
    if writable_dir(lab):
        return lab, where
    return home / USER_RUNS, (f"{where} ({lab}) is not writable, so a folder of your own; "
                              "set LABKIT_RUN_DIR to choose another")


RUN_STAMP = "%Y%m%d-%H%M%S"  # one run's folder name: sortable, local time, to the second


def run_stamp(now: _dt.datetime | None = None) -> str:
    """``now`` (default: the current local time) as a run folder's name, e.g. ``20260128-141502``."""
    return (now or _dt.datetime.now()).strftime(RUN_STAMP)


def new_run_dir(kind: str, scale: str, now: _dt.datetime | None = None) -> Path:
    """A fresh run's folder, ``<runs>/<kind>-<scale>/<stamp>`` (not created): where notebooks 06
    (``gpt``) and 07 (``pruned``) save, and where 08 and ``labkit serve`` look for the newest checkpoint."""
    return runs_dir() / f"{kind}-{scale}" / run_stamp(now)


def writable_dir(path: Path) -> bool:
    """Whether ``path`` is a folder this user can write in, or could be created as one."""
    if path.exists():
        return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            return False
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
