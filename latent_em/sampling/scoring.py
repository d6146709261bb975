"""Teacher-forced scoring: sum of log-probs over a marked span of each sequence.

Sequences are given as (context ids, target ids) pairs; the score is
sum_t log p(target_t | context, target_<t). Many short sequences are packed into fixed-length
rows (segment ids keep them apart), so a batch of E-step candidates costs a few dense forwards.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from latent_em import lm_head, sharding
from latent_em import model as model_lib
from latent_em.sampling.sampler import process_logits


@dataclasses.dataclass
class PackedBatch:
  inputs: np.ndarray       # [R, T] int32
  targets: np.ndarray      # [R, T] int32
  weights: np.ndarray      # [R, T] fp32: 1 on scored target tokens
  segment_ids: np.ndarray  # [R, T] int32, 0 = padding
  positions: np.ndarray    # [R, T] int32
  owner: np.ndarray        # [R, T] int32: index of the sequence a scored token belongs to, -1 else


def pack(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], row_len: int,
         min_rows: int = 1, row_multiple: int = 1) -> PackedBatch:
  """First-fit packing of (context, target) pairs into rows of `row_len` tokens.

  Each pair occupies len(context) + len(target) - 1 input slots (inputs are the sequence without
  its last token). Raises if one pair does not fit a row (callers apply the overflow policy
  first). Row count is rounded up to `row_multiple` (for sharding) and at least `min_rows`.
  """
  rows: list[list[tuple[int, list[int], int]]] = []  # (pair index, full ids, context len)
  free: list[int] = []
  for i, (ctx, tgt) in enumerate(pairs):
    full = list(ctx) + list(tgt)
    need = len(full) - 1
    if not ctx:
      raise ValueError(f"sequence {i} has an empty context (it needs at least BOS)")
    if need > row_len:
      raise ValueError(f"sequence {i} needs {need} tokens > row length {row_len}")
    for r, f in enumerate(free):
      if f >= need:
        rows[r].append((i, full, len(ctx)))
        free[r] -= need
        break
    else:
      rows.append([(i, full, len(ctx))])
      free.append(row_len - need)
  n_rows = max(len(rows), min_rows)
  n_rows = -(-n_rows // row_multiple) * row_multiple
  shape = (n_rows, row_len)
  out = PackedBatch(*(np.zeros(shape, np.int32) for _ in range(2)), np.zeros(shape, np.float32),
                    np.zeros(shape, np.int32), np.zeros(shape, np.int32),
                    np.full(shape, -1, np.int32))
  for r, items in enumerate(rows):
    col = 0
    for seg, (i, full, ctx_len) in enumerate(items, start=1):
      n = len(full) - 1
      sl = slice(col, col + n)
      out.inputs[r, sl] = full[:-1]
      out.targets[r, sl] = full[1:]
      out.segment_ids[r, sl] = seg
      out.positions[r, sl] = np.arange(n)
      scored = np.arange(n) >= ctx_len - 1
      out.weights[r, sl] = scored
      out.owner[r, sl] = np.where(scored, i, -1)
      col += n
  return out


def make_token_logprobs(cfg: model_lib.ModelConfig, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, banned_ids: tuple[int, ...] = (), *,
                        mesh: Mesh | None = None, rules=None):
  """jitted (params, inputs, targets, positions, segment_ids) -> log-probs [R, T] of targets
  under the (optionally temperature/top-k/top-p processed) model distribution.

  The LM head and the log-softmax run over chunks of `cfg.logits_chunk` positions
  (`lm_head.map_chunks`), so fp32 [R, T, V] logits never exist whole. With a `mesh` the
  function is traced under its logical rules (default `sharding.DEFAULT_RULES`, activations
  sharded like the rows) and `config.model.attention` "auto" resolves for the mesh's platform.
  """
  plain = temperature == 1.0 and not top_k and top_p == 1.0 and not banned_ids
  if mesh is not None:
    cfg = model_lib.resolve_attention(cfg, mesh)

  def token_logprob(logits_BCV, targets_BC):
    if plain:
      return -lm_head.nll(logits_BCV, targets_BC)
    logp = process_logits(logits_BCV, temperature, top_k, top_p, banned_ids)
    return lm_head.target_logit(logp, targets_BC)

  def fn(params, inputs, targets, positions, segment_ids):
    hidden = model_lib.hidden_states(cfg, params, inputs, positions, segment_ids)
    return lm_head.map_chunks(cfg, token_logprob, hidden, model_lib.output_kernel(cfg, params),
                              targets)

  fn = sharding.with_logical_rules(fn, mesh, sharding.DEFAULT_RULES if rules is None else rules)
  return jax.jit(fn)


def sum_by_owner(token_logprobs: np.ndarray, packed: PackedBatch, n: int) -> np.ndarray:
  """Adds scored token log-probs per sequence -> [n] float64."""
  mask = packed.owner >= 0
  return np.bincount(packed.owner[mask], weights=np.asarray(token_logprobs, np.float64)[mask],
                     minlength=n)


def score(logprob_fn, params: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
          row_len: int, rows_per_batch: int = 8, put=None) -> np.ndarray:
  """Sum of target log-probs for each (context, target) pair -> [len(pairs)] float64.

  `put` maps a dict of host arrays to device arrays (e.g. sharding.host_to_global); default
  is plain transfer.
  """
  packed = pack(pairs, row_len, row_multiple=rows_per_batch)
  total = np.zeros(len(pairs), np.float64)
  for start in range(0, packed.inputs.shape[0], rows_per_batch):
    sl = slice(start, start + rows_per_batch)
    arrays = {"inputs": packed.inputs[sl], "targets": packed.targets[sl],
              "positions": packed.positions[sl], "segment_ids": packed.segment_ids[sl]}
    arrays = put(arrays) if put else arrays
    lp = np.asarray(jax.device_get(logprob_fn(params, arrays["inputs"], arrays["targets"],
                                              arrays["positions"], arrays["segment_ids"])))
    sub = PackedBatch(packed.inputs[sl], packed.targets[sl], packed.weights[sl],
                      packed.segment_ids[sl], packed.positions[sl], packed.owner[sl])
    total += sum_by_owner(lp, sub, len(pairs))
  return total
