"""Config dataclasses -> command-line flags, config files and environment variables, type-checked.

Each component has one frozen dataclass whose fields are defaulted and documented with
``opt(default, help)``. ``add_arguments`` turns the fields into flags (``memory_budget_bytes``
-> ``--memory-budget-bytes``, plus any short alias), ``from_args`` builds the dataclass back,
``from_mapping`` reads a JSON/TOML file's table with the same checks (unknown keys rejected), and
``from_env`` reads ``EDGESPLIT_<FIELD>`` variables (``EDGESPLIT_MEMORY_BUDGET_BYTES``, or the
alias's ``EDGESPLIT_MEMORY_BUDGET``), so containers and systemd units need no flags. The CLI
layers them: defaults < config file < environment < flags. Sizes accept units (``2GiB``,
``512MB``) for ``*_bytes`` fields.

Strings (flags, variables) are parsed into the field's type; any other value (a file's, a caller's)
must have that type already, so TOML's ``heartbeat_ms = true`` or ``store = {}`` is refused rather
than read as 1 ms or a directory named ``{}``. Endpoint fields given by a variable or a file are
checked where they were given, so the message names the variable or the file's key, not a flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from edgesplit.partitioner.errors import UsageError

from .endpoints import BIND_FIELDS, CONNECT_FIELDS, METRICS_FIELDS, check_endpoint, check_metrics_bind
from .errors import ConfigError

T = TypeVar("T")

ENV_PREFIX = "EDGESPLIT_"
# Set by a local cluster (``cluster.PARENT_ENV``) for the daemons it starts, which get every setting as a flag:
# the environment they inherit was meant for the parent command, so ``from_env`` ignores it there.
CHILD_ENV = "EDGESPLIT_PARENT_PID"

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def opt(default: Any, help: str, *, alias: str | None = None, choices: list[str] | None = None) -> Any:
    """A config field: its default, its help text, an optional extra flag name and choices."""
    return dataclasses.field(default=default, metadata={"help": help, "alias": alias, "choices": choices})


def parse_size(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648; plain numbers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"size {text!r} is not a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation like ``int``, ``str | None``."""
    if isinstance(tp, str):
        tp = eval_annotation(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def eval_annotation(text: str) -> Any:
    """Annotations are strings under ``from __future__ import annotations``; resolve the simple ones."""
    table = {"int": int, "float": float, "str": str, "bool": bool}
    parts = [p.strip() for p in text.split("|")]
    base = [table[p] for p in parts if p != "None" and p in table]
    if len(base) != 1 or any(p not in table and p != "None" for p in parts):
        raise ConfigError(f"config fields must be int, float, str or bool (optionally | None), got {text!r}")
    return base[0] | None if "None" in parts else base[0]


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    """What a config file's value is, in the file's words (TOML/JSON): 'a boolean', 'a table', ..."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = [(int, "an integer"), (float, "a number"), (str, "a string"), (dict, "a table"), ((list, tuple), "a list")]
    return next((word for types_, word in kinds if isinstance(value, types_)), f"a {type(value).__name__}")


def _typed(cls: type, name: str, tp: type, value: Any) -> Any:
    """A value that is not a string must already be of the field's type (an int for a float is fine, and a
    whole float for an int); a bool is never a number, and nothing but a string is text."""
    whole = isinstance(value, float) and value.is_integer()
    ok = {bool: isinstance(value, bool),
          int: (isinstance(value, int) and not isinstance(value, bool)) or whole,
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: False}[tp]
    if not ok:
        raise ConfigError(f"{cls.__name__}.{name} must be {_TYPE_WORDS[tp]}, got {value!r} ({_kind(value)})")
    return tp(value)


def _convert(cls: type, name: str, value: Any, typed: bool = False) -> Any:
    """One field's value, checked against its annotation and choices.

    Args:
        typed: ``value`` comes from a typed file (JSON/TOML): a string is accepted only for a text
            field or a size (``"2GiB"``); "5" for an integer is refused, not parsed.
    """
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp, optional = _base_type(f.type)
    blank = isinstance(value, str) and not value.strip()
    if value is None or (blank and optional):  # an empty optional setting is an unset one, as in from_env
        if optional:
            return None
        raise ConfigError(f"{cls.__name__}.{name} cannot be empty")
    if blank and f.default != "":
        # "" is a setting only where it is the default (metrics_bind: off); a store, bind or host of "" is never
        # meant (an empty store would be the current directory), and a number or a switch has no empty value
        raise ConfigError(f"{cls.__name__}.{name} cannot be empty (default: {f.default!r})")
    if not isinstance(value, str):
        out = _typed(cls, name, tp, value)
    elif typed and tp is not str and not (tp is int and name.endswith("_bytes")):
        raise ConfigError(f"{cls.__name__}.{name} must be {_TYPE_WORDS[tp]}, got {value!r} (a string); "
                          "write it without quotes")
    else:
        out = _parse(cls, name, tp, value)
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{cls.__name__}.{name} must be one of {choices}, got {out!r}")
    return out


def _parse(cls: type, name: str, tp: type, value: str) -> Any:
    """A flag's or variable's text as the field's type ("yes" -> True, "2GiB" -> bytes, "5" -> 5)."""
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int and name.endswith("_bytes"):
            return parse_size(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{cls.__name__}.{name} must be {tp.__name__}, got {value!r}") from None


def check_endpoint_field(name: str, value: Any, origin: str, glue: str) -> None:
    """Check an endpoint-valued field (bind, coordinator, advertise, metrics_bind) where it was given.

    The message names the origin, not a flag the user never passed: ``EDGESPLIT_BIND=garbage`` (origin
    ``EDGESPLIT_BIND``, glue ``=``) or ``bind = garbage`` (a file's key, glue `` = ``). Flags are checked
    later, on the merged config (``endpoints.check_config_endpoints``).
    """
    try:
        if name in METRICS_FIELDS:
            check_metrics_bind(value, origin)
        elif name in BIND_FIELDS + CONNECT_FIELDS and value is not None:
            check_endpoint(value, origin, bind=name in BIND_FIELDS)
    except UsageError as e:  # the checks write "FLAG VALUE": make it "VAR=VALUE" or "key = VALUE"
        raise ConfigError(str(e).replace(f"{origin} ", f"{origin}{glue}")) from None


class FileTable(dict[str, Any]):
    """A config file's table that remembers where it came from, so ``from_mapping`` names the file in errors."""

    def __init__(self, values: Mapping[str, Any], source: str) -> None:
        super().__init__(values)
        self.source = source  # "w.toml [worker]" or "w.toml"


def from_mapping(cls: type[T], values: Mapping[str, Any], base: T | None = None) -> T:
    """Build ``cls`` from a mapping (a config file's table); unknown keys are an error.

    A :class:`FileTable` (``load_file``'s result) is checked as a typed file: values must have their
    field's type, endpoints are checked, and every error names the file and the key.
    """
    source = values.source if isinstance(values, FileTable) else None
    where = f"config file {source}: " if source else ""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    start = base if base is not None else cls()
    converted: dict[str, Any] = {}
    for key, value in values.items():
        try:
            converted[key] = _convert(cls, key, value, typed=source is not None)
        except ConfigError as e:
            raise ConfigError(f"{where}key {key!r}: {e}" if source else str(e)) from None
        if source:
            try:
                check_endpoint_field(key, converted[key], key, " = ")
            except ConfigError as e:  # "bind = garbage is not an endpoint ..."
                raise ConfigError(f"{where}{e}") from None
    return dataclasses.replace(start, **converted)


def load_file(path: str | Path, section: str | None = None) -> FileTable:
    """Read a JSON or TOML config file: its ``[section]`` table if it has one, else its top-level keys.

    Both at once is refused: top-level settings beside a ``[section]`` table would be dropped
    silently (other tables are left alone: one file may hold ``[worker]`` and ``[coordinator]``).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there)
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:] or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table of key = value")
    if section is not None and isinstance(data.get(section), dict):
        loose = sorted(k for k, v in data.items() if k != section and not isinstance(v, dict))
        if loose:
            raise ConfigError(f"config file {p} has top-level keys {loose} and a [{section}] table; move them into "
                              f"[{section}] (top-level keys are read only in a file without a [{section}] table)")
        return FileTable(data[section], f"{p} [{section}]")
    return FileTable(data, str(p))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                  required: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (help = the field's help + its default)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(f.type)
        names = [flag_name(f.name)] + ([f.metadata["alias"]] if f.metadata.get("alias") else [])
        default = f.default
        shown = human_size(default) if f.name.endswith("_bytes") and isinstance(default, int) else default
        help_text = f.metadata.get("help", "")
        if f.name not in required and default is not None and tp is not bool:
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            elif f.name.endswith("_bytes"):
                kwargs["metavar"] = "SIZE"
            elif f.name.endswith("_ms"):
                kwargs["metavar"] = "MS"
            else:
                kwargs["metavar"] = {int: "N", float: "X"}.get(tp, f.name.split("_")[-1].upper())
        if f.name in required:
            kwargs["required"] = True
        group.add_argument(*names, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, base: T | None = None) -> T:
    """Build ``cls`` from parsed flags (only the flags given override ``base``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return from_mapping(cls, given, base)


def env_names(cls: type) -> dict[str, str]:
    """``{variable: field}``: ``EDGESPLIT_<FIELD>`` for every field, plus ``EDGESPLIT_<ALIAS>`` for a long alias."""
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        names[ENV_PREFIX + f.name.upper()] = f.name
        alias = f.metadata.get("alias")
        if alias and alias.startswith("--"):
            names[ENV_PREFIX + alias[2:].replace("-", "_").upper()] = f.name
    return names


def from_env(cls: type[T], base: T | None = None, environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from ``EDGESPLIT_*`` variables over ``base``, with the checks of a config file.

    Variables naming no field of ``cls`` are left alone: one environment serves every command (a
    worker's ``EDGESPLIT_DEVICE`` means nothing to the coordinator) and other tools set their own.
    An empty variable means "unset" for an optional field (``EDGESPLIT_NAME=``: the host name), and
    the empty string for a text field whose default is empty (``EDGESPLIT_METRICS_BIND=``: off). For
    any other field it is an error naming the variable: a number or a switch has no empty value, and
    an empty store, bind or coordinator is never meant (``EDGESPLIT_STORE=`` would make the current
    directory the store). Endpoint values are checked here, so a bad one names its variable. Ignored
    entirely in a daemon started by a local cluster (``CHILD_ENV``).

    Args:
        cls: the config dataclass.
        base: the config to start from (defaults, or a config file's values).
        environ: the variables; ``os.environ`` unless given.

    Returns:
        ``base`` with the fields the environment sets replaced.
    """
    env = os.environ if environ is None else environ
    start = base if base is not None else cls()
    if CHILD_ENV in env:
        return start
    types_ = {f.name: _base_type(f.type) for f in dataclasses.fields(cls)}  # name -> (type, optional?)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for var, name in env_names(cls).items():
        if var not in env:
            continue
        if name in source:
            raise ConfigError(f"environment variables {source[name]} and {var} both set {cls.__name__}.{name}; "
                              f"unset one of them")
        text = env[var].strip()
        tp, optional = types_[name]
        if not text and not optional and (tp is not str or defaults[name] != ""):
            raise ConfigError(f"environment variable {var} is empty; set a value for {cls.__name__}.{name} "
                              f"or unset it")
        try:
            values[name] = _convert(cls, name, text if text or not optional else None)
        except ConfigError as e:
            raise ConfigError(f"environment variable {var}={env[var]!r}: {e}") from None
        try:
            check_endpoint_field(name, values[name], var, "=")
        except ConfigError as e:  # "EDGESPLIT_BIND=garbage is not an endpoint ..."
            raise ConfigError(f"environment variable {e}") from None
        source[name] = var
    return dataclasses.replace(start, **values)


def describe(cfg: Any) -> str:
    """``key=value`` pairs of a config, for logs and benchmark headers."""
    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
