"""Per-token functions of the LM head's logits, computed over sequence chunks.

The loss and the scorer need one number per token (its NLL, its log-prob) from fp32 logits
[B, T, V]; for TinyLlama at T = 2048 those are 256 MiB per sequence. Here the LM head, the
logits and the per-token reduction run over chunks of `chunk` positions under `lax.scan`, each
chunk under `jax.checkpoint`, so only fp32 [B, chunk, V] logits exist at a time, in the forward
and in the backward pass (which recomputes each chunk's logits from its hidden states).

Chunks split the sequence, not the batch, so every chunk stays sharded like the batch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from latent_em import model as model_lib

Array = jax.Array
# (fp32 logits [B, C, V], targets [B, C]) -> per-token values [B, C]
TokenFn = Callable[[Array, Array], Array]


def target_logit(logits_BCV: Array, targets_BC: Array) -> Array:
  """logits[b, c, targets[b, c]] -> [B, C], as a one-hot masked sum rather than a gather: the
  partitioner keeps the targets sharded with the logits instead of gathering them."""
  onehot = jax.nn.one_hot(targets_BC, logits_BCV.shape[-1], dtype=jnp.bool_)
  return jnp.sum(jnp.where(onehot, logits_BCV, 0.0), axis=-1)


def nll(logits_BCV: Array, targets_BC: Array) -> Array:
  """Negative log-likelihood of the targets -> fp32 [B, C]."""
  return jax.nn.logsumexp(logits_BCV, axis=-1) - target_logit(logits_BCV, targets_BC)


def map_chunks(cfg: model_lib.ModelConfig, fn: TokenFn, hidden_BTD: Array, kernel_DV: Array,
               targets_BT: Array, chunk: int | None = None) -> Array:
  """fn(logits of a chunk, its targets) over the sequence -> fp32 [B, T].

  `hidden_BTD` are final-norm hidden states (`model.hidden_states`), `kernel_DV` the LM head
  (`model.output_kernel`, in the parameter dtype: it is cast per chunk, so its gradient sums
  over chunks in that dtype). `chunk` defaults to `cfg.logits_chunk`; 0 or >= T is one chunk.
  T is padded up to a multiple of `chunk`; the padding's values are dropped.
  """
  b, t, d = hidden_BTD.shape
  chunk = cfg.logits_chunk if chunk is None else chunk

  def one(x_BCD, targets_BC):
    return fn(model_lib.logits_from_hidden(cfg, x_BCD, kernel_DV), targets_BC).astype(jnp.float32)

  if chunk <= 0 or chunk >= t:
    return one(hidden_BTD, targets_BT)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  # [B, n*C, ...] -> [n, B, C, ...]: the scan runs over the chunks; the batch keeps its sharding.
  x_NBCD = hidden_BTD.reshape(b, n, chunk, d).swapaxes(0, 1)
  targets_NBC = targets_BT.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def body(carry, xs):
    return carry, one(*xs)

  _, values_NBC = jax.lax.scan(body, None, (x_NBCD, targets_NBC))
  return values_NBC.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
