"""The KV cache of cached decoding: a ring buffer per row, one write head shared by all rows.

Layout: one {"k": [B, S, K * Dh], "v": [B, S, K * Dh]} per layer, the kv heads side by side in
the minor dim: on TPU a minor dim of Dh = 64 would be padded to 128 lanes (twice the memory and
the bytes read), K * Dh is not. Keys are stored already rotated (RoPE at each token's own
position), so the slot a token sits in says nothing about its position.

- Write: at each call every row writes its T new tokens at slots head .. head + T - 1: one
  `dynamic_update_slice` along the slot axis for all rows (in place inside a while loop), never a
  per-row scatter.
- Read: row b's context is the `context[b]` slots just before `head`, oldest first; the mask and
  the kernels are `decode_attention.py`. Rows of different lengths and ages share the ring.
- Refill: `insert` copies a prefilled prompt into a row so that the prompt ends just before the
  head; the row's next token then continues it (continuous batching).
- Prefill: a left-padded prompt batch is one full-sequence attention (`attention.attend`, pads in
  a segment of their own) whose keys and values become a cache of exactly its T slots.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from latent_em import attention, decode_attention

Array = jax.Array
Cache = tuple[dict[str, Array], ...]

# The minor dim is split like the kv heads (whole heads per device).
CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads")
IMPLS = ("dense", "ragged")


@flax.struct.dataclass
class Window:
  """Where a call's new tokens go and what each row sees.

  head: scalar int32, the ring slot of the first new token (head + T <= S).
  context: [B] int32, the row's tokens already in the cache just before `head`.
  impl: attention over the cache, "dense" (XLA, any T) or "ragged" (Pallas TPU kernel, T = 1);
    "prefill" marks a full-sequence call that creates the cache (see `prefill_window`).
  """
  head: Array
  context: Array
  impl: str = flax.struct.field(pytree_node=False, default="dense")


def prefill_window(lengths_B: Array, t: int) -> Window:
  """Window of a left-padded prompt batch [B, T]: row b's prompt is its last lengths[b] tokens."""
  return Window(head=jnp.int32(0), context=lengths_B.astype(jnp.int32) - t, impl="prefill")


def init_cache(n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
               dtype: Any) -> Cache:
  """Zeroed cache: one {"k", "v"} per layer, each [B, S, K * Dh]."""
  shape = (batch, max_len, n_kv_heads * head_dim)
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
               for _ in range(n_layers))


def prefill_cache(n_layers: int) -> Cache:
  """The placeholder cache a prefill call takes (it returns the real one)."""
  return tuple({} for _ in range(n_layers))


def partition_specs(n_layers: int) -> Cache:
  """PartitionSpecs of logical axis names matching `init_cache`'s structure."""
  spec = jax.sharding.PartitionSpec(*CACHE_AXES)
  return tuple({"k": spec, "v": spec} for _ in range(n_layers))


def update_and_attend(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array, layer_cache: dict[str, Array],
                      window: Window, constrain, dtype) -> tuple[Array, dict[str, Array]]:
  """Writes this call's keys/values at the head and attends over each row's window.

  `constrain(x, logical_axes)` applies the model's activation sharding. Returns the attention
  output [B, T, H, Dh] and the updated layer cache.
  """
  b, t, kv, dh = k_BTKD.shape
  k_BTX = k_BTKD.reshape(b, t, kv * dh)
  v_BTX = v_BTKD.reshape(b, t, kv * dh)
  kv_axes = ("activation_batch", "activation_length", "activation_kv_heads")
  if window.impl == "prefill":
    # Left padding sits in segment 2, the prompt in segment 1: no query is fully masked.
    segments = jnp.where(jnp.arange(t)[None, :] + window.context[:, None] >= 0, 1, 2)
    out = attention.attend(q_BTHD, k_BTKD, v_BTKD, segments, dtype)
    return out, {"k": constrain(k_BTX, kv_axes), "v": constrain(v_BTX, kv_axes)}

  def write(buf, new):
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, window.head, 0))

  keys = constrain(write(layer_cache["k"], k_BTX), kv_axes)
  values = constrain(write(layer_cache["v"], v_BTX), kv_axes)
  s = keys.shape[1]
  if window.impl == "ragged":
    if t != 1:
      raise ValueError(f"the ragged decode kernel takes one new token per row, got {t}")
    out = _ragged(q_BTHD[:, 0], keys, values, window.head, window.context + 1)[:, None]
  elif window.impl == "dense":
    mask = decode_attention.window_mask(window.head, window.context, t, s)
    out = decode_attention.dense(q_BTHD, keys, values, mask, dtype)
  else:
    raise ValueError(f"attention impl {window.impl!r} is not one of {IMPLS}")
  return out.astype(dtype), {"k": keys, "v": values}


def _ragged(q_BHD: Array, k_BSX: Array, v_BSX: Array, head: Array, lengths_B: Array) -> Array:
  """The Pallas kernel; under a mesh (`sharding.logical_rules`) each device runs it on its own
  rows and kv heads (a custom call is not partitioned by XLA: it would gather the cache)."""
  from latent_em import decode_attention_pallas
  dh = q_BHD.shape[-1]

  def local(q, k, v, lengths, head):
    return decode_attention_pallas.ragged(q, k, v, head, lengths, kv_heads=k.shape[-1] // dh)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BHD, k_BSX, v_BSX, lengths_B, head)
  rows = nn.logical_to_mesh_axes(("activation_batch",))[0]
  heads = nn.logical_to_mesh_axes(("activation_kv_heads",))[0]
  q_spec = P(rows, heads, None)
  kv_spec = P(rows, None, heads)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows), P()),
                       out_specs=q_spec, check_vma=False)(q_BHD, k_BSX, v_BSX, lengths_B, head)


def insert(cache: Cache, prompt_cache: Cache, rows_N: Array, src_N: Array, head: Array) -> Cache:
  """Refills rows: row rows_N[i] gets prompt src_N[i] of `prompt_cache`, ending just before head.

  `prompt_cache` holds C prompts of P slots each (a prefill's output, per layer [C, P, K * Dh],
  left-padded so every prompt ends at slot P - 1); a prompt of length L then occupies the ring
  slots [head - L, head), and its padding lies outside the row's window. Whole rows are written
  (the rest zeros): one scatter along the batch axis per buffer, which each device applies to
  its own rows. Rows equal to B (out of range) are skipped.
  """
  out = []
  for layer, prompt in zip(cache, prompt_cache):
    new = {}
    for name in ("k", "v"):
      buf = layer[name]
      s, p = buf.shape[1], prompt[name].shape[1]
      rows = jnp.take(prompt[name], src_N, axis=0).astype(buf.dtype)       # [N, P, K * Dh]
      rows = jnp.pad(rows, ((0, 0), (0, s - p), (0, 0)))
      rows = jnp.roll(rows, head - p, axis=1)
      new[name] = buf.at[rows_N].set(rows, mode="drop")
    out.append(new)
  return tuple(out)
