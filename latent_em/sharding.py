"""Device mesh, logical-axis rules and sharding helpers.

The model names its axes logically ("embed", "mlp", "activation_batch", ...); this module is the
only place that maps them to mesh axes ("data", "fsdp", "tensor"), through the rules table of
`config.mesh.rules`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from latent_em import config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_kv", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """config.mesh: mesh shape over (data, fsdp, tensor); -1 fills the remaining devices."""
  shape: tuple[int, ...] = (-1, 1, 1)
  axis_names: tuple[str, ...] = MESH_AXES
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def __post_init__(self):
    config_lib.check(len(self.shape) == len(self.axis_names), "config.mesh.shape",
                     f"{self.shape} needs one entry per axis in {self.axis_names}")
    config_lib.check(sum(1 for s in self.shape if s == -1) <= 1, "config.mesh.shape",
                     "at most one axis may be -1")
    config_lib.check(all(s == -1 or s >= 1 for s in self.shape), "config.mesh.shape",
                     f"{self.shape}: sizes must be >= 1 or -1")
    known = set(self.axis_names)
    for rule in self.rules:
      config_lib.check(len(rule) == 2, "config.mesh.rules", f"{rule!r} is not a (logical, mesh) pair")
      target = rule[1]
      targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
      config_lib.check(set(targets) <= known, "config.mesh.rules",
                       f"rule {rule!r} names a mesh axis not in {self.axis_names}")

  @property
  def rules_list(self) -> list[tuple[str, Any]]:
    return [(name, tuple(t) if isinstance(t, list) else t) for name, t in self.rules]


def resolve_shape(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % fixed:
      raise config_lib.ConfigError(
          f"config.mesh.shape={shape}: {num_devices} devices are not divisible by {fixed}")
    shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise config_lib.ConfigError(
        f"config.mesh.shape={shape} uses {math.prod(shape)} devices but {num_devices} are "
        "available; use -1 for one axis to fill the rest")
  return shape


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = resolve_shape(tuple(cfg.shape), len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, ValueError, NotImplementedError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, tuple(cfg.axis_names))


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules):
  """Puts the rules table and the mesh in effect: inside, the model's
  `nn.with_logical_constraint` calls become sharding constraints (outside they do nothing).

  Enter it while a function is traced (inside `jax.jit`); `with_logical_rules` does that.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
    yield


def with_logical_rules(fn: Callable, mesh: Mesh | None, rules) -> Callable:
  """`fn`, traced with `logical_rules(mesh, rules)` in effect (unchanged when mesh is None)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with logical_rules(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays [B, ...]: the leading dim split over the data-parallel axes."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of the global batch into global sharded arrays."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in batch.items()}


def maybe_initialize_distributed(mode: str = "auto") -> None:
  """Calls jax.distributed.initialize() on multi-host launches.

  "auto" initialises when the environment describes a multi-process job (a Cloud TPU VM, whose
  workers jax discovers from the metadata server; SLURM with several tasks; or an explicit
  JAX_COORDINATOR_ADDRESS); "on" always; "off" never.
  """
  if mode == "off":
    return
  env = os.environ
  multi = (
      "JAX_COORDINATOR_ADDRESS" in env
      or int(env.get("SLURM_NTASKS", "1")) > 1
      or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
      or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1
      or os.path.exists("/dev/accel0"))  # a TPU VM: jax reads the worker list from GCE metadata
  if mode == "on" or multi:
    logging.info("initialising jax.distributed (mode=%s)", mode)
    jax.distributed.initialize()
