"""One settings mechanism for profiles, scales and every capability's knobs.

Settings are pydantic models: typed, validated once when they are made (from a file, a preset or
overrides), and every mistake is one error type, :class:`ConfigError`, whose message names the
file (when there is one), the key, the valid keys or values, and the fix.

Resource sizes are typed values parsed once: :class:`Walltime` and :class:`Duration` (``.seconds``),
:class:`Memory` (``.bytes``) and :data:`GpuCount`. The first three are ``str`` subclasses, so a
job script that writes them out keeps the text the user gave.

A capability's settings subclass ``labkit.config.ScaleSettings`` (it reads the config files):
``X.for_scale(scale, **overrides)`` is the class's preset for that scale, then the files'
``scales.<scale>.<section>`` keys, then ``overrides``, validated together.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import core_schema

__all__ = ["ConfigError", "Duration", "GpuCount", "Memory", "Settings", "SlurmSignal", "Walltime",
           "config_error", "merge"]


class ConfigError(ValueError):
    """A profile, scale, setting or config file is wrong; the message names the file, the key and the fix."""


# ------------------------------------------------------------------------------------ typed values


class Unreadable(ConfigError):
    """A typed value that cannot be read; ``naming(key)`` says so for the key it was given under."""

    def __init__(self, typ: type["_Parsed"], text: Any, why: str, key: str) -> None:
        self.typ, self.text, self.why = typ, text, why
        super().__init__(self.naming(key))

    def naming(self, key: str) -> str:
        """The message for this value under ``key``, with an example of what to write."""
        return f"cannot read {key}={self.text!r} as {self.typ.kind}{self.why}; write it like {self.typ.example}"


class _Parsed(str):
    """A ``str`` that was read once into a number (``_value``); the text stays as the user wrote it."""

    kind: ClassVar[str] = "value"
    example: ClassVar[str] = ""

    def __new__(cls, text: Any, key: str = "value") -> "_Parsed":
        if isinstance(text, cls):
            return text
        if isinstance(text, bool) or not isinstance(text, (str, int)):
            raise cls._fail(key, text)
        value = cls._read(str(text).strip(), key)
        self = super().__new__(cls, str(text).strip())
        self._value = value
        return self

    @classmethod
    def _read(cls, text: str, key: str) -> int:
        raise NotImplementedError

    @classmethod
    def _fail(cls, key: str, text: Any, why: str = "") -> "Unreadable":
        return Unreadable(cls, text, why, key)

    @classmethod
    def _validate(cls, value: Any) -> "_Parsed":
        return cls(value)  # an Unreadable is a ValueError: pydantic keeps it, config_error names the key

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(str))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),))


class _Span(_Parsed):
    """A length of time, read once; ``.seconds`` is how long."""

    @property
    def seconds(self) -> int:
        """Its length in seconds."""
        return self._value


_WALL_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


class Walltime(_Span):
    """A Slurm walltime (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``); ``.seconds``."""

    kind = "a walltime"
    example = "'01:30:00' (HH:MM:SS) or '1-00:00:00'"

    @classmethod
    def _read(cls, text: str, key: str) -> int:
        m = _WALL_RE.match(text)
        if not m:
            raise cls._fail(key, text)
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
        if s >= 60 or (mi >= 60 and (days is not None or len(parts) == 3)):
            raise cls._fail(key, text, ": minutes or seconds of 60 or more (carry them into the next unit)")
        total = int(days or 0) * 86400 + h * 3600 + mi * 60 + s
        if total <= 0:
            raise cls._fail(key, text, ": it must be longer than zero")
        return total


_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
                   "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
                   "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


class Duration(_Span):
    """A length of time such as ``"55m"``, ``"30s"``, ``"1h"`` or a walltime ``"00:55:00"``; ``.seconds``."""

    kind = "a duration"
    example = "'55m', '3300s' or '00:55:00'"

    @classmethod
    def _read(cls, text: str, key: str) -> int:
        if ":" in text:
            try:
                return Walltime(text, key).seconds
            except ConfigError:
                raise cls._fail(key, text) from None
        m = _DURATION_RE.match(text)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _DURATION_UNITS:
            raise cls._fail(key, text)
        return int(float(m.group(1)) * _DURATION_UNITS[unit])


_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?$", re.IGNORECASE)
_MEM_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


class Memory(_Parsed):
    """An amount of memory: ``"4GiB"``, ``"500MB"``, ``"16G"`` or a byte count; ``.bytes``."""

    kind = "an amount of memory"
    example = "'4GiB', '500MB' or '16G'"

    @property
    def bytes(self) -> int:
        """The amount in bytes."""
        return self._value

    @classmethod
    def _read(cls, text: str, key: str) -> int:
        m = _MEM_RE.match(text)
        unit = (m.group(2) or "").lower() if m else None
        if not m or unit not in _MEM_UNITS:
            raise cls._fail(key, text)
        value = int(float(m.group(1)) * _MEM_UNITS[unit])
        if value <= 0:
            raise cls._fail(key, text, ": it must be more than zero")
        return value


_SIGNAL_RE = re.compile(r"^(?:B:)?(?:SIG)?(USR1|USR2)@(\d+)$", re.IGNORECASE)


class SlurmSignal(_Parsed):
    """The warning Slurm sends before the time limit: ``"USR1@90"`` (signal, seconds ahead); ``.name``, ``.lead``."""

    kind = "a warning signal"
    example = "'USR1@90' (SIGUSR1 90 seconds before the time limit) or 'USR2@120'"

    @classmethod
    def _read(cls, text: str, key: str) -> int:
        m = _SIGNAL_RE.match(text)
        if not m:
            raise cls._fail(key, text, ": labkit's workers catch USR1 or USR2, given as NAME@SECONDS")
        lead = int(m.group(2))
        if not 10 <= lead <= 65535:
            raise cls._fail(key, text, ": the lead must be 10 to 65535 seconds, time enough to save a checkpoint")
        return lead

    @property
    def name(self) -> str:
        """The signal's name without ``SIG``: ``USR1`` or ``USR2``."""
        return _SIGNAL_RE.match(str(self)).group(1).upper()

    @property
    def lead(self) -> int:
        """Seconds before the time limit that Slurm sends it."""
        return self._value

    @property
    def directive(self) -> str:
        """The sbatch option: ``--signal=B:USR1@90`` (to the batch shell, which execs the worker)."""
        return f"--signal=B:{self.name}@{self.lead}"


GpuCount = Annotated[int, Field(ge=0, strict=True)]
"""GPUs asked per worker: a whole number >= 0."""


# --------------------------------------------------------------------------------------- errors


def config_error(exc: ValidationError, *, where: str = "", kind: str = "", prefix: str = "",
                 valid: list[str] | None = None, model: type[BaseModel] | None = None) -> ConfigError:
    """The ConfigError for a pydantic ValidationError: ``where`` (a file, a scale), then per problem
    the key (``prefix`` + its path), what is wrong, and for an unknown ``kind`` key the valid ones
    (of the nested record it is in, when ``model`` is given)."""
    lines = []
    for err in exc.errors(include_url=False):
        key = (prefix + ".".join(str(p) for p in err["loc"])).rstrip(".")
        if err["type"] == "extra_forbidden":
            keys = _nested_keys(model, err["loc"][:-1]) if len(err["loc"]) > 1 else None
            choices = f"; valid keys: {', '.join(keys or valid or [])}" if keys or valid else ""
            lines.append(f"unknown {kind + ' ' if kind else ''}key {key}{choices}")
        elif err["type"] == "missing":
            lines.append(f"{key} is required")
        elif err["type"] in ("value_error", "assertion_error"):
            error = err.get("ctx", {}).get("error", err["msg"])
            msg = error.naming(str(err["loc"][-1])) if isinstance(error, Unreadable) and err["loc"] else str(error)
            lines.append(f"{key}: {msg}" if key else msg)
        else:
            lines.append(f"{key} {_must(err)}, not {err['input']!r}")
    head = f"{where}: " if where else ""
    return ConfigError(head + "; ".join(lines))


def _nested_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """The keys of the record at ``loc`` inside ``model`` (``("container",)`` -> Container's), or None."""
    for part in loc:
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return None
        inner = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[0] if inner else None
    return sorted(model.model_fields) if model is not None else None


def _must(err: Any) -> str:
    """What a value must be, in the words of a settings file ("must be positive", "must be 1 or more")."""
    ctx = err.get("ctx", {})
    if err["type"] == "greater_than":
        return "must be positive" if ctx["gt"] == 0 else f"must be more than {ctx['gt']}"
    if err["type"] == "greater_than_equal":
        return f"must be {ctx['ge']} or more"
    if err["type"] == "less_than":
        return f"must be less than {ctx['lt']}"
    if err["type"] == "less_than_equal":
        return f"must be {ctx['le']} or less"
    msg = err["msg"]
    return "must be" + msg[len("Input should be"):] if msg.startswith("Input should be") else msg


# ------------------------------------------------------------------------------------- settings


class Settings(BaseModel):
    """Typed settings validated once; unknown keys and wrong types raise ConfigError naming key and fix."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)
    noun: ClassVar[str] = ""  # what an error calls these settings ("profile", "train", ...)

    @classmethod
    def valid_keys(cls) -> list[str]:
        """Every key this class takes, sorted: what an error on an unknown key lists."""
        return sorted(cls.model_fields)

    @classmethod
    def build(cls, data: Mapping[str, Any], *, where: str = "", prefix: str = "") -> Any:
        """Validate ``data`` into settings; a problem is a ConfigError naming ``where`` and the key."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise config_error(exc, where=where, kind=cls.noun, prefix=prefix, valid=cls.valid_keys(), model=cls) from None

    def __init__(self, **data: Any) -> None:
        """Validate keyword arguments; a problem is a ConfigError naming the class and the key."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, where=type(self).__name__, kind=self.noun, valid=self.valid_keys()) from None

    # The same mark pydantic puts on BaseModel.__init__ (and RootModel's): this __init__ only turns
    # the error into a ConfigError, so model_validate need not call it (tests/test_settings.py checks).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @model_validator(mode="before")
    @classmethod
    def _lists_to_tuples(cls, data: Any) -> Any:
        """YAML and JSON give lists; the tuple fields take them (strict mode alone would not)."""
        if not isinstance(data, dict):
            return data
        return {k: tuple(v) if isinstance(v, list) and k in cls._tuple_fields() else v for k, v in data.items()}

    @classmethod
    def _tuple_fields(cls) -> set[str]:
        """The fields whose type is a tuple (or an optional one)."""
        return {name for name, f in cls.model_fields.items() if "tuple" in repr(f.annotation)}

    def fields(self) -> dict[str, Any]:
        """The settings as a dict of their values (nested records stay objects)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def replace(self, **changes: Any) -> Any:
        """A validated copy with some keys changed (a dict given for a nested record changes only
        the keys it names)."""
        data = self.fields()
        for key, value in changes.items():
            data[key] = merge(data[key], value) if key in data else value
        return type(self).build(data, where=type(self).__name__)


def merge(old: Any, new: Any) -> Any:
    """``new``; but a dict ``new`` over a dict or record ``old`` changes only the keys it names."""
    if not isinstance(new, dict):
        return new
    if isinstance(old, dict):
        return {**old, **new}
    if isinstance(old, BaseModel):
        return {**dict(old), **new}
    if dataclasses.is_dataclass(old):
        return {**{f.name: getattr(old, f.name) for f in dataclasses.fields(old)}, **new}
    return new
