"""AdamW with global-norm clipping and learning-rate schedules (cosine, warmup-stable-decay)."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from latent_em import config_lib


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """config.optim"""
  lr: float = 1e-3
  schedule: Literal["cosine", "wsd", "constant"] = "cosine"
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1       # final lr = lr * min_lr_ratio
  decay_fraction: float = 0.2     # wsd: the last fraction of steps decays linearly
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float = 1.0          # 0 disables clipping

  def __post_init__(self):
    config_lib.check(self.lr > 0, "config.optim.lr", "must be positive")
    config_lib.check(self.warmup_steps >= 0, "config.optim.warmup_steps", "must be >= 0")
    config_lib.check(0 <= self.min_lr_ratio <= 1, "config.optim.min_lr_ratio", "must be in [0, 1]")
    config_lib.check(0 < self.decay_fraction <= 1, "config.optim.decay_fraction",
                     "must be in (0, 1]")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine / stable-then-linear-decay / constant to the end."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  end_lr = cfg.lr * cfg.min_lr_ratio
  rest = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "wsd":
    decay_steps = max(int(round(rest * cfg.decay_fraction)), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, end_lr, decay_steps)], [rest - decay_steps])
  else:
    after = optax.constant_schedule(cfg.lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: not on norm scales (which are [L, D] when layers are scanned)."""
  def keep(path, _):
    return not any(getattr(k, "key", None) == "scale" for k in path)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
