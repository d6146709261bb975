"""Causal, segment-masked attention through the Pallas TPU splash-attention kernel.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) computes softmax attention in
blocks in VMEM, skipping the blocks the causal mask zeroes, and never writes the [T, S] scores
to HBM; its backward pass is one more kernel that computes dq, dk and dv together. It handles
one sequence ([H, T, Dh] queries, [K, S, Dh] keys and values, GQA when K divides H); batches are
vmapped over it.

A Pallas call cannot be partitioned by XLA, so under a mesh it runs inside `shard_map`: each
device applies the kernel to its own rows and heads. The specs come from the model's logical
activation names under the rules in effect (`sharding.logical_rules`): batch over the data
axes, heads over tensor, the sequence unsplit.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

Array = jax.Array

# Sequence tiles of the kernel: the TPU's 128 lanes are the minimum; 512 (as in MaxText's
# defaults) where the sequence allows.
_LANES = 128
_MAX_BLOCK = 512
_PAD_SEGMENT = -1  # segment id of the positions padded up to a multiple of 128

Q_AXES = ("activation_batch", "activation_heads", "activation_length", "activation_kv")
KV_AXES = ("activation_batch", "activation_kv_heads", "activation_length", "activation_kv")
SEGMENT_AXES = ("activation_batch", "activation_length")


# Matmuls per visible [block, block] tile in each of the kernel's programs, as their HLO custom
# calls are named: forward QK^T and PV; the fused backward QK^T, P^T dO, dO V^T, dS^T Q and
# dS K (dq in the same pass as dk/dv, instead of a second kernel that recomputes QK^T and
# dO V^T). XLA's cost model counts no FLOPs inside a custom call.
KERNEL_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dkv": 5}


def kernel_call_flops(kernel: str, heads: int, t: int, head_dim: int) -> float:
  """Matmul FLOPs of one call of `kernel` (a KERNEL_MATMULS name) on one sequence of t tokens:
  the tiles on or below the causal diagonal, which the kernel computes (it skips the others)."""
  t_pad = t + (-t % _LANES)
  n = t_pad // _block(t_pad)
  b = t_pad // n
  return KERNEL_MATMULS[kernel] * heads * n * (n + 1) // 2 * 2 * b * b * head_dim


def _block(t: int) -> int:
  return next(b for b in (_MAX_BLOCK, 256, _LANES) if t % b == 0)


def _kernel(heads: int, t: int):
  """The splash kernel for `heads` query heads over one causal sequence of t (a multiple of 128)
  tokens. Built anew in each trace: it holds its mask data as arrays of that trace."""
  b = _block(t)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
  return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes)


def _local_attend(q_BHTD: Array, k_BKTD: Array, v_BKTD: Array, segment_ids_BT: Array) -> Array:
  """The kernel vmapped over this device's rows -> [B, H, T, Dh]."""
  kernel = _kernel(q_BHTD.shape[1], q_BHTD.shape[2])
  return jax.vmap(kernel)(q_BHTD, k_BKTD, v_BKTD, sk.SegmentIds(segment_ids_BT, segment_ids_BT))


def _mesh_specs():
  """(mesh, (q, kv, segment) PartitionSpecs) under the rules in effect, or (None, None) when no
  mesh with more than one device is in effect."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return None, None
  specs = tuple(nn.logical_to_mesh_axes(axes) for axes in (Q_AXES, KV_AXES, SEGMENT_AXES))
  if specs[0][2] is not None or specs[2][1] is not None:
    raise ValueError(
        "splash attention needs whole sequences on each device, but the mesh rules shard "
        f"'activation_length' ({specs[0][2]}); map it to None in config.mesh.rules or use "
        "config.model.attention='xla'")
  return mesh, specs


def attend(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array, segment_ids_BT: Array | None,
           dtype) -> Array:
  """Causal self-attention within packed segments (0 = padding) -> [B, T, H, Dh] in `dtype`.

  Sequences whose length is not a multiple of 128 are padded with a segment of their own and
  the padding is cut from the output.
  """
  b, t, _, dh = q_BTHD.shape
  dt = jnp.dtype(dtype)
  # The kernel does not scale the scores: fold 1/sqrt(Dh) into the queries (exact for a
  # power-of-two head dim).
  q_BHTD = (q_BTHD.astype(jnp.float32) / math.sqrt(dh)).astype(dt).transpose(0, 2, 1, 3)
  k_BKTD = k_BTKD.astype(dt).transpose(0, 2, 1, 3)
  v_BKTD = v_BTKD.astype(dt).transpose(0, 2, 1, 3)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((b, t), jnp.int32)
  segment_ids_BT = segment_ids_BT.astype(jnp.int32)
  pad = -t % _LANES
  if pad:
    seq_pad = ((0, 0), (0, 0), (0, pad), (0, 0))
    q_BHTD, k_BKTD, v_BKTD = (jnp.pad(x, seq_pad) for x in (q_BHTD, k_BKTD, v_BKTD))
    segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)

  mesh, specs = _mesh_specs()
  if mesh is None:
    out_BHTD = _local_attend(q_BHTD, k_BKTD, v_BKTD, segment_ids_BT)
  else:
    q_spec, kv_spec, seg_spec = specs
    out_BHTD = jax.shard_map(_local_attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                             out_specs=q_spec, check_vma=False)(q_BHTD, k_BKTD, v_BKTD,
                                                                segment_ids_BT)
  return out_BHTD[:, :, :t].transpose(0, 2, 1, 3).astype(dt)
