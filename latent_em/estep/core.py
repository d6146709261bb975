"""The E-step for a batch of (prefix P, suffix X) chunks (DESIGN.md §4).

  1. posterior prompt  BOS P SoL EoL X SoL POST   -> K thoughts z_k ~ q(z | P, X), with log q
  2. joint score       log p(SoL PRIOR z_k EoL X | BOS P)
  3. log w_k = log p(z_k, X | P) - log q(z_k | P, X); keep one z (resample / uniform / argmax)
  4. ELBO_k = logsumexp(log w_1..k) - log k, effective sample size, thought length, EoL flag

Overflow: the joint sequence must fit `max_seq_len`; the prefix is cut first (its oldest
tokens), then the end of the suffix, and the cut suffix tokens are counted.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_em import config_lib, formats, model as model_lib, sharding
from latent_em.data import chunking
from latent_em.sampling import sampler as sampler_lib, scoring, weights

_PROMPT_EXTRA = 5   # BOS + SoL EoL + SoL POST around P and X in the posterior prompt
_JOINT_EXTRA = 3    # BOS + SoL PRIOR (EoL is counted in max_gen_len)


@dataclasses.dataclass(frozen=True)
class EStepConfig:
  """config.estep"""
  input_files: tuple[str, ...] = ()     # corpus to infer thoughts for (JSONL / builtin:)
  text_field: str = "text"
  on_bad_input: str = "skip"            # skip (count) | fail (name file:line)
  init_from: str = ""                   # model: params checkpoint or finished train workdir
  docs_per_shard: int = 64              # output shard size (the unit of resumption)
  max_docs: int = 0                     # 0 = all
  num_samples: int = 4                  # K
  selection: str = "resample"           # resample | uniform | argmax
  elbo_ks: tuple[int, ...] = (1, 2, 4)
  max_seq_len: int = 512                # joint sequence budget (the model's training length)
  batch_chunks: int = 8                 # chunks per sampler call (rows = batch_chunks * K)
  score_rows: int = 8                   # packed rows per scoring call
  prompt_bucket: int = 64               # prompts are padded to multiples of this
  seed: int = 0
  sampling: sampler_lib.SamplingConfig = sampler_lib.SamplingConfig(max_gen_len=128)
  chunking: chunking.ChunkConfig = chunking.ChunkConfig(prefix_chunks=3)

  def __post_init__(self):
    config_lib.check(self.num_samples >= 1, "config.estep.num_samples", "must be >= 1")
    config_lib.check(self.selection in weights.SELECTIONS, "config.estep.selection",
                     f"{self.selection!r} is not one of {list(weights.SELECTIONS)}")
    config_lib.check(all(k >= 1 for k in self.elbo_ks), "config.estep.elbo_ks", "must be >= 1")
    config_lib.check(self.max_seq_len > self.sampling.max_gen_len + _PROMPT_EXTRA + 2,
                     "config.estep.max_seq_len",
                     f"{self.max_seq_len} leaves no room for text after max_gen_len="
                     f"{self.sampling.max_gen_len}")
    config_lib.check(self.docs_per_shard >= 1, "config.estep.docs_per_shard", "must be >= 1")
    config_lib.check(self.on_bad_input in ("skip", "fail"), "config.estep.on_bad_input",
                     "must be 'skip' or 'fail'")
    config_lib.check(self.batch_chunks >= 1, "config.estep.batch_chunks", "must be >= 1")
    config_lib.check(self.prompt_bucket >= 1, "config.estep.prompt_bucket", "must be >= 1")


@dataclasses.dataclass
class ChunkResult:
  thought: str
  thought_ids: list[int]
  log_weights: list[float]        # [K]
  log_joint: list[float]          # [K]
  log_q: list[float]              # [K]
  kept: int
  ended: bool                     # the kept thought ended with EoL
  thought_len: int                # tokens of the kept thought (EoL excluded)
  elbo: dict[int, float]          # k -> ELBO_k (nats, whole suffix)
  ess: float
  suffix_tokens: int              # tokens of X actually scored (after overflow cuts)
  cut_tokens: int                 # suffix tokens cut by the overflow policy
  prefix_cut_tokens: int


def fit_to_budget(prefix_ids: list[int], suffix_ids: list[int], budget: int
                  ) -> tuple[list[int], list[int], int, int]:
  """Cuts the prefix's oldest tokens, then the suffix's end, so len(P) + len(X) <= budget."""
  over = len(prefix_ids) + len(suffix_ids) - budget
  prefix_cut = min(max(over, 0), len(prefix_ids))
  prefix_ids = prefix_ids[prefix_cut:]
  over -= prefix_cut
  suffix_cut = max(over, 0)
  if suffix_cut:
    suffix_ids = suffix_ids[:len(suffix_ids) - suffix_cut]
  return prefix_ids, suffix_ids, prefix_cut, suffix_cut


class Engine:
  """Holds the jitted sampler and scorer for one model; processes batches of chunks."""

  def __init__(self, cfg: EStepConfig, model_cfg: model_lib.ModelConfig, params: Any, tokenizer,
               mesh: jax.sharding.Mesh | None = None, rules=None):
    self.cfg = cfg
    self.model_cfg = model_cfg
    self.tok = tokenizer
    self.mesh = mesh
    ids = tokenizer.latent_ids
    self.sol, self.eol = ids[formats.SOL], ids[formats.EOL]
    self.prior, self.post = ids[formats.PRIOR], ids[formats.POST]
    # Padded embedding rows (vocab rounded up) and BOS/pad are never valid thought tokens.
    banned = set(range(tokenizer.vocab_size, model_cfg.vocab_size))
    banned |= {tokenizer.bos_id, tokenizer.pad_id}
    sampling = dataclasses.replace(cfg.sampling, banned_ids=tuple(sorted(
        banned | set(cfg.sampling.banned_ids))))
    self.sampling = sampling
    cache_sharding = None
    if mesh is not None:
      rules = list(rules or sharding.DEFAULT_RULES)
      cache_sharding = sharding.logical_to_sharding(
          model_lib.cache_partition_specs(model_cfg), mesh, rules)
      param_shardings = sharding.logical_to_sharding(model_lib.logical_axes(model_cfg), mesh,
                                                     rules)
      params = jax.device_put(params, param_shardings)
    self.params = params
    self.sampler = sampler_lib.Sampler(
        functools.partial(model_lib.decode, model_cfg),
        functools.partial(model_lib.init_cache, model_cfg), sampling,
        stop_ids=(self.eol, tokenizer.eos_id), cache_sharding=cache_sharding)
    self.logprob_fn = scoring.make_token_logprobs(model_cfg)

  def _put(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    return sharding.host_to_global(arrays, self.mesh)

  def _row_multiple(self) -> int:
    return 1 if self.mesh is None else sharding.data_parallel_size(self.mesh)

  def process(self, pairs: Sequence[tuple[str, str]], rng: jax.Array,
              select_rng: np.random.Generator) -> list[ChunkResult]:
    """E-step for a list of (prefix, suffix) texts, in batches of `batch_chunks`."""
    out: list[ChunkResult] = []
    b = self.cfg.batch_chunks
    for i in range(0, len(pairs), b):
      out.extend(self._process_batch(pairs[i:i + b], jax.random.fold_in(rng, i // b),
                                     select_rng))
    return out

  def _process_batch(self, pairs, rng, select_rng) -> list[ChunkResult]:
    cfg, k, g = self.cfg, self.cfg.num_samples, self.sampling.max_gen_len
    budget = cfg.max_seq_len - g - _PROMPT_EXTRA
    items = []
    for prefix, suffix in pairs:
      p_ids, x_ids = self.tok.encode(prefix), self.tok.encode(suffix)
      n_suffix = len(x_ids)
      p_ids, x_ids, p_cut, x_cut = fit_to_budget(p_ids, x_ids, budget)
      prompt = formats.posterior_prompt_ids(self.tok.bos_id, p_ids, x_ids, self.tok.latent_ids)
      items.append((p_ids, x_ids, p_cut, x_cut, n_suffix, prompt))
    # Pad the batch to a fixed size and prompts to a bucket multiple: one compile per bucket.
    n_real = len(items)
    n_rows = -(-cfg.batch_chunks // self._row_multiple()) * self._row_multiple()
    longest = max(len(it[5]) for it in items)
    bucket = min(-(-longest // cfg.prompt_bucket) * cfg.prompt_bucket, cfg.max_seq_len - g)
    prompts = np.zeros((n_rows, bucket), np.int32)
    lens = np.ones((n_rows,), np.int32)
    for r, it in enumerate(items):
      prompts[r, :len(it[5])] = it[5]
      lens[r] = len(it[5])
    # Filler rows copy the first prompt so they stop when it does (a lone BOS could keep the
    # decode loop running to max_gen_len); their results are dropped.
    prompts[n_real:] = prompts[0]
    lens[n_real:] = lens[0]
    dev = self._put({"prompts": prompts, "lens": lens})
    sample = jax.device_get(self.sampler(self.params, dev["prompts"], dev["lens"], rng,
                                         num_samples=k))
    joint_pairs, meta = [], []
    for r in range(n_real):
      p_ids, x_ids = items[r][0], items[r][1]
      for s in range(k):
        row = r * k + s
        n = int(sample.lengths[row])
        z = sample.tokens[row, :n].tolist()
        ended = bool(sample.finished[row]) and n > 0 and z[-1] == self.eol
        body = z[:-1] if bool(sample.finished[row]) else z
        joint_pairs.append(formats.joint_ids(self.tok.bos_id, p_ids, body, x_ids,
                                             self.tok.latent_ids))
        meta.append((body, ended, float(sample.logprobs[row, :n].sum())))
    log_joint = scoring.score(self.logprob_fn, self.params, joint_pairs, cfg.max_seq_len,
                              rows_per_batch=max(cfg.score_rows, self._row_multiple()),
                              put=self._put if self.mesh is not None else None)
    results = []
    for r in range(n_real):
      sl = slice(r * k, (r + 1) * k)
      lj = log_joint[sl]
      lq = np.array([m[2] for m in meta[sl]])
      lw = weights.log_weights(lj, lq)
      kept = weights.select(lw, cfg.selection, select_rng)
      body, ended, _ = meta[r * k + kept]
      p_ids, x_ids, p_cut, x_cut, n_suffix, _ = items[r]
      results.append(ChunkResult(
          thought=self.tok.decode(body), thought_ids=body, log_weights=lw.tolist(),
          log_joint=lj.tolist(), log_q=lq.tolist(), kept=kept, ended=ended,
          thought_len=len(body), elbo=weights.elbo_k(lw, cfg.elbo_ks),
          ess=weights.effective_sample_size(lw), suffix_tokens=len(x_ids), cut_tokens=x_cut,
          prefix_cut_tokens=p_cut))
    return results

