"""Typed views of ml_collections configs.

Each module that reads a config section declares a frozen dataclass and converts the section at
its boundary with `from_config(MyConfig, config.section, "config.section")`. Unknown keys, missing
required keys and values of the wrong type stop with a ConfigError naming the full key.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Mapping, TypeVar

import ml_collections

T = TypeVar("T")


class ConfigError(ValueError):
  """A user-facing configuration mistake; the message names the key and the fix."""


def _as_dict(section: Any) -> dict[str, Any]:
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  if dataclasses.is_dataclass(section):
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
  raise ConfigError(f"expected a config section (dict), got {type(section).__name__}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
  """Checks/coerces one value against a (possibly Optional/tuple/enum) annotation."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if annotation is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
  if origin is typing.Literal:
    if value not in args:
      raise ConfigError(f"{key}={value!r} is not one of {list(args)}")
    return value
  if origin in (tuple, list):
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{key}={value!r} should be a sequence")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple and args:
      if len(args) != len(value):
        raise ConfigError(f"{key}={value!r} should have {len(args)} entries")
      return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return tuple(value)
  if origin is dict or annotation is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}={value!r} should be a mapping")
    return dict(value)
  if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
    try:
      return annotation(value)
    except ValueError:
      allowed = [m.value for m in annotation]
      raise ConfigError(f"{key}={value!r} is not one of {allowed}") from None
  if dataclasses.is_dataclass(annotation):
    return from_config(annotation, value, key)
  if annotation is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}={value!r} should be True or False")
    return value
  if annotation is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}={value!r} should be a number")
    return float(value)
  if annotation is int:
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise ConfigError(f"{key}={value!r} should be an integer")
    return value
  if annotation is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key}={value!r} should be a string")
    return value
  return value


def from_config(cls: type[T], section: Any, prefix: str = "config") -> T:
  """Builds dataclass `cls` from a config section, rejecting unknown or malformed keys."""
  if isinstance(section, cls):
    return section
  values = _as_dict(section)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    key = unknown[0]
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
    raise ConfigError(
        f"unknown config key {prefix}.{key}{hint} (known keys: {', '.join(sorted(fields))})")
  kwargs = {}
  for name, field in fields.items():
    if name in values:
      kwargs[name] = _coerce(values[name], hints[name], f"{prefix}.{name}")
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ConfigError(f"missing required config key {prefix}.{name}")
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{prefix}: {e}") from None


def check(condition: bool, key: str, message: str) -> None:
  """Raises ConfigError(`key`: message) unless condition holds (for __post_init__ checks)."""
  if not condition:
    raise ConfigError(f"{key}: {message}")
