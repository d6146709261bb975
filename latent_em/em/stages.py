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


def _replace_paths(obj: Any, old: str, new: str) -> Any:
  if isinstance(obj, str):
    return obj.replace(old, new)
  if isinstance(obj, list):
    return [_replace_paths(x, old, new) for x in obj]
  if isinstance(obj, dict):
    return {k: _replace_paths(v, old, new) for k, v in obj.items()}
  return obj


def _origin(path: str, name: str) -> str | None:
  """The workdir that computed the stage at `path` (stage `name`): `path`'s own workdir, or,
  where `path` is a link left by reuse (possibly of a stage that was itself reused), the
  workdir at the end of the links, spelled as the links spell it; None if a link leads
  elsewhere."""
  tail = os.sep + os.path.normpath(name)
  if not path.endswith(tail):
    return None
  for _ in range(40):
    if not os.path.islink(path):
      return path[:-len(tail)]
    target = os.readlink(path)
    path = target if os.path.isabs(target) else os.path.join(os.path.dirname(path), target)
    if not path.endswith(tail):
      return None
  return None


class Stages:
  """Runs named stages under `workdir`, once each.

  `reuse_from`: the workdir of another experiment (e.g. the K = 4 run when sweeping K); a stage
  that finished there with the same spec (paths under that workdir read as paths under this
  one) is linked into this workdir instead of being recomputed.
  """

  def __init__(self, workdir: str, *, reuse_from: str = "",
               log: Callable[[str], None] | None = None):
    self.workdir = workdir
    self.reuse_from = os.path.abspath(reuse_from) if reuse_from else ""
    self.log = log or (lambda msg: logging.info("%s", msg))
    self.timings: dict[str, float] = {}

  def _try_reuse(self, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    if not self.reuse_from:
      return None
    # A stage the other experiment itself reused is taken from the experiment that ran it:
    # its marker's paths are that workdir's.
    origin = _origin(os.path.join(self.reuse_from, name), name)
    if origin is None:
      return None
    marker = os.path.join(origin, name, MARKER)
    if not os.path.exists(marker):
      return None
    other = io_utils.read_json(marker)
    if _replace_paths(other.get("spec"), origin, self.workdir) != spec:
      return None
    if self._reads_local_outputs(spec):
      return None
    target = self.path(name)
    if os.path.lexists(target):
      if os.path.islink(target):
        os.remove(target)
      else:
        import shutil  # pylint: disable=g-import-not-at-top
        shutil.rmtree(target)  # an unfinished attempt of this stage
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.symlink(os.path.join(origin, name), target)
    self.log(f"[{name}] reused from {origin}")
    self.timings[name] = 0.0
    return _replace_paths(other["outputs"], origin, self.workdir)

  def _reads_local_outputs(self, spec: Any) -> bool:
    """Whether the spec names outputs of a stage computed in this workdir (not linked): equal
    paths then hold different data, so the other experiment's stage cannot stand in."""
    text = json.dumps(spec)
    prefix = self.workdir.rstrip("/") + "/"
    start = text.find(prefix)
    while start != -1:
      end = start + len(prefix)
      while end < len(text) and text[end] not in '"\\':
        end += 1
      parts = text[start + len(prefix):end].split("/")
      for i in range(1, len(parts) + 1):
        stage = os.path.join(self.workdir, *parts[:i])
        if os.path.exists(os.path.join(stage, MARKER)):
          if not os.path.islink(stage):
            return True
          break
      start = text.find(prefix, end)
    return False

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def done(self, name: str) -> dict[str, Any] | None:
    """The stage's marker ({"spec", "outputs", "wall_s"}) if it finished, else None; for a
    stage linked from another experiment, with that workdir's paths read as this one's."""
    marker = os.path.join(self.path(name), MARKER)
    if not os.path.exists(marker):
      return None
    info = io_utils.read_json(marker)
    if os.path.islink(self.path(name)):
      origin = _origin(self.path(name), name)
      if origin is not None:
        info = _replace_paths(info, origin, self.workdir)
    return info

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
    reused = self._try_reuse(name, spec)
    if reused is not None:
      return reused
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
