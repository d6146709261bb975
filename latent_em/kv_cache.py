"""The KV cache of cached decoding: its layout, logical axes, writes and attention over it.

One {"k": [B, K, S, Dh], "v": [B, K, S, Dh]} per layer (kv heads before slots, the layout
attention reads); each layer's buffer is its own loop-carried value in the sampler's while loop,
updated in place. Row b writes its T new tokens into slots `cache_index[b] ..
cache_index[b] + T - 1`, and each query sees every slot up to its own, so right-padded
(bucketed) prompts need no extra mask: generation overwrites the padding.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from latent_em import attention

Array = jax.Array
Cache = tuple[dict[str, Array], ...]

CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_kv")


def init_cache(n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
               dtype: Any) -> Cache:
  """Zeroed cache: one {"k", "v"} per layer, each [B, K, S, Dh]."""
  shape = (batch, n_kv_heads, max_len, head_dim)
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
               for _ in range(n_layers))


def partition_specs(n_layers: int) -> Cache:
  """PartitionSpecs of logical axis names matching `init_cache`'s structure."""
  spec = jax.sharding.PartitionSpec(*CACHE_AXES)
  return tuple({"k": spec, "v": spec} for _ in range(n_layers))


def update_and_attend(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array, layer_cache: dict[str, Array],
                      cache_index_B: Array, constrain, dtype) -> tuple[Array, dict[str, Array]]:
  """Writes this step's keys/values at each row's `cache_index` and attends over the cache.

  `constrain(x, logical_axes)` applies the model's activation sharding. Returns the attention
  output [B, T, H, Dh] and the updated layer cache.
  """
  write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new, (0, i, 0)))
  k_BKTD = k_BTKD.transpose(0, 2, 1, 3)
  v_BKTD = v_BTKD.transpose(0, 2, 1, 3)
  keys = write(layer_cache["k"], k_BKTD.astype(layer_cache["k"].dtype), cache_index_B)
  values = write(layer_cache["v"], v_BKTD.astype(layer_cache["v"].dtype), cache_index_B)
  new_cache = {"k": keys, "v": values}
  kv_axes = ("activation_batch", "activation_kv_heads", "activation_length", "activation_kv")
  keys = constrain(keys.astype(dtype), kv_axes)
  values = constrain(values.astype(dtype), kv_axes)
  t, s = q_BTHD.shape[1], keys.shape[2]
  q_slots_BT = cache_index_B[:, None] + jnp.arange(t)[None, :]
  mask_BTS = jnp.arange(s)[None, None, :] <= q_slots_BT[:, :, None]
  return attention.masked_attention(q_BTHD, keys, values, mask_BTS, dtype), new_cache
