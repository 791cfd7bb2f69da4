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
import datetime as _dt
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, get_args

import yaml
from pydantic import Field, PlainValidator, field_validator, model_validator

from labkit.settings import ConfigError, Duration, GpuCount, Memory, Settings, SlurmSignal, Walltime, merge

PACKAGED = Path(__file__).with_name("profiles") / "defaults.yaml"
SITE_DEFAULT = Path("/etc/labkit/labkit.yaml")
USER_DEFAULT = Path("~/.config/labkit/labkit.yaml")
Kind = Literal["local", "slurm", "kubernetes"]
KINDS: tuple[str, ...] = get_args(Kind)
SCALES = ("tiny", "binder", "workshop", "full")


NonNegative = Annotated[int, Field(ge=0)]


def _memory_or_auto(value: Any) -> Memory | str | None:
    """``memory_limit``: an amount of memory, ``auto`` (Dask's share of the machine) or null."""
    return value if value in (None, "auto") else Memory(value, "memory_limit")


IMAGE_PYTHON = "/opt/labkit/venv/bin/python"  # where container/install.sh puts labkit's Python in the image


class Container(Settings):
    """A Slurm profile's ``container:``: each worker runs inside this Apptainer/Singularity image
    (``apptainer exec [--nv] --bind ... IMAGE python -m distributed.cli.dask_worker ...``), so the
    compute nodes need the runtime and the image, not labkit's Python environment."""

    noun: ClassVar[str] = "container"

    image: str                                  # a .sif file or sandbox folder on storage the nodes share
    runtime: Literal["apptainer", "singularity"] = "apptainer"
    python: str = IMAGE_PYTHON                  # the image's Python, which has labkit installed
    binds: tuple[str, ...] = ()                 # shared storage the workers read and write, e.g. /scratch
    options: tuple[str, ...] = ()               # more flags for `exec`, e.g. ["--cleanenv"] is refused

    @field_validator("binds", "options", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        """One item, a list of them, or nothing."""
        return () if value is None else (value,) if isinstance(value, str) else value

    @field_validator("options")
    @classmethod
    def _keeps_the_environment(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """``--cleanenv`` and ``--containall`` would drop the job script's exports inside the container."""
        for bad in ("--cleanenv", "-e", "--containall", "-C"):
            if bad in value:
                raise ValueError(f"{bad} drops the environment the job script exports for the worker "
                                 "(DASK_DISTRIBUTED__WORKER__DAEMON, CUDA_VISIBLE_DEVICES, the GPU slice); "
                                 "remove it, and pass what the image must not see with --env NAME= instead")
        return value


# keys that mean something for one kind only: set on another kind they are a mistake, not a no-op
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "slurm": ("container",),
    "kubernetes": ("image", "namespace", "service_account", "image_pull_policy", "node_selector", "tolerations",
                   "shared_claim"),
}


class Profile(Settings):
    """Where Dask workers run, and with what resources (walltime, memory and GPUs typed, parsed once)."""

    noun: ClassVar[str] = "profile"

    name: str
    kind: Kind = "local"
    source: str = "<packaged>"
    workers: NonNegative = 2
    threads_per_worker: NonNegative = 1
    memory_limit: Annotated[Memory | str | None, PlainValidator(_memory_or_auto)] = "auto"
    dashboard_address: str = "127.0.0.1:0"
    # Slurm only
    partition: str | None = None
    account: str | None = None
    require_account: bool = False
    walltime: Walltime | None = None
    signal: SlurmSignal | None = None  # e.g. "USR1@90": training checkpoints and stops when it arrives
    gpus_per_worker: GpuCount = 0
    workers_per_job: Annotated[int, Field(ge=1, description="Dask worker processes per Slurm job")] = 1
    cores: NonNegative = 1
    memory: Memory | None = None
    memory_mode: Literal["mem", "mem-per-gpu"] = "mem"
    prologue: tuple[str, ...] = ()
    job_extra: tuple[str, ...] = ()
    interface: str | None = None
    scheduler_interface: str | None = None  # None: ``interface`` (a login node with another name sets its own)
    tls: bool = False
    lifetime: Duration | None = None
    lifetime_stagger: Duration | None = None
    log_directory: str | None = None
    start_timeout: NonNegative = 300
    fake_gpus: bool = False
    container: Container | None = None  # Slurm: run the workers inside an Apptainer/Singularity image
    # Kubernetes only (kind: kubernetes, through dask-kubernetes' operator)
    image: str | None = None               # the OCI image of the scheduler and worker pods (container/Dockerfile)
    namespace: str | None = None           # None: the kube config's current namespace
    service_account: str | None = None     # None: no Kubernetes API token mounted into the pods
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None  # None: IfNotPresent
    node_selector: dict[str, str] = Field(default_factory=dict)      # worker pods only, e.g. GPU nodes
    tolerations: tuple[dict[str, Any], ...] = ()                     # worker pods only
    shared_claim: str | None = None        # a ReadWriteMany PersistentVolumeClaim mounted as the runs folder

    @field_validator("partition", "account", "interface", "scheduler_interface", "log_directory", "dashboard_address", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        """YAML reads ``account: 1234`` as a number; it names a Slurm account all the same."""
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("prologue", "job_extra", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        """One line, a list of lines, or nothing."""
        return () if value is None else (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _keys_of_its_kind(self) -> "Profile":
        """A key of another kind (``container`` on a local profile, ``image`` on a Slurm one) is refused."""
        for kind, keys in KIND_KEYS.items():
            given = [k for k in keys if getattr(self, k)]  # every default is None or empty
            if self.kind != kind and given:
                hint = " (a Slurm profile runs workers in an image with 'container: {image: ...}')" if "image" in given else ""
                raise ValueError(f"{', '.join(given)} only applies to kind: {kind}, and this profile is "
                                 f"kind: {self.kind}; remove it{hint}")
        return self

    @classmethod
    def valid_keys(cls) -> list[str]:
        """The keys a file or override may set (``name`` and ``source`` come from where it is defined)."""
        return sorted(set(cls.model_fields) - {"name", "source"})

    @classmethod
    def load(cls, name: str, data: Mapping[str, Any], source: str) -> "Profile":
        """The profile ``name`` from its merged settings; ConfigError names ``source`` and the key."""
        prefix = f"profiles.{name}."
        for key in sorted(set(data) & {"name", "source"}):
            raise ConfigError(f"{source}: unknown profile key {prefix}{key}; valid keys: {', '.join(cls.valid_keys())}")
        return cls.build({**data, "name": name, "source": source}, where=source, prefix=prefix)

    def replace(self, **changes: Any) -> "Profile":
        """A copy with some keys changed, validated like a file would be."""
        data = {k: v for k, v in self.fields().items() if k not in ("name", "source")}
        merged = {k: merge(data.get(k), v) for k, v in changes.items()}  # container={"image": ...} keeps its other keys
        return Profile.load(self.name, {**data, **merged}, source=f"{self.source} + overrides")


class Scale(Settings):
    """How big the work is: ``tiny`` (tests), ``binder``, ``workshop``, ``full``.

    Each capability keeps its own presets per scale (:class:`ScaleSettings`); ``sections`` holds the
    overrides a site or user file gives, e.g. ``scales: {tiny: {train: {max_steps: 5}}}``.
    """

    name: str
    description: str = ""
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """The overrides for one topic (``data``, ``train``, ...); empty when none are set."""
        return dict(self.sections.get(name, {}))


class LabConfig(Settings):
    """All profiles and scales after layering, plus which ones are active."""

    profiles: dict[str, Profile]
    scales: dict[str, Scale]
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


class ScaleSettings(Settings):
    """A capability's settings with presets per scale; ``for_scale(scale, **overrides)`` makes them."""

    section: ClassVar[str] = ""                                # the key under scales.<scale> in the files
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}    # scale -> values that differ from the defaults

    @classmethod
    def for_scale(cls, name: str | None = None, **overrides: Any) -> Any:
        """The preset of scale ``name`` (None: the lab's active scale), then the config files'
        ``scales.<name>.<section>`` keys, then ``overrides``; a bad one is a ConfigError naming
        the scale, the key and the valid keys."""
        scale = load_config().scale(name)
        if scale.name not in cls.presets:
            raise ConfigError(f"no {cls.section} preset for scale {scale.name!r}; valid scales: "
                              f"{', '.join(cls.presets)}. Pick one of them (LABKIT_SCALE or 'scale:' in a config file).")
        data = dict(cls.presets[scale.name])
        for layer in (scale.section(cls.section), overrides):
            data.update({k: merge(data.get(k), v) for k, v in layer.items()})
        return cls.build(data, where=f"scales.{scale.name}.{cls.section}")


_TOP_KEYS = {"profile", "scale", "profiles", "scales"}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` and ``3E5`` are numbers as in YAML 1.2 (PyYAML's 1.1 rules
    want a dot, ``1.0e-3``, and read ``lr: 1e-3`` as a string that a float setting would refuse)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror}); fix its permissions or remove it") from exc
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
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
                            raise ConfigError(f"{path}: new profile {name!r} needs a kind: "
                                              + ", ".join(f"'kind: {k}'" for k in KINDS))
                        same = [n for n, b in raw_profiles.items() if b.get("kind") == kind]  # e.g. k8s for kubernetes
                        base = raw_profiles.get(kind if kind in raw_profiles else same[0] if same else "local", {})
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
    profiles = {n: Profile.load(n, body, profile_source.get(n, str(PACKAGED))) for n, body in raw_profiles.items()}
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
