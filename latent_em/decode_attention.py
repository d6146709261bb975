"""Attention of new tokens over a ring-buffer KV cache (`kv_cache.py`).

Shapes: B=batch, T=new tokens, S=ring slots, H=query heads, K=kv heads, G=H/K, Dh=head dim.

Row b's visible context is a window of the ring that ends at the query's own slot: query t sits
at slot `head + t` and sees slot s iff the ring distance (head + t - s) mod S is smaller than
`context[b] + t + 1` (its `context[b]` earlier tokens, the new tokens before it, itself).

Two implementations:
  - `dense`: XLA; scores over every slot with that mask (reads the whole cache).
  - `ragged`: a Pallas TPU kernel for one new token per row that reads, per row, only the
    `block`-slot blocks overlapping the row's window (`decode_attention_pallas.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def window_mask(head: Array, context_B: Array, t: int, s: int) -> Array:
  """[B, T, S] bool: query t of row b sees slot s (see the module docstring)."""
  q_slot = head + jnp.arange(t)                                      # [T]
  distance = jnp.remainder(q_slot[:, None] - jnp.arange(s)[None, :], s)  # [T, S]
  window = context_B[:, None] + jnp.arange(t)[None, :] + 1           # [B, T]
  return distance[None] < window[:, :, None]


def dense(q_BTHD: Array, k_BSX: Array, v_BSX: Array, mask_BTS: Array, dtype) -> Array:
  """Softmax attention over all S slots with an explicit mask -> [B, T, H, Dh].

  k/v [B, S, K * Dh] (the cache layout: kv heads side by side). The contraction runs over the
  whole minor dim with each query head's vector placed in its kv head's lanes (zeros elsewhere),
  so the cache is read in its own layout: splitting K * Dh into [K, Dh] would make XLA copy the
  whole cache into another layout first (on TPU, measured: 18.6 GB of temporaries at the
  TinyLlama shape, batch 256). Scores and softmax in fp32; probabilities cast to `dtype` for
  the second matmul. A query whose mask is all False gets a uniform average (finite), never NaN.
  """
  b, t, h, dh = q_BTHD.shape
  kv = k_BSX.shape[2] // dh
  g = h // kv
  own_lanes = jnp.eye(kv, dtype=q_BTHD.dtype)                         # [K, K]
  q_BTHX = jnp.einsum("btkgd,kj->btkgjd", q_BTHD.reshape(b, t, kv, g, dh), own_lanes)
  q_BTHX = q_BTHX.reshape(b, t, h, kv * dh)
  scores = jnp.einsum("bthx,bsx->bhts", q_BTHX, k_BSX.astype(q_BTHD.dtype),
                      preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(dh))
  scores = jnp.where(mask_BTS[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bhts,bsx->bthx", probs, v_BSX.astype(dtype))          # [B, T, H, K * Dh]
  out = out.reshape(b, t, kv, g, kv, dh)
  return jnp.einsum("btkgjd,kj->btkgd", out, own_lanes.astype(out.dtype)).reshape(b, t, h, dh)
