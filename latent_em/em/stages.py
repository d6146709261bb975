"""Resumable stages: each stage owns a sub-directory of the workdir and a completion marker.

A stage that finished wrote `<dir>/STAGE_DONE.json` (atomically, last) holding its outputs and
the spec it ran with. Rerunning the same experiment skips finished stages and re-enters the
first unfinished one, which resumes inside itself (train checkpoints, E-step and synthesis
shards). A finished stage whose spec changed is an error: its outputs belong to another
experiment.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import ml_collections
from absl import logging

from latent_em import config_lib, io_utils

MARKER = "STAGE_DONE.json"


def derive(config: ml_collections.ConfigDict, overrides: dict[str, Any]
           ) -> ml_collections.ConfigDict:
  """A deep copy of `config` with dotted keys set, e.g. {"train.steps": 10}."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for dotted, value in overrides.items():
      node = out
      *parents, leaf = dotted.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = tuple(value) if isinstance(value, list) else value
  return out


def _canonical(spec: Any) -> Any:
  return json.loads(json.dumps(spec, sort_keys=True, default=str))


class Stages:
  """Runs named stages under `workdir`, once each."""

  def __init__(self, workdir: str, *, log: Callable[[str], None] | None = None):
    self.workdir = workdir
    self.log = log or (lambda msg: logging.info("%s", msg))
    self.timings: dict[str, float] = {}

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def done(self, name: str) -> dict[str, Any] | None:
    marker = os.path.join(self.path(name), MARKER)
    return io_utils.read_json(marker) if os.path.exists(marker) else None

  def run(self, name: str, spec: dict[str, Any], fn: Callable[[str], dict[str, Any]]
          ) -> dict[str, Any]:
    """Runs fn(stage_dir) unless `name` already finished with the same spec; returns outputs."""
    spec = _canonical(spec)
    prior = self.done(name)
    if prior is not None:
      if prior.get("spec") != spec:
        changed = sorted(k for k in set(spec) | set(prior.get("spec", {}))
                         if spec.get(k) != prior.get("spec", {}).get(k))
        raise config_lib.ConfigError(
            f"stage {name!r} in {self.workdir} finished with a different setup (changed: "
            f"{', '.join(changed)}); use a new --workdir, or delete {self.path(name)} to redo "
            "it and everything after it")
      self.log(f"[{name}] done earlier ({prior['wall_s']:.0f} s); skipping")
      self.timings[name] = 0.0
      return prior["outputs"]
    directory = self.path(name)
    os.makedirs(directory, exist_ok=True)
    self.log(f"[{name}] starting")
    start = time.perf_counter()
    outputs = fn(directory)
    wall = time.perf_counter() - start
    self.timings[name] = wall
    io_utils.write_json(os.path.join(directory, MARKER),
                        {"spec": spec, "outputs": _canonical(outputs), "wall_s": wall})
    self.log(f"[{name}] done in {wall:.0f} s")
    return _canonical(outputs)
