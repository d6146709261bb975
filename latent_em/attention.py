"""Attention over whole sequences (training, scoring, evaluation NLL).

Shapes: B=batch, T=query length, S=key length, H=query heads, K=kv heads, G=H/K, Dh=head dim.
Query t of row b sees key s when s <= t (causal) and both lie in the same packed segment
(`segment_ids`, 0 = padding; None = one segment per row).

Implementations (`config.model.attention`), all computing the same function:
  reference  `masked_attention`: an explicit [B, T, S] mask, fp32 scores and softmax.
  blocked    the reference math per block of queries over only the keys at or before the block
             (causal block skipping: ~half the score FLOPs and memory); the CPU default.
  xla        `jax.nn.dot_product_attention(implementation="xla")`.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on
             GPU (bf16/fp16 only).
  splash     the Pallas TPU splash-attention kernel (`splash.py`), inside `shard_map` over the
             mesh; never materialises the scores.
  auto       one of the above by the platform of the devices the step is compiled for
             (`resolve`): TPU -> splash, GPU -> cudnn (xla for fp32), CPU -> blocked.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLEMENTATIONS = ("auto", "reference", "blocked", "xla", "cudnn", "splash")
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cpu": "blocked"}
# Query rows per block of the "blocked" implementation: on a 2-core CPU 64 was fastest at
# T = 256 and 512 (docs/benchmarks.md); blocks stop paying once T is no longer than one block.
BLOCK_Q = 64


def platform_of(devices: Any) -> str:
  """"cpu" | "gpu" | "tpu" of a Mesh, a device or a sequence of devices (topology devices of a
  TPU compiled for from a CPU host included)."""
  if isinstance(devices, jax.sharding.Mesh):
    devices = devices.devices.flat
  elif not isinstance(devices, (Sequence, np.ndarray)):
    devices = [devices]
  platform = next(iter(devices)).platform.lower()
  return "gpu" if platform in ("cuda", "rocm") else platform


def resolve(implementation: str, platform: str | None = None, dtype: Any = jnp.float32) -> str:
  """The concrete implementation `implementation` stands for on `platform` (default: JAX's
  default backend). Only "auto" changes; cuDNN flash attention needs a 16-bit compute dtype, so
  fp32 on GPU resolves to "xla"."""
  if implementation != "auto":
    return implementation
  platform = platform or jax.default_backend()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  name = _AUTO.get(platform, "xla")
  if name == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    name = "xla"
  return name


def masked_attention(q_BTHD: Array, k_BKSD: Array, v_BKSD: Array, mask_BTS: Array,
                     dtype) -> Array:
  """Softmax attention with an explicit boolean mask [B, T, S] (True = visible).

  Keys and values are head-major ([B, K, S, Dh], the KV-cache layout); scores and softmax are
  fp32, probabilities are cast to `dtype` for the second matmul. Returns [B, T, H, Dh].
  """
  b, t, h, dh = q_BTHD.shape
  k = k_BKSD.shape[1]
  q_BKGTD = q_BTHD.reshape(b, t, k, h // k, dh).transpose(0, 2, 3, 1, 4)
  out_BKGTD = _masked_core(q_BKGTD, k_BKSD, v_BKSD, mask_BTS, dtype)
  return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _masked_core(q_BKGTD: Array, k_BKSD: Array, v_BKSD: Array, mask_BTS: Array,
                 dtype) -> Array:
  """`masked_attention` in the grouped head-major layout: -> [B, K, G, T, Dh]."""
  dh = q_BKGTD.shape[-1]
  logits_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD).astype(jnp.float32)
  logits_BKGTS = logits_BKGTS / jnp.sqrt(jnp.float32(dh))
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dtype)
  return jnp.einsum("bkgts,bksd->bkgtd", probs, v_BKSD)


def causal_segment_mask(t: int, segment_ids_BT: Array | None, batch: int) -> Array:
  """[B, T, T] mask: causal, and within one packed segment when `segment_ids_BT` is given."""
  idx = jnp.arange(t)
  mask = jnp.broadcast_to(idx[None, :] <= idx[:, None], (batch, t, t))
  if segment_ids_BT is not None:
    mask = mask & (segment_ids_BT[:, None, :] == segment_ids_BT[:, :, None])
  return mask


def _reference(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype):
  b, t = q_BTHD.shape[:2]
  mask = causal_segment_mask(t, segment_ids_BT, b)
  return masked_attention(q_BTHD, k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3),
                          mask, dtype)


def _blocked(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype, block_q: int | None = None):
  """Causal block skipping: query block i attends to keys [0, end of block i) only.

  Each block is the reference math over its key prefix; the keys it skips are exactly the ones
  the causal mask zeroes, so the result equals the reference up to float summation order. The
  blocks are unrolled (T / block_q of them): XLA:CPU runs each as a few large batched matmuls.
  """
  b, t, h, dh = q_BTHD.shape
  k = k_BTKD.shape[2]
  block_q = block_q or BLOCK_Q
  if t <= block_q or t % block_q:
    return _reference(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype)
  q_BKGTD = q_BTHD.reshape(b, t, k, h // k, dh).transpose(0, 2, 3, 1, 4)
  k_BKSD = k_BTKD.transpose(0, 2, 1, 3)
  v_BKSD = v_BTKD.transpose(0, 2, 1, 3)
  outs = []
  for start in range(0, t, block_q):
    end = start + block_q
    q_idx, k_idx = jnp.arange(start, end), jnp.arange(end)
    mask = jnp.broadcast_to(k_idx[None, :] <= q_idx[:, None], (b, block_q, end))
    if segment_ids_BT is not None:
      mask = mask & (segment_ids_BT[:, start:end, None] == segment_ids_BT[:, None, :end])
    outs.append(_masked_core(q_BKGTD[:, :, :, start:end], k_BKSD[:, :, :end],
                             v_BKSD[:, :, :end], mask, dtype))
  out_BKGTD = jnp.concatenate(outs, axis=3)
  return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _dot_product(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype, implementation):
  """`jax.nn.dot_product_attention`; packed segments enter as a boolean mask [B, 1, T, S]."""
  mask = None
  if segment_ids_BT is not None:
    mask = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  dt = jnp.dtype(dtype)
  out = jax.nn.dot_product_attention(q_BTHD.astype(dt), k_BTKD.astype(dt), v_BTKD.astype(dt),
                                     mask=mask, is_causal=True, implementation=implementation)
  return out.astype(dt)


def attend(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array, segment_ids_BT: Array | None,
           dtype, implementation: str = "reference") -> Array:
  """Causal (segment-masked) self-attention of a whole sequence -> [B, T, H, Dh].

  `implementation` is one of IMPLEMENTATIONS ("auto" resolves by JAX's default backend; jobs
  resolve it for their mesh first, `model.resolve_attention`). "splash" must be traced under
  `sharding.logical_rules` when the arrays are sharded over several devices; an unresolved
  "auto" traced without a mesh on several devices uses "xla" instead, which XLA partitions.
  """
  name = resolve(implementation, dtype=dtype)
  if (name == "splash" and implementation == "auto" and jax.device_count() > 1
      and jax.sharding.get_abstract_mesh().empty):
    name = "xla"
  implementation = name
  if implementation == "reference":
    return _reference(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype)
  if implementation == "blocked":
    return _blocked(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype)
  if implementation in ("xla", "cudnn"):
    return _dot_product(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype, implementation)
  if implementation == "splash":
    from latent_em import splash  # pallas TPU imports only where used
    return splash.attend(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype)
  raise ValueError(f"unknown attention implementation {implementation!r}; "
                   f"use one of {IMPLEMENTATIONS}")
