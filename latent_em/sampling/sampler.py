"""Model-agnostic batched sampler: one jitted prefill, then one jitted `lax.while_loop` decode.

The sampler knows nothing about the model. It takes a `decode_fn(params, tokens [N, T], cache,
cache_index [N]) -> (logits [N, T, V], cache)` (see `model.decode`) and an `init_cache(N, S)`.

B prompts x K samples: each prompt is prefilled once, then its KV cache is repeated for its K
samples, so prompt compute is not multiplied by K. Prompts are right-padded to a bucket length;
row b's generation starts at slot `prompt_len[b]` and overwrites the padding, so bucketing
needs no extra masking. Rows stop on any of `stop_ids` or after `max_gen_len` tokens, and the
loop exits as soon as every row has stopped.

Returned log-probs are those of the sampled tokens under the distribution actually sampled from
(temperature, top-k and top-p applied), i.e. log q(z) for importance weighting.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from latent_em import config_lib

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (config.sampling)."""
  temperature: float = 1.0        # 0 = greedy
  top_k: int = 0                  # 0 = off
  top_p: float = 1.0              # 1 = off
  max_gen_len: int = 128
  banned_ids: tuple[int, ...] = ()  # never sampled (e.g. latent tokens for raw models)

  def __post_init__(self):
    config_lib.check(self.temperature >= 0, "config.sampling.temperature", "must be >= 0")
    config_lib.check(self.top_k >= 0, "config.sampling.top_k", "must be >= 0")
    config_lib.check(0 < self.top_p <= 1, "config.sampling.top_p", "must be in (0, 1]")
    config_lib.check(self.max_gen_len > 0, "config.sampling.max_gen_len", "must be positive")


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array      # [N, G] int32, stop token included, zeros after it
  logprobs: jax.Array    # [N, G] fp32 log q of each sampled token, 0 after the end
  lengths: jax.Array     # [N] int32 generated tokens (stop token included)
  finished: jax.Array    # [N] bool: ended with a stop token (else hit max_gen_len)


def process_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float,
                   banned_ids: tuple[int, ...] = ()) -> jax.Array:
  """Log-probabilities [..., V] of the distribution actually sampled from.

  Greedy (temperature 0) is represented as a one-hot distribution on the argmax.
  """
  logits = logits.astype(jnp.float32)
  if banned_ids:
    logits = logits.at[..., jnp.asarray(banned_ids)].set(NEG_INF)
  if temperature == 0:
    top = jnp.argmax(logits, axis=-1)
    return jnp.where(jax.nn.one_hot(top, logits.shape[-1], dtype=bool), 0.0, NEG_INF)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return jax.nn.log_softmax(logits, axis=-1)


@flax.struct.dataclass
class _LoopState:
  step: jax.Array        # scalar
  logits: jax.Array      # [N, V] logits for the next token
  cache: Any
  rng: jax.Array
  tokens: jax.Array      # [N, G]
  logprobs: jax.Array    # [N, G]
  done: jax.Array        # [N]
  lengths: jax.Array     # [N]
  finished: jax.Array    # [N]


def _sample_loop(decode_fn, params, first_logits, cache, start_index, rng, stop_ids,
                 cfg: SamplingConfig) -> SampleOutput:
  n = first_logits.shape[0]
  g = cfg.max_gen_len
  stop = jnp.asarray(stop_ids, jnp.int32) if stop_ids else jnp.zeros((0,), jnp.int32)

  def cond(s: _LoopState):
    return (s.step < g) & ~jnp.all(s.done)

  def body(s: _LoopState):
    rng, key = jax.random.split(s.rng)
    logp = process_logits(s.logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.banned_ids)
    if cfg.temperature == 0:
      token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    else:
      token = jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
    token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    active = ~s.done
    token = jnp.where(active, token, 0)
    is_stop = jnp.any(token[:, None] == stop[None, :], axis=-1) & active
    tokens = s.tokens.at[:, s.step].set(token)
    logprobs = s.logprobs.at[:, s.step].set(jnp.where(active, token_logp, 0.0))
    lengths = s.lengths + active.astype(jnp.int32)
    logits, cache = decode_fn(params, token[:, None], s.cache, start_index + s.step)
    return _LoopState(step=s.step + 1, logits=logits[:, 0], cache=cache, rng=rng, tokens=tokens,
                      logprobs=logprobs, done=s.done | is_stop, lengths=lengths,
                      finished=s.finished | is_stop)

  init = _LoopState(step=jnp.int32(0), logits=first_logits, cache=cache, rng=rng,
                    tokens=jnp.zeros((n, g), jnp.int32), logprobs=jnp.zeros((n, g), jnp.float32),
                    done=jnp.zeros((n,), bool), lengths=jnp.zeros((n,), jnp.int32),
                    finished=jnp.zeros((n,), bool))
  out = jax.lax.while_loop(cond, body, init)
  return SampleOutput(tokens=out.tokens, logprobs=out.logprobs, lengths=out.lengths,
                      finished=out.finished)


class Sampler:
  """Jitted prefill + decode loop for a fixed (decode_fn, init_cache, config, stop ids).

  `cache_batch_axis` is the batch axis of every cache leaf (0 for `model.init_cache`'s
  per-layer [B, K, S, Dh] buffers); the K samples of a prompt repeat its prefilled cache
  along it.

  Compiles once per (batch size, prompt bucket, K); feed it prompts bucketed with
  `bucket_length` so a corpus does not trigger a recompile per batch.
  """

  def __init__(self, decode_fn: Callable, init_cache: Callable[[int, int], Any],
               cfg: SamplingConfig, stop_ids: tuple[int, ...] = (),
               cache_sharding: Any = None, cache_batch_axis: int = 0):
    self.cache_batch_axis = cache_batch_axis
    self.decode_fn = decode_fn
    self.init_cache = init_cache
    self.cfg = cfg
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self._cache_sharding = cache_sharding
    self._fn = jax.jit(self._sample, static_argnames=("num_samples",))

  def _sample(self, params, prompts, prompt_lens, rng, num_samples: int) -> SampleOutput:
    b, p = prompts.shape
    cache = self.init_cache(b, p + self.cfg.max_gen_len)
    if self._cache_sharding is not None:
      cache = jax.lax.with_sharding_constraint(cache, self._cache_sharding)
    logits, cache = self.decode_fn(params, prompts, cache, jnp.zeros((b,), jnp.int32))
    last = jnp.take_along_axis(logits, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    if num_samples > 1:
      repeat = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
      last = repeat(last)
      cache = jax.tree.map(
          lambda c: jnp.repeat(c, num_samples, axis=self.cache_batch_axis), cache)
      prompt_lens = repeat(prompt_lens)
    return _sample_loop(self.decode_fn, params, last, cache, prompt_lens, rng, self.stop_ids,
                        self.cfg)

  def __call__(self, params, prompts: jax.Array, prompt_lens: jax.Array, rng: jax.Array,
               num_samples: int = 1) -> SampleOutput:
    """prompts [B, P] right-padded int32, prompt_lens [B] -> SampleOutput rows [B*K] ordered
    prompt-major (row b*K + k is sample k of prompt b)."""
    return self._fn(params, prompts, prompt_lens, rng, num_samples=num_samples)


def bucket_length(n: int, buckets: tuple[int, ...]) -> int:
  """Smallest bucket >= n (prompt lengths are padded to a few sizes to bound recompiles)."""
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def default_buckets(max_len: int, smallest: int = 32) -> tuple[int, ...]:
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  out.append(max_len)
  return tuple(out)
