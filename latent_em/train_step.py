"""Train state, its sharded initialisation, the loss and the jitted train step.

Batches are dicts of [B, T] arrays as produced by `data.pipeline`: "inputs" (BOS-shifted tokens),
"targets", "loss_weights" (0 on padding), "segment_ids" (packed documents, 0 = padding) and
"positions" (restart at 0 for each packed document).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from latent_em import model as model_lib
from latent_em import optim, sharding

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def token_nll(cfg: model_lib.ModelConfig, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood [B, T] (fp32) and the loss weights [B, T]."""
  logits = model_lib.forward(cfg, params, batch["inputs"], batch.get("positions"),
                             batch.get("segment_ids"))
  # The target's logit through a one-hot product rather than a gather: the partitioner then keeps
  # the targets sharded with the logits instead of gathering them to the global batch.
  target_logit = jnp.sum(logits * jax.nn.one_hot(batch["targets"], logits.shape[-1],
                                                 dtype=logits.dtype), axis=-1)
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  return nll, batch["loss_weights"].astype(jnp.float32)


def _sum_loss(params, cfg, batch):
  nll, weights = token_nll(cfg, params, batch)
  return jnp.sum(nll * weights), jnp.sum(weights)


def init_state(cfg: model_lib.ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
               params: Any = None, boxed: bool = False) -> TrainState:
  """Fresh state; `params` (if given) replaces the random initialisation (init_from)."""
  if params is None:
    params = model_lib.init_params(cfg, rng, boxed=boxed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(cfg: model_lib.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules) -> tuple[TrainState, TrainState]:
  """(abstract state, NamedSharding tree), derived from the model's logical axis names."""
  boxed = jax.eval_shape(lambda r: init_state(cfg, tx, r, boxed=True), jax.random.key(0))
  logical = nn.get_partition_spec(boxed)
  shardings = sharding.logical_to_sharding(logical, mesh, rules)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(boxed), shardings)
  return abstract, shardings


def create_sharded_state(cfg: model_lib.ModelConfig, tx: optax.GradientTransformation,
                         mesh: Mesh, rules, rng: jax.Array, params: Any = None) -> TrainState:
  """Initialises the state directly in its sharded layout (no full copy on one device)."""
  _, shardings = state_shardings(cfg, tx, mesh, rules)
  if params is None:
    init = jax.jit(lambda r: init_state(cfg, tx, r), out_shardings=shardings)
    return init(rng)
  params = jax.device_put(params, shardings.params)
  init = jax.jit(lambda p: init_state(cfg, tx, None, params=p), in_shardings=(shardings.params,),
                 out_shardings=shardings)
  return init(params)


def split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...]; micro-batch m holds rows m, m + n, m + 2n, ...

  Strided rather than contiguous: when B/n is a multiple of the data-parallel size, every
  device keeps its own rows of every micro-batch, so the split moves no data and each
  micro-batch stays sharded along the batch axes ("activation_batch").
  """
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_train_step(cfg: model_lib.ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int = 1, mesh: Mesh | None = None,
                    rules=None) -> Callable:
  """Pure step (state, batch) -> (state, metrics); the batch's leading dim splits into
  `grad_accum` micro-batches whose gradients are summed before one update. The loss is the mean
  over all weighted tokens of the step, so accumulation gives the same update as one big batch.

  With a `mesh`, the step is traced under `rules` (default `sharding.DEFAULT_RULES`), so the
  model's logical activation constraints shard its activations.
  """
  grad_fn = jax.value_and_grad(_sum_loss, has_aux=True)

  def step(state: TrainState, batch: Batch):
    if grad_accum == 1:
      (loss_sum, weight_sum), grads = grad_fn(state.params, cfg, batch)
    else:
      micro = split_microbatches(batch, grad_accum)

      def body(carry, mb):
        (l, w), g = grad_fn(state.params, cfg, mb)
        acc_l, acc_w, acc_g = carry
        return (acc_l + l, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (loss_sum, weight_sum, grads), _ = jax.lax.scan(
          body, (jnp.float32(0), jnp.float32(0), zeros), micro)
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = loss_sum / denom
    metrics = {
        "loss": loss,
        "grad_norm": optim.global_norm(grads),
        "lr": schedule(state.step),
        "tokens": weight_sum,
        "finite": jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return sharding.with_logical_rules(step, mesh, sharding.DEFAULT_RULES if rules is None else rules)


def jit_train_step(step_fn: Callable, mesh: Mesh, state_sharding: TrainState) -> Callable:
  """jit with explicit shardings; the old state is donated (updated in place)."""
  return jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(cfg: model_lib.ModelConfig, mesh: Mesh, params_sharding: Any,
                   rules=None) -> Callable:
  """jitted (params, batch) -> (sum of NLL, sum of weights) for validation NLL per token."""
  fn = sharding.with_logical_rules(functools.partial(_sum_loss, cfg=cfg), mesh,
                                   sharding.DEFAULT_RULES if rules is None else rules)
  return jax.jit(lambda p, b: fn(p, batch=b),
                 in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
