"""Config dataclasses -> command-line flags and config files, type-checked, unknown keys rejected.

Each component has one frozen dataclass whose fields are defaulted and documented with
``opt(default, help)``. ``add_arguments`` turns the fields into flags (``memory_budget_bytes``
-> ``--memory-budget-bytes``, plus any short alias), ``from_args`` builds the dataclass back,
and ``from_mapping`` reads a JSON/TOML file's table with the same checks. Sizes accept
units (``2GiB``, ``512MB``) for ``*_bytes`` fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

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


def _convert(cls: type, name: str, value: Any) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp, optional = _base_type(f.type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{cls.__name__}.{name} cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int and name.endswith("_bytes"):
            return parse_size(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        out = tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{cls.__name__}.{name} must be {tp.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{cls.__name__}.{name} must be one of {choices}, got {out!r}")
    return out


def from_mapping(cls: type[T], values: Mapping[str, Any], base: T | None = None) -> T:
    """Build ``cls`` from a mapping (a config file's table); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    start = base if base is not None else cls()
    return dataclasses.replace(start, **{k: _convert(cls, k, v) for k, v in values.items()})


def load_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a JSON or TOML config file, optionally one ``[section]`` of it."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:] or 'JSON'}: {e}") from None
    if section is not None and section in data and isinstance(data[section], dict):
        data = data[section]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table of key = value")
    return data


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


def describe(cfg: Any) -> str:
    """``key=value`` pairs of a config, for logs and benchmark headers."""
    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
