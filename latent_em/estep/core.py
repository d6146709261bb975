"""The E-step for (prefix P, suffix X) chunks (DESIGN.md §4).

  1. posterior prompt  BOS P SoL EoL X SoL POST   -> K thoughts z_k ~ q(z | P, X), with log q
  2. joint score       log p(SoL PRIOR z_k EoL X | BOS P)
  3. log w_k = log p(z_k, X | P) - log q(z_k | P, X); keep one z (resample / uniform / argmax)
  4. ELBO_k = logsumexp(log w_1..k) - log k, effective sample size, thought length, EoL flag

Overflow: the joint sequence must fit `max_seq_len`; the prefix is cut first (its oldest
tokens), then the end of the suffix, and the cut suffix tokens are counted.

Sampling runs with continuous batching (`sampling/continuous.py`): `batch_chunks * K` decoding
rows; a chunk's prompt is prefilled once for its K rows, and a finished row takes the next
chunk's sample while the others keep decoding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_em import config_lib, formats, kv_cache, model as model_lib, sharding
from latent_em.data import chunking
from latent_em.sampling import continuous, sampler as sampler_lib, scoring, weights

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
  batch_chunks: int = 8                 # decoding rows = batch_chunks * K (continuous batching)
  prefill_chunks: int = 0               # chunks per prefill / refill (0: batch_chunks // 16, >= 1)
  attention: str = "auto"               # decode attention: auto | dense (XLA) | ragged (TPU kernel)
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
    config_lib.check(self.prefill_chunks >= 0, "config.estep.prefill_chunks", "must be >= 0")
    config_lib.check(self.attention in ("auto",) + kv_cache.IMPLS, "config.estep.attention",
                     f"{self.attention!r}: use auto, " + " or ".join(kv_cache.IMPLS))


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


@dataclasses.dataclass
class Chunk:
  """One (prefix, suffix) chunk on its way through the engine."""
  p_ids: list[int]              # prefix tokens after the overflow cut
  x_ids: list[int]              # suffix tokens after the overflow cut
  prefix_cut: int
  suffix_cut: int
  prompt: list[int]             # posterior prompt
  key: jax.Array                # its K thoughts are drawn with fold_in(key, k)
  tag: Any = None               # the caller's handle (e.g. shard and index)
  samples: list[continuous.Sample] | None = None


def resolve_attention(name: str, platform: str | None = None) -> str:
  """config.estep.attention "auto" -> the Pallas ragged kernel on TPU, dense XLA elsewhere
  (`platform`: of the devices the programs are compiled for; default: jax's backend)."""
  platform = platform or jax.default_backend()
  on_tpu = platform == "tpu"
  if name == "auto":
    return "ragged" if on_tpu else "dense"
  config_lib.check(name != "ragged" or on_tpu, "config.estep.attention",
                   f"'ragged' is a TPU kernel and this runs on {platform}; use auto or dense")
  return name


def make_sampler(cfg: EStepConfig, model_cfg: model_lib.ModelConfig,
                 sampling: sampler_lib.SamplingConfig, stop_ids: tuple[int, ...],
                 mesh: jax.sharding.Mesh | None = None, rules=None, platform: str | None = None
                 ) -> continuous.ContinuousSampler:
  """The E-step's decoding rows: `batch_chunks * num_samples` rows of a ContinuousSampler over
  the model's DecodeModel (the Engine's, and what the fit check compiles)."""
  decode_model = sampler_lib.DecodeModel.for_model(
      model_cfg, attention=resolve_attention(cfg.attention, platform))
  return continuous.ContinuousSampler(
      decode_model, sampling, stop_ids=stop_ids,
      rows=cfg.batch_chunks * cfg.num_samples, ring=cfg.max_seq_len,
      samples_per_prompt=cfg.num_samples, prefill_prompts=cfg.prefill_chunks,
      prompt_bucket=cfg.prompt_bucket, mesh=mesh, rules=rules)


def scorer_config(model_cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
  """The model as the joint scorer runs it: layers unrolled over the decode-layout params,
  no remat (forward only)."""
  return dataclasses.replace(model_cfg, scan_layers=False, remat="none")


class Engine:
  """Samples thoughts for chunks with continuous batching and scores them (one model).

  Holds the params once, in the compute dtype and the per-layer layout of
  `model.decode_params` (sampling and scoring both read them); decoding runs on
  `batch_chunks * num_samples` rows of `ContinuousSampler`, whose stats (`self.sampler.stats`)
  give the slot utilization.
  """

  def __init__(self, cfg: EStepConfig, model_cfg: model_lib.ModelConfig, params: Any, tokenizer,
               mesh: jax.sharding.Mesh | None = None, rules=None):
    self.cfg = cfg
    self.model_cfg = model_cfg
    self.tok = tokenizer
    self.mesh = mesh
    ids = tokenizer.latent_ids
    self.sol, self.eol = ids[formats.SOL], ids[formats.EOL]
    # Padded embedding rows (vocab rounded up) and BOS/pad are never valid thought tokens.
    banned = set(range(tokenizer.vocab_size, model_cfg.vocab_size))
    banned |= {tokenizer.bos_id, tokenizer.pad_id}
    sampling = dataclasses.replace(cfg.sampling, banned_ids=tuple(sorted(
        banned | set(cfg.sampling.banned_ids))))
    self.sampling = sampling
    rules = list(rules or sharding.DEFAULT_RULES)
    self.sampler = make_sampler(cfg, model_cfg, sampling, (self.eol, tokenizer.eos_id), mesh,
                                rules)
    self.decode_model = self.sampler.model
    # Scoring reads the same per-layer, compute-dtype params as decoding: one copy on device.
    self.params = sampler_lib.place_params(self.decode_model, params, mesh, rules)
    del params
    self.logprob_fn = scoring.make_token_logprobs(scorer_config(model_cfg), mesh=mesh, rules=rules)

  def _put(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    return sharding.host_to_global(arrays, self.mesh)

  def _row_multiple(self) -> int:
    return 1 if self.mesh is None else sharding.data_parallel_size(self.mesh)

  def chunk(self, prefix: str, suffix: str, key: jax.Array, tag: Any = None) -> Chunk:
    """Tokenizes a (prefix, suffix) pair and applies the overflow policy."""
    budget = self.cfg.max_seq_len - self.sampling.max_gen_len - _PROMPT_EXTRA
    p_ids, x_ids = self.tok.encode(prefix), self.tok.encode(suffix)
    p_ids, x_ids, p_cut, x_cut = fit_to_budget(p_ids, x_ids, budget)
    prompt = formats.posterior_prompt_ids(self.tok.bos_id, p_ids, x_ids, self.tok.latent_ids)
    return Chunk(p_ids, x_ids, p_cut, x_cut, prompt, key, tag)

  def sample(self, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """K thoughts for each chunk (continuous batching); yields chunks as they complete."""
    requests = (continuous.Request(c, c.prompt, c.key) for c in chunks)
    for req, samples in self.sampler.run(self.params, requests):
      req.id.samples = samples
      yield req.id

  def score(self, chunks: Sequence[Chunk], select_rng: np.random.Generator
            ) -> list[ChunkResult]:
    """Joint scores, log-weights, the kept thought and ELBO_k for sampled chunks, in order."""
    cfg, k = self.cfg, self.cfg.num_samples
    joint_pairs, meta = [], []
    for c in chunks:
      for sample in c.samples:
        z = sample.tokens
        ended = sample.finished and bool(z) and z[-1] == self.eol
        body = z[:-1] if sample.finished else z
        joint_pairs.append(formats.joint_ids(self.tok.bos_id, c.p_ids, body, c.x_ids,
                                             self.tok.latent_ids))
        meta.append((body, ended, sample.log_q))
    log_joint = scoring.score(self.logprob_fn, self.params, joint_pairs, cfg.max_seq_len,
                              rows_per_batch=max(cfg.score_rows, self._row_multiple()),
                              put=self._put if self.mesh is not None else None)
    results = []
    for r, c in enumerate(chunks):
      sl = slice(r * k, (r + 1) * k)
      lj = log_joint[sl]
      lq = np.array([m[2] for m in meta[sl]])
      lw = weights.log_weights(lj, lq)
      kept = weights.select(lw, cfg.selection, select_rng)
      body, ended, _ = meta[r * k + kept]
      results.append(ChunkResult(
          thought=self.tok.decode(body), thought_ids=body, log_weights=lw.tolist(),
          log_joint=lj.tolist(), log_q=lq.tolist(), kept=kept, ended=ended,
          thought_len=len(body), elbo=weights.elbo_k(lw, cfg.elbo_ks),
          ess=weights.effective_sample_size(lw), suffix_tokens=len(c.x_ids),
          cut_tokens=c.suffix_cut, prefix_cut_tokens=c.prefix_cut))
    return results

  def process(self, pairs: Sequence[tuple[str, str]], rng: jax.Array,
              select_rng: np.random.Generator) -> list[ChunkResult]:
    """E-step for a list of (prefix, suffix) texts: chunk i's thoughts are drawn with
    fold_in(fold_in(rng, i), k); results in input order."""
    chunks = [self.chunk(p, x, jax.random.fold_in(rng, i), tag=i)
              for i, (p, x) in enumerate(pairs)]
    for _ in self.sample(chunks):
      pass
    return self.score(chunks, select_rng)
