"""Attention over whole sequences (training, scoring, evaluation NLL).

Shapes: B=batch, T=query length, S=key length, H=query heads, K=kv heads, G=H/K, Dh=head dim.
Query t of row b sees key s when s <= t (causal) and both lie in the same packed segment
(`segment_ids`, 0 = padding; None = one segment per row).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_attention(q_BTHD: Array, k_BKSD: Array, v_BKSD: Array, mask_BTS: Array,
                     dtype) -> Array:
  """Softmax attention with an explicit boolean mask [B, T, S] (True = visible).

  Keys and values are head-major ([B, K, S, Dh], the KV-cache layout); scores and softmax are
  fp32, probabilities are cast to `dtype` for the second matmul. Returns [B, T, H, Dh].
  """
  b, t, h, dh = q_BTHD.shape
  k = k_BKSD.shape[1]
  q_BKGTD = q_BTHD.reshape(b, t, k, h // k, dh).transpose(0, 2, 3, 1, 4)
  logits_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD).astype(jnp.float32)
  logits_BKGTS = logits_BKGTS / jnp.sqrt(jnp.float32(dh))
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dtype)
  out_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", probs, v_BKSD)
  return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def causal_segment_mask(t: int, segment_ids_BT: Array | None, batch: int) -> Array:
  """[B, T, T] mask: causal, and within one packed segment when `segment_ids_BT` is given."""
  idx = jnp.arange(t)
  mask = jnp.broadcast_to(idx[None, :] <= idx[:, None], (batch, t, t))
  if segment_ids_BT is not None:
    mask = mask & (segment_ids_BT[:, None, :] == segment_ids_BT[:, :, None])
  return mask


def attend(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array, segment_ids_BT: Array | None,
           dtype) -> Array:
  """Causal (segment-masked) self-attention of a whole sequence -> [B, T, H, Dh]."""
  b, t = q_BTHD.shape[:2]
  mask = causal_segment_mask(t, segment_ids_BT, b)
  return masked_attention(q_BTHD, k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3),
                          mask, dtype)
