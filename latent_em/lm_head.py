"""Per-token functions of the LM head's logits, computed over sequence chunks.

The loss and the scorer need one number per token (its NLL, its log-prob) from fp32 logits
[B, T, V]; for TinyLlama at T = 2048 those are 256 MiB per sequence. Here the LM head, the
logits and the per-token reduction run over chunks of `chunk` positions under `lax.scan`, so only
fp32 [B, chunk, V] logits exist at a time, in the forward and in the backward pass (which
recomputes each chunk's logits from its hidden states).

Chunks split the sequence, not the batch, so every chunk stays sharded like the batch.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
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


def _over_chunks(one: Callable[[Array, Array], Array], hidden_BTD: Array, targets_BT: Array,
                 chunk: int, checkpoint: bool) -> Array:
  """one(hidden chunk [B, C, D], targets [B, C]) -> [B, C], scanned over the sequence -> [B, T].
  T is padded up to a multiple of `chunk`; the padding's values are dropped."""
  b, t, d = hidden_BTD.shape
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

  def body(carry, xs):
    return carry, one(*xs)

  _, values_NBC = jax.lax.scan(jax.checkpoint(body) if checkpoint else body, None,
                               (x_NBCD, targets_NBC))
  return values_NBC.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def map_chunks(cfg: model_lib.ModelConfig, fn: TokenFn, hidden_BTD: Array, kernel_DV: Array,
               targets_BT: Array, chunk: int | None = None) -> Array:
  """fn(logits of a chunk, its targets) over the sequence -> fp32 [B, T].

  `hidden_BTD` are final-norm hidden states (`model.hidden_states`), `kernel_DV` the LM head
  (`model.output_kernel`, in the parameter dtype: it is cast per chunk, so its gradient sums
  over chunks in that dtype). `chunk` defaults to `cfg.logits_chunk`; 0 or >= T is one chunk.
  Each chunk runs under `jax.checkpoint`, so a backward pass recomputes its logits rather than
  keeping them.
  """
  def one(x_BCD, targets_BC):
    return fn(model_lib.logits_from_hidden(cfg, x_BCD, kernel_DV), targets_BC).astype(jnp.float32)

  chunk = cfg.logits_chunk if chunk is None else chunk
  return _over_chunks(one, hidden_BTD, targets_BT, chunk, checkpoint=True)


def token_nll(cfg: model_lib.ModelConfig, hidden_BTD: Array, kernel_DV: Array,
              targets_BT: Array, chunk: int | None = None) -> Array:
  """`map_chunks(cfg, nll, ...)` -> fp32 [B, T], with a hand-written backward pass.

  Per chunk the forward keeps only the log-sum-exp [B, C]; the backward recomputes the logits,
  forms d logits = g * (softmax - onehot) and applies the two LM-head matmuls itself, in the
  dtypes autodiff would use (compute dtype, gradients returned in the inputs' dtypes). Written
  out, the kernel gradient is x^T @ d logits with the small [N, D] operand transposed; from
  autodiff, XLA:CPU transposed the [N, V] logit gradient instead, which took longer than the
  matmul (docs/benchmarks.md).
  """
  dt = cfg.compute_dtype
  act = ("activation_batch", "activation_length", "activation_vocab")

  def logits_and_lse(x_BCD, kernel):
    logits = model_lib.logits_from_hidden(cfg, x_BCD, kernel)
    return logits, jax.nn.logsumexp(logits, axis=-1)

  @jax.custom_vjp
  def one(x_BCD, kernel, targets_BC):
    return nll(model_lib.logits_from_hidden(cfg, x_BCD, kernel), targets_BC)

  def one_fwd(x_BCD, kernel, targets_BC):
    logits, lse = logits_and_lse(x_BCD, kernel)
    return lse - target_logit(logits, targets_BC), (x_BCD, kernel, targets_BC, lse)

  def one_bwd(res, g_BC):
    x_BCD, kernel, targets_BC, lse = res
    logits = model_lib.logits_from_hidden(cfg, x_BCD, kernel)
    onehot = jax.nn.one_hot(targets_BC, logits.shape[-1], dtype=jnp.bool_)
    probs = jnp.exp(logits - lse[..., None])
    d_logits = (g_BC[..., None] * (probs - onehot)).astype(dt)
    d_logits = nn.with_logical_constraint(d_logits, act)
    d_x = jnp.einsum("bcv,dv->bcd", d_logits, kernel.astype(dt)).astype(x_BCD.dtype)
    n = x_BCD.shape[0] * x_BCD.shape[1]
    x_DN = x_BCD.reshape(n, -1).astype(dt).T
    d_kernel = jnp.dot(x_DN, d_logits.reshape(n, -1)).astype(kernel.dtype)
    return d_x, d_kernel, None

  one.defvjp(one_fwd, one_bwd)
  chunk = cfg.logits_chunk if chunk is None else chunk
  return _over_chunks(lambda x, tg: one(x, kernel_DV, tg), hidden_BTD, targets_BT, chunk,
                      checkpoint=False)

