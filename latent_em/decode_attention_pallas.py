"""Pallas TPU kernel: one new token per row attends over its window of a ring KV cache.

Row b's window is the `lengths[b]` ring slots ending at `head` (decode_attention.py). The ring
is cut into blocks of `block` slots; the kernel visits, per row, only the blocks that overlap
the row's window, oldest first, each fetched from HBM (all kv heads at once: one contiguous
[block, K * Dh] copy for K and one for V) into a double buffer. The next block is always in
flight while the current one is computed, across rows too (the grid runs in order), so a short
row costs one block, not the ring. Slots of a visited block outside the window (its two ends)
are masked. GQA: the G = H / K query heads of a kv head share its slice of the block. Online
softmax in fp32.

Blocks fetched per row: `blocks_per_row` (the analytic count the decode benchmark uses), at most
ceil(lengths / block) + 1 whatever the ring size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
BLOCK = 128   # ring slots per fetched block (the ring must be a multiple of it)


def block_range(head: Array, lengths_B: Array, s: int, block: int) -> tuple[Array, Array]:
  """(first block [B] in [0, S/block), blocks to visit [B]) covering each row's window."""
  n_total = s // block
  start = head - lengths_B + 1                       # may be negative: the window wraps
  first = jnp.floor_divide(start, block)
  count = jnp.minimum(head // block - first + 1, n_total)
  first = jnp.remainder(head // block - count + 1, n_total)
  return first.astype(jnp.int32), count.astype(jnp.int32)


def blocks_per_row(head: Array, lengths_B: Array, s: int, block: int) -> Array:
  """Blocks of `block` slots the kernel fetches for each row (for K and for V)."""
  return block_range(head, lengths_B, s, block)[1]


def _kernel(head_ref, first_ref, count_ref, len_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf,
            sems, slot_ref, *, block: int, s: int, kv_heads: int, scale: float):
  b, n_b = pl.program_id(0), pl.num_programs(0)
  n_total = s // block
  head, length = head_ref[0], len_ref[b]
  dh = q_ref.shape[-1]

  def copies(row, blk, slot):
    src = pl.ds(pl.multiple_of(blk * block, block), block)
    return (pltpu.make_async_copy(k_hbm.at[row, src], k_buf.at[slot], sems.at[0, slot]),
            pltpu.make_async_copy(v_hbm.at[row, src], v_buf.at[slot], sems.at[1, slot]))

  @pl.when(b == 0)
  def _first_fetch():
    slot_ref[0] = 0
    for c in copies(0, first_ref[0], 0):
      c.start()

  slot0 = slot_ref[0]
  count = count_ref[b]
  next_row = jnp.minimum(b + 1, n_b - 1)
  qs = [q_ref[h].astype(jnp.float32) * scale for h in range(kv_heads)]   # K x [G, Dh]

  def body(j, carry):
    slot = (slot0 + j) % 2
    blk = (first_ref[b] + j) % n_total

    @pl.when(j + 1 < count)
    def _prefetch_own():
      for c in copies(b, (blk + 1) % n_total, 1 - slot):
        c.start()

    @pl.when((j + 1 == count) & (b + 1 < n_b))
    def _prefetch_next_row():
      for c in copies(next_row, first_ref[next_row], 1 - slot):
        c.start()

    k_copy, v_copy = copies(b, blk, slot)
    k_copy.wait()
    v_copy.wait()
    k_all, v_all = k_buf[slot], v_buf[slot]                               # [block, K * Dh]
    out = []
    for h, (m, l, acc) in enumerate(carry):
      k = k_all[:, h * dh:(h + 1) * dh].astype(jnp.float32)
      scores = jax.lax.dot_general(qs[h], k, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)   # [G, block]
      slots = blk * block + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
      visible = jnp.remainder(head - slots + s, s) < length
      scores = jnp.where(visible, scores, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))
      p = jnp.exp(scores - m_new)
      alpha = jnp.exp(m - m_new)
      v = v_all[:, h * dh:(h + 1) * dh].astype(jnp.float32)
      out.append((m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True),
                  alpha * acc + jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())),
                                                    preferred_element_type=jnp.float32)))
    return tuple(out)

  g = q_ref.shape[1]
  init = tuple((jnp.full((g, 1), MASK_VALUE, jnp.float32), jnp.zeros((g, 1), jnp.float32),
                jnp.zeros((g, dh), jnp.float32)) for _ in range(kv_heads))
  final = jax.lax.fori_loop(0, count, body, init)
  for h, (_, l, acc) in enumerate(final):
    o_ref[h] = (acc / l).astype(o_ref.dtype)
  slot_ref[0] = (slot0 + count) % 2


@functools.partial(jax.jit, static_argnames=("kv_heads", "block", "interpret"))
def ragged(q_BHD: Array, k_BSX: Array, v_BSX: Array, head: Array, lengths_B: Array,
           kv_heads: int, block: int = BLOCK, interpret: bool = False) -> Array:
  """Attention of one query per row over its ring window -> [B, H, Dh] in q's dtype.

  q [B, H, Dh] (RoPE applied); k/v [B, S, K * Dh], the ring in `kv_cache`'s layout (kv heads
  side by side in the minor dim, this step's token already written at `head`); lengths [B] >= 1
  (the window ends at head and includes it). S must be a multiple of `block` (a smaller ring is
  one block). `interpret=True` (or `pltpu.force_tpu_interpret_mode()` around the caller) runs
  the kernel in Pallas' TPU interpreter on any backend, for tests.
  """
  b, h, dh = q_BHD.shape
  s = k_BSX.shape[1]
  g = h // kv_heads
  block = min(block, s)
  if s % block:
    raise ValueError(f"ring of {s} slots is not a multiple of the kernel block {block}")
  head = jnp.asarray(head, jnp.int32).reshape(1)
  lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 1, s)
  first, count = block_range(head[0], lengths_B, s, block)
  q = q_BHD.reshape(b, kv_heads, g, dh)
  qo_spec = pl.BlockSpec((None, kv_heads, g, dh), lambda i, *_: (i, 0, 0, 0))
  out = pl.pallas_call(
      functools.partial(_kernel, block=block, s=s, kv_heads=kv_heads, scale=dh ** -0.5),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b,),
          in_specs=[qo_spec, pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=qo_spec,
          scratch_shapes=[pltpu.VMEM((2, block, k_BSX.shape[2]), k_BSX.dtype),
                          pltpu.VMEM((2, block, v_BSX.shape[2]), v_BSX.dtype),
                          pltpu.SemaphoreType.DMA((2, 2)),
                          pltpu.SMEM((1,), jnp.int32)]),
      # Sequential grid: a row prefetches the next row's first block.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      out_shape=jax.ShapeDtypeStruct((b, kv_heads, g, dh), q_BHD.dtype),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(head, first, count, lengths_B, q, k_BSX, v_BSX)
  return out.reshape(b, h, dh)
