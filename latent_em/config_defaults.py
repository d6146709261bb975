"""Base ConfigDict with every section at its typed defaults, and big_vision-style arg parsing.

Experiment files in configs/ start from `base()` and change what they need, so that every key
exists (and can be overridden with --config.section.key=value) and is checked by its dataclass.
"""
from __future__ import annotations

import dataclasses

import ml_collections


def _to_config(obj) -> ml_collections.ConfigDict:
  """A dataclass instance as a ConfigDict (nested dataclasses become nested sections)."""
  values = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    values[f.name] = _to_config(value) if dataclasses.is_dataclass(value) else value
  return ml_collections.ConfigDict(values)


def _section(cls) -> ml_collections.ConfigDict:
  return _to_config(cls())


def base() -> ml_collections.ConfigDict:
  from latent_em import runtime
  config = ml_collections.ConfigDict()
  config.job = "train"
  config.seed = 0
  config.distributed = "auto"
  for name, cls in runtime._sections().items():
    config[name] = _section(cls)
  return config


def parse_arg(arg: str | None, **defaults):
  """`"variant=small,runlocal"` -> ConfigDict(variant="small", runlocal=True, ...defaults).

  A name that is not one of `defaults` stops with a ConfigError listing the known variants
  (a misspelt variant must not silently run the default experiment).
  """
  from latent_em import config_lib  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in defaults:
      known = ", ".join(k if isinstance(v, bool) else f"{k}=..." for k, v in defaults.items())
      raise config_lib.ConfigError(
          f"unknown config variant {key!r} (in {arg!r}); the known variants are: {known}")
    if not eq:
      out[key] = True
      continue
    default = defaults.get(key)
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out
