"""Intrinsic evaluation on held-out raw documents (DESIGN.md §5).

validation_nll   -log p(X) per token: each document is `doc + EOS`, split into pieces of
                 `seq_len` targets that each start from BOS, exactly as the training pipeline
                 lays out long documents (tasks.py + the feature converter); every token is
                 scored once. Matches train's `eval/nll_per_token` on the same documents.
validation_elbo  the importance-weighted bound with the E-step engine: for every (prefix P,
                 suffix X) chunk, K = max(ks) thoughts from q(z | P, X) and ELBO_k =
                 logsumexp(log w_1..k) - log k <= log p(X | P). Reported per token of X:
                 sum over chunks of ELBO_k / sum of scored suffix tokens (a log-likelihood bound,
                 so <= 0; minus it bounds the NLL of X given its prefix from above).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from latent_em import model as model_lib, sharding
from latent_em.data import chunking
from latent_em.estep import core as estep_core
from latent_em.sampling import scoring


def nll_pairs(tokenizer, texts: Sequence[str], seq_len: int
              ) -> list[tuple[list[int], list[int]]]:
  """(context [BOS], target piece [<= seq_len]) pairs covering every `doc + EOS` token once."""
  pairs = []
  for ids in tokenizer.encode_batch(list(texts), eos=True):
    for start in range(0, len(ids), seq_len):
      pairs.append(([tokenizer.bos_id], ids[start:start + seq_len]))
  return pairs


_LOGPROB_FNS: dict[str, Any] = {}


def _logprob_fn(key: str, model_cfg: model_lib.ModelConfig):
  """One jitted scorer per model config, so repeated evaluations compile once."""
  if key not in _LOGPROB_FNS:
    _LOGPROB_FNS.clear()
    _LOGPROB_FNS[key] = scoring.make_token_logprobs(model_cfg)
  return _LOGPROB_FNS[key]


def validation_nll(model_cfg: model_lib.ModelConfig, params: Any, tokenizer,
                   texts: Sequence[str], *, seq_len: int, batch_size: int, mesh=None
                   ) -> dict[str, Any]:
  """NLL per token of held-out raw documents.

  Pieces are packed into [batch_size, seq_len] rows (segment ids keep them apart) and scored by
  one jitted forward per batch. With a mesh, `params` must already be placed on it.

  Returns {"nll_per_token", "bits_per_byte", "tokens" (scored, EOS included), "docs", "pieces"}.
  """
  pairs = nll_pairs(tokenizer, texts, seq_len)
  if not pairs:
    return {"nll_per_token": float("nan"), "bits_per_byte": float("nan"), "tokens": 0,
            "docs": 0, "pieces": 0}
  rows = batch_size
  put = None
  if mesh is not None:
    dp = sharding.data_parallel_size(mesh)
    rows = -(-batch_size // dp) * dp
    put = functools.partial(sharding.host_to_global, mesh=mesh)
  logprob_fn = _logprob_fn(repr(model_cfg), model_cfg)
  # Pack 64 batches' worth of pieces at a time: first-fit packing is quadratic in its rows.
  total, start = 0.0, 0
  while start < len(pairs):
    group = pairs[start:start + 64 * rows]
    total += float(scoring.score(logprob_fn, params, group, seq_len, rows_per_batch=rows,
                                 put=put).sum())
    start += len(group)
  tokens = sum(len(t) for _, t in pairs)
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  return {"nll_per_token": -total / tokens,
          "bits_per_byte": -total / math.log(2) / max(n_bytes, 1),
          "tokens": tokens, "docs": len(texts), "pieces": len(pairs)}


def validation_elbo(model_cfg: model_lib.ModelConfig, params: Any, tokenizer,
                    texts: Sequence[str], *, estep_cfg: estep_core.EStepConfig,
                    ks: Sequence[int] = (1, 2, 4), seed: int = 0, mesh=None, rules=None,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
  """ELBO_k per token of X for each k in `ks`, from the E-step engine with K = max(ks).

  Documents are chunked with `estep_cfg.chunking` (a context chunk, which has no thought, adds
  its exact log p(X | P) to every ELBO_k); sampling settings, the context budget and
  the overflow policy are the E-step's. Batch b of `estep_cfg.batch_chunks` chunks draws its
  thoughts with `fold_in(key(seed), b)`.

  Returns {"elbo_per_token": {"k": float}, "mean_ess", "chunks", "docs", "suffix_tokens",
  "cut_tokens", "frac_ended_with_eol", "mean_thought_len", "num_samples"}.
  """
  ks = tuple(sorted(set(int(k) for k in ks)))
  if not ks or ks[0] < 1:
    raise ValueError(f"elbo ks {ks} must be >= 1")
  cfg = dataclasses.replace(estep_cfg, num_samples=ks[-1], elbo_ks=ks)
  engine = estep_core.Engine(cfg, model_cfg, params, tokenizer, mesh, rules)
  chunk_pairs = [p for text in texts for p in chunking.chunk_pairs(text, cfg.chunking)]
  pairs = [(p.prefix, p.suffix) for p in chunk_pairs if not p.context]
  # Context chunks (chunking.context_until) carry no thought: their log p(X | P) is exact and
  # adds to every ELBO_k, so the bound still covers every chunk of the document.
  context_logp, context_tokens = 0.0, 0
  contexts = [([tokenizer.bos_id] + tokenizer.encode(p.prefix), tokenizer.encode(p.suffix))
              for p in chunk_pairs if p.context]
  if contexts:
    put, rows = None, cfg.score_rows
    if mesh is not None:
      dp = sharding.data_parallel_size(mesh)
      rows = -(-rows // dp) * dp
      put = functools.partial(sharding.host_to_global, mesh=mesh)
    context_logp = float(scoring.score(engine.logprob_fn, engine.params, contexts,
                                       cfg.max_seq_len, rows_per_batch=rows, put=put).sum())
    context_tokens = sum(len(x) for _, x in contexts)
  rng = jax.random.key(seed)
  select_rng = np.random.default_rng(seed)
  results: list[estep_core.ChunkResult] = []
  b = cfg.batch_chunks
  for i in range(0, len(pairs), b):
    batch = engine.process(pairs[i:i + b], jax.random.fold_in(rng, i // b), select_rng)
    results.extend(batch)
    if progress is not None:
      progress(len(batch))
  suffix_tokens = sum(r.suffix_tokens for r in results) + context_tokens
  elbo = {str(k): (sum(r.elbo[k] for r in results) + context_logp) / suffix_tokens
          if suffix_tokens else float("nan") for k in ks}
  n = len(results)
  return {
      "elbo_per_token": elbo,
      "mean_ess": float(np.mean([r.ess for r in results])) if n else float("nan"),
      "chunks": n, "context_chunks": len(contexts), "docs": len(texts),
      "suffix_tokens": suffix_tokens,
      "cut_tokens": sum(r.cut_tokens for r in results),
      "frac_ended_with_eol": sum(r.ended for r in results) / n if n else float("nan"),
      "mean_thought_len": float(np.mean([r.thought_len for r in results])) if n else float("nan"),
      "num_samples": ks[-1],
  }

