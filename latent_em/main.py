"""Entry point: `python -m latent_em.main --config=configs/X.py[:variant] --workdir=DIR`.

Fields are overridden on the command line (`--config.optim.lr=3e-4`); `config.job` picks the job.
"""
from __future__ import annotations

import re
import sys

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_library_info(record) -> bool:
  """Keeps Orbax's per-save INFO chatter out of the console (warnings still show)."""
  return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def _enable_compilation_cache() -> None:
  """Persistent XLA cache, so that stages and reruns with the same shapes skip recompiling.

  $JAX_COMPILATION_CACHE_DIR wins (set it to "" to disable); default ~/.cache/latent_em/xla.
  """
  import os
  import jax
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if directory is None:
    directory = os.path.join(os.path.expanduser("~"), ".cache", "latent_em", "xla")
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(_quiet_library_info)
  _enable_compilation_cache()
  from latent_em import config_lib, jobs, runtime, sharding
  config = _CONFIG.value
  try:
    runtime.validate(config)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  sharding.maybe_initialize_distributed(config.get("distributed", "auto"))
  logging.info("config:\n%s", config)
  try:
    jobs.run(config, _WORKDIR.value)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


def _parse_flags(argv):
  """absl's flag parsing; a ConfigError raised while loading --config (an unknown variant, a bad
  value) stops with its one-line message instead of the config loader's traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    found = re.findall(r"ConfigError: (.*)", str(e))
    sys.exit(f"config error: {found[-1]}" if found else f"FATAL Flags parsing error: {e}\n"
             "Pass --helpshort or --helpfull to see help on flags.")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
