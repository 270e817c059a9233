"""Strict config loading: dataclasses from dicts, YAML files and ``--set key=value`` overrides.

Every config in dser is a dataclass whose fields carry a ``help`` string in their metadata.
``from_dict`` builds one from a (YAML-parsed) dict and fails loudly on an unknown or wrongly
typed key, naming the key, where it was found and the allowed keys. One string where a list of
strings is expected is the list of that one (``--set data.train=shards/x/train``).

Usage::

    @dataclass
    class LoraConfig:
        rank: int = knob(8, "LoRA rank r")

    cfg = from_dict(LoraConfig, {"rank": 16}, where="model.lora")
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config key or value the user must fix; the message names the key."""


def knob(default: Any = MISSING, help: str = "", *, factory: Any = MISSING):
    """A dataclass field with help text (shown by ``dser config --help-keys`` and in errors)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": help})
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where lossless (int → float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {' | '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        inner = args[0] if args else Any
        if isinstance(value, str) and origin is list and inner is str:
            value = [value]  # `--set data.train=shards/x/train`: a list of that one
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


def from_dict(cls, data: dict | None, where: str = "config"):
    """Build dataclass ``cls`` from ``data``, strictly.

    Args:
        cls: a dataclass type whose fields may themselves be dataclasses.
        data: the mapping (e.g. parsed YAML); None means all defaults.
        where: dotted location for error messages (``config``, ``model.lora`` …).

    Raises:
        ConfigError: unknown key (with the allowed keys), wrong type, or missing required key.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; allowed keys in {where}: {', '.join(names)}")
    kwargs = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"missing key {where}.{f.name}: {f.metadata.get('help', '')}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj) -> Any:
    """A dataclass (tree) as plain YAML-safe data."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (plain data only: a ``!!python/…`` tag is an error, never an
    object) that also reads ``5e-5``, ``1e3`` and ``-2E+4`` as floats, as YAML 1.2 and every
    user does; PyYAML's YAML 1.1 resolver wants a dot (``5.0e-5``) and reads them as strings."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    """``text`` as plain YAML data, read with :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict; values are parsed as YAML.

    Raises:
        ConfigError: an override without ``=``, or a value that is not plain YAML (naming the key).
    """
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"--set {key}: {p} is not a section")
            node = node[p]
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as e:
            why = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"--set {key.strip()}: {raw!r} is not a plain YAML value ({why}); quote text, "
                              f"e.g. --set {key.strip()}='\"…\"'") from e
    return data


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping, with a clear error for a missing file or bad syntax."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory: give a YAML run config file")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = parse_yaml(path.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data
