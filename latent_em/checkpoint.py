"""Orbax checkpoints: the train state together with the input-pipeline position, and
params-only checkpoints (ours or Hugging Face) used by `init_from`.

Layout of a workdir:
  checkpoints/<step>/state   train state (sharded arrays, restored into their shardings)
  checkpoints/<step>/data    {"batches_consumed": n}: where the input pipeline resumes
  params/                    params-only export (written at the end of a run)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from latent_em import config_lib


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """config.checkpoint"""
  every_steps: int = 500
  keep: int = 3
  async_save: bool = True

  def __post_init__(self):
    config_lib.check(self.every_steps > 0, "config.checkpoint.every_steps", "must be positive")
    config_lib.check(self.keep > 0, "config.checkpoint.keep", "must be positive")


class Checkpointer:
  """Saves and restores {state, data position} under `directory` (resumable runs)."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_params(params: Any, directory: str) -> str:
  """Writes a params-only checkpoint (atomic: Orbax commits through a temp dir)."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, params, force=True)
    ckptr.wait_until_finished()
  return directory


def is_params_checkpoint(path: str) -> bool:
  return os.path.isdir(path) and (
      os.path.exists(os.path.join(path, "_METADATA"))
      or os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")))


def load_params(directory: str, abstract_params: Any = None) -> Any:
  """Restores params saved by `save_params`, into `abstract_params`' shardings if given."""
  directory = os.path.abspath(directory)
  if not is_params_checkpoint(directory):
    raise FileNotFoundError(
        f"{directory} is not a params checkpoint (expected a directory written by "
        "latent_em.checkpoint.save_params, e.g. WORKDIR/params, or a Hugging Face model dir)")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is None:
      return ckptr.restore(directory)
    return ckptr.restore(directory, abstract_params)


def find_params_source(path: str, key: str = "config.train.init_from") -> str:
  """Classifies an init_from path: "hf" (config.json + safetensors), "params" or "workdir"."""
  if not path:
    raise config_lib.ConfigError(f"{key} is empty")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{key}={path!r} does not exist; give a Hugging Face model dir, a "
                            "params checkpoint dir, or a workdir of a finished run")
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  if is_params_checkpoint(path):
    return "params"
  if is_params_checkpoint(os.path.join(path, "params")):
    return "workdir"
  raise FileNotFoundError(
      f"{key}={path!r} holds neither a Hugging Face checkpoint (config.json + *.safetensors) "
      "nor a latent_em params checkpoint (WORKDIR/params)")


def log_restore(step: int, directory: str) -> None:
  if jax.process_index() == 0:
    logging.info("resuming from step %d in %s", step, directory)
