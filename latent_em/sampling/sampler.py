"""Model-agnostic batched sampling on a ring KV cache: the device-side decode loop.

The loop knows nothing about the model: a `DecodeModel` gives it prefill, one-token decode,
cache init and cache refill (see `kv_cache.py` for the ring, its shared write head and row
windows). Its state (`DecodeState`) is a fixed batch of N rows; any row can be refilled with a
new prompt while the others keep decoding:

  refill    prefill C left-padded prompts once and copy each into its M = C x K rows
  decode    a `lax.while_loop` of one-token steps that exits after `max_steps` steps, or once
            `min_free` rows are idle, or when none is active

`Sampler` is the static use (B prompts x K samples, fill every row, decode until all stop);
`continuous.py` drives the same programs from the host, refilling rows as they finish.

Randomness is per sample: token j of a sample is drawn with fold_in(sample key, j), so a
sample's tokens do not depend on which row it ran in or what ran beside it. Returned log-probs
are those of the sampled tokens under the distribution actually sampled from (temperature,
top-k, top-p and banned ids applied), i.e. log q(z) for importance weighting.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from latent_em import config_lib, kv_cache, sharding

Array = jax.Array
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
  finished: jax.Array    # [N] bool: ended with a stop token (else hit its length limit)


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


# ----------------------------------------------------------------------------- the model side


@dataclasses.dataclass(frozen=True)
class DecodeModel:
  """What the decode loop needs from a model.

  prefill(params, tokens [C, P] left-padded, lengths [C]) -> (next-token logits [C, V],
      prompt cache); decode(params, tokens [N, 1], cache, kv_cache.Window) -> (logits
      [N, 1, V], cache); init_cache(N, S) -> cache; insert(cache, prompt cache, rows [M],
      src [M], head) -> cache (see kv_cache.insert); prepare(params) -> the params decoding
      should hold (idempotent); param_specs / cache_specs: logical PartitionSpecs of the
      prepared params and of the cache, or None; ring_multiple: the ring size must be a
      multiple of it (the kernel's block).
  """
  prefill: Callable
  decode: Callable
  init_cache: Callable
  insert: Callable = kv_cache.insert
  prepare: Callable = lambda params: params
  param_specs: Any = None
  cache_specs: Any = None
  ring_multiple: int = 1

  def ring(self, slots: int) -> int:
    """The ring size to allocate for `slots` (rounded up to `ring_multiple`)."""
    return -(-slots // self.ring_multiple) * self.ring_multiple

  @classmethod
  def for_model(cls, cfg, attention: str = "dense") -> "DecodeModel":
    """The Llama of `model.py`; `attention` is the cache attention ("dense" or "ragged")."""
    from latent_em import decode_attention_pallas, model as model_lib
    if attention not in kv_cache.IMPLS:
      raise ValueError(f"attention {attention!r} is not one of {kv_cache.IMPLS}")

    def decode(params, tokens, cache, window):
      return model_lib.decode(cfg, params, tokens, cache, window.replace(impl=attention))

    return cls(prefill=functools.partial(model_lib.prefill, cfg), decode=decode,
               init_cache=functools.partial(model_lib.init_cache, cfg),
               prepare=functools.partial(model_lib.decode_params, cfg),
               param_specs=model_lib.decode_logical_axes(cfg),
               cache_specs=model_lib.cache_partition_specs(cfg),
               ring_multiple=decode_attention_pallas.BLOCK if attention == "ragged" else 1)


def place_params(model: DecodeModel, params, mesh: jax.sharding.Mesh | None = None, rules=None):
  """`model.prepare(params)` once, on the mesh's devices (rules: sharding.DEFAULT_RULES).

  Decoding then reads a single copy in the compute dtype; drop the caller's reference to the
  original to free it.
  """
  if mesh is None or model.param_specs is None:
    return jax.jit(model.prepare)(params)
  shardings = sharding.logical_to_sharding(model.param_specs, mesh,
                                           list(rules or sharding.DEFAULT_RULES))
  return jax.jit(model.prepare, out_shardings=shardings)(params)


# ----------------------------------------------------------------------------- the loop state


@flax.struct.dataclass
class DecodeState:
  """N decoding rows. Generated tokens go into a ring of G = max_gen_len columns indexed by the
  global step (one write for all rows per step); a sample that started at step `start[r]` holds
  columns start, start + 1, ... (mod G), and an idle row writes nothing."""
  cache: Any
  head: Array          # scalar: ring slot of the next token
  step: Array          # scalar: global decode step (token ring column = step % G)
  context: Array       # [N] tokens of the row's sequence already in the cache
  logits: Array        # [N, V] fp32 logits of the row's next token
  keys: Array          # [N, 2] uint32 key data of the row's sample
  gen: Array           # [N] tokens generated for the row's sample
  limit: Array         # [N] the sample's length limit (<= G)
  start: Array         # [N] step of the sample's first token
  active: Array        # [N] bool: still generating
  finished: Array      # [N] bool: ended with a stop token
  tokens: Array        # [N, G] int32 token ring
  logprobs: Array      # [N, G] fp32 log q ring
  useful: Array        # scalar: row-steps that produced a token, this call
  computed: Array      # scalar: row-steps computed, this call
  ring: int = flax.struct.field(pytree_node=False, default=1)   # S, the cache's ring slots


def init_state(model: DecodeModel, rows: int, ring: int, vocab: int, max_gen_len: int
               ) -> DecodeState:
  """Idle rows over an empty ring of `ring` slots."""
  i32 = functools.partial(jnp.zeros, dtype=jnp.int32)
  return DecodeState(
      cache=model.init_cache(rows, ring), head=i32(()), step=i32(()), context=i32((rows,)),
      logits=jnp.zeros((rows, vocab), jnp.float32), keys=jnp.zeros((rows, 2), jnp.uint32),
      gen=i32((rows,)), limit=i32((rows,)), start=i32((rows,)),
      active=jnp.zeros((rows,), bool), finished=jnp.zeros((rows,), bool),
      tokens=i32((rows, max_gen_len)), logprobs=jnp.zeros((rows, max_gen_len), jnp.float32),
      useful=i32(()), computed=i32(()), ring=ring)


def refill(model: DecodeModel, params, state: DecodeState, prompts: Array, lengths: Array,
           prompt_keys: Array, rows: Array, src: Array, sample_idx: Array, limits: Array
           ) -> DecodeState:
  """Prefills C prompts once and starts M samples of them.

  prompts [C, P] left-padded, lengths [C], prompt_keys [C, 2] key data. Sample i runs in row
  rows[i] (N = skip it), continues prompt src[i], draws with fold_in(prompt key, sample_idx[i])
  and stops after at most limits[i] tokens.
  """
  keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(prompt_keys[src]), sample_idx)
  keys = jax.random.key_data(keys)
  first_logits, prompt_cache = model.prefill(params, prompts, lengths)
  cache = model.insert(state.cache, prompt_cache, rows, src, state.head)

  def put(x, values):
    return x.at[rows].set(values.astype(x.dtype), mode="drop")

  zeros = jnp.zeros(rows.shape, jnp.int32)
  return state.replace(
      cache=cache, context=put(state.context, lengths[src]),
      logits=put(state.logits, first_logits[src]), keys=put(state.keys, keys),
      gen=put(state.gen, zeros), limit=put(state.limit, limits),
      start=put(state.start, zeros + state.step), active=put(state.active, zeros == 0),
      finished=put(state.finished, zeros != 0))


def decode(model: DecodeModel, cfg: SamplingConfig, stop_ids: tuple[int, ...], params,
           state: DecodeState, max_steps: Array, min_free: Array) -> DecodeState:
  """One-token steps for every row until `max_steps` steps ran, `min_free` rows are idle, or
  none is active. Idle rows ride along (the batch is fixed) with a one-slot window."""
  n, g = state.tokens.shape
  stop = jnp.asarray(stop_ids or (-1,), jnp.int32)

  def cond(c):
    s, steps = c
    idle = jnp.sum(~s.active)
    return (steps < max_steps) & (idle < min_free) & jnp.any(s.active)

  def body(c):
    s, steps = c
    logp = process_logits(s.logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.banned_ids)
    if cfg.temperature == 0:
      token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    else:
      keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(s.keys), s.gen)
      token = jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)
    token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    active = s.active
    token = jnp.where(active, token, 0)
    col = s.step % g
    old_tok = jax.lax.dynamic_slice(s.tokens, (0, col), (n, 1))[:, 0]
    old_lp = jax.lax.dynamic_slice(s.logprobs, (0, col), (n, 1))[:, 0]
    tokens = jax.lax.dynamic_update_slice(
        s.tokens, jnp.where(active, token, old_tok)[:, None], (0, col))
    logprobs = jax.lax.dynamic_update_slice(
        s.logprobs, jnp.where(active, token_logp, old_lp)[:, None], (0, col))
    gen = s.gen + active.astype(jnp.int32)
    is_stop = active & jnp.isin(token, stop)
    still = active & ~is_stop & (gen < s.limit)
    context = jnp.where(active, s.context, 0)
    logits, cache = model.decode(params, token[:, None], s.cache,
                                 kv_cache.Window(s.head, context))
    s = s.replace(cache=cache, head=(s.head + 1) % s.ring, step=s.step + 1,
                  context=jnp.where(still, context + 1, 0), logits=logits[:, 0], gen=gen,
                  active=still, finished=s.finished | is_stop, tokens=tokens, logprobs=logprobs,
                  useful=s.useful + jnp.sum(active, dtype=jnp.int32), computed=s.computed + n)
    return s, steps + 1

  state = state.replace(useful=jnp.int32(0), computed=jnp.int32(0))
  state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
  return state


def state_shardings(model: DecodeModel, state: DecodeState, mesh, rules) -> Any:
  """NamedShardings of a DecodeState: rows (and the cache) split over the data-parallel axes."""
  row = sharding.batch_sharding(mesh, 1)
  out = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim) if x.ndim else
                     sharding.replicated(mesh), state.replace(cache=None))
  cache = jax.tree.map(lambda _: row, state.cache)
  if model.cache_specs is not None:
    cache = sharding.logical_to_sharding(model.cache_specs, mesh, rules)
  return out.replace(cache=cache)


# ----------------------------------------------------------------------------- static batches


def left_pad(prompts: Array, lengths: Array) -> Array:
  """Right-padded [B, P] -> left-padded (row b's prompt in its last lengths[b] columns)."""
  p = prompts.shape[1]
  idx = (jnp.arange(p)[None, :] - (p - lengths)[:, None]) % p
  return jnp.take_along_axis(prompts, idx, axis=1)


class Sampler:
  """B prompts x K samples in one jitted call: refill every row, decode until all stop.

  Each prompt is prefilled once and its cache copied to its K rows, so prompt compute is not
  multiplied by K. Compiles once per (batch size, prompt bucket, K); feed it prompts bucketed
  with `bucket_length` so a corpus does not trigger a recompile per batch. With a mesh, rows
  and the cache are split over its data-parallel axes and the model's logical rules are in
  effect (`rules`, default sharding.DEFAULT_RULES).
  """

  def __init__(self, model: DecodeModel, cfg: SamplingConfig, stop_ids: tuple[int, ...] = (),
               mesh: jax.sharding.Mesh | None = None, rules=None):
    self.model = model
    self.cfg = cfg
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.mesh = mesh
    self.rules = list(rules or sharding.DEFAULT_RULES)
    self._fn = jax.jit(sharding.with_logical_rules(self._sample, mesh, self.rules),
                       static_argnames=("num_samples",))

  def _sample(self, params, prompts, prompt_lens, rng, max_new, num_samples: int
              ) -> SampleOutput:
    b, p = prompts.shape
    n, g = b * num_samples, self.cfg.max_gen_len
    params = self.model.prepare(params)
    # The first logits' shape gives the vocabulary; the prefill inside refill is the real one.
    vocab = jax.eval_shape(self.model.prefill, params, prompts, prompt_lens)[0].shape[-1]
    state = init_state(self.model, n, self.model.ring(p + g), vocab, g)
    if self.mesh is not None:
      state = jax.lax.with_sharding_constraint(
          state, state_shardings(self.model, state, self.mesh, self.rules))
    state = state.replace(head=jnp.int32(p))
    prompt_keys = jax.random.key_data(jax.vmap(functools.partial(jax.random.fold_in, rng))(
        jnp.arange(b)))
    rows = jnp.arange(n)
    state = refill(self.model, params, state, left_pad(prompts, prompt_lens), prompt_lens,
                   prompt_keys, rows, rows // num_samples, rows % num_samples,
                   jnp.full((n,), g, jnp.int32) if max_new is None else max_new)
    state = decode(self.model, self.cfg, self.stop_ids, params, state, jnp.int32(g),
                   jnp.int32(n))
    return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.gen,
                        finished=state.finished)

  def __call__(self, params, prompts: jax.Array, prompt_lens: jax.Array, rng: jax.Array,
               num_samples: int = 1, max_new: jax.Array | None = None) -> SampleOutput:
    """prompts [B, P] right-padded int32, prompt_lens [B] -> SampleOutput rows [B*K] ordered
    prompt-major (row b*K + k is sample k of prompt b, drawn with fold_in(fold_in(rng, b), k)).
    `max_new` [B*K]: per-row length limits (<= max_gen_len; default max_gen_len)."""
    return self._fn(params, prompts, prompt_lens, rng, max_new, num_samples=num_samples)


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
