"""Continuous batching: a fixed batch of decoding rows, refilled from a queue as rows finish.

The host alternates two jitted programs of `sampler.py` on one `DecodeState` (donated, so the
ring cache is updated in place):

  refill  prefill up to C queued prompts (left-padded to a bucket) once and start each one's K
          samples in idle rows (the K samples of a prompt share its prefill);
  decode  one-token steps for all rows until `C x K` rows are idle (or every row, once the
          queue is empty), so each refill fills a whole prefill batch.

Finished samples are read back (tokens, log q) and a request is yielded once its K samples are
done, in completion order. `Stats.slot_utilization` = useful row-steps (a row produced a token)
/ computed row-steps (rows x decode steps), over every decode step of the run.

Sample k of a request is drawn with fold_in(request key, k) (token j with a further fold_in j),
so results do not depend on the schedule, the batch size or the device count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_em import sharding
from latent_em.sampling import sampler as sampler_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt to sample K continuations of. `key`: a typed PRNG key; `max_new`: the length
  limit of its samples, one for all or one per sample (0 = the config's max_gen_len)."""
  id: Any
  prompt: Sequence[int]
  key: Array
  max_new: int | Sequence[int] = 0


@dataclasses.dataclass
class Sample:
  tokens: list[int]        # generated ids, the stop token included
  logprobs: np.ndarray     # [len(tokens)] log q of each
  finished: bool           # ended with a stop id (else hit the length limit)

  @property
  def log_q(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))


@dataclasses.dataclass
class Stats:
  useful: int = 0          # row-steps that produced a token
  computed: int = 0        # row-steps computed (rows x decode steps)
  drain_useful: int = 0    # the same, once the queue was empty (the run's tail)
  drain_computed: int = 0
  decode_steps: int = 0
  decode_calls: int = 0
  refill_calls: int = 0
  prompts: int = 0
  samples: int = 0

  @property
  def slot_utilization(self) -> float:
    return self.useful / self.computed if self.computed else float("nan")

  @property
  def steady_slot_utilization(self) -> float:
    """Utilization while rows could still be refilled (the run without its tail)."""
    computed = self.computed - self.drain_computed
    return (self.useful - self.drain_useful) / computed if computed else float("nan")

  def as_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["slot_utilization"] = self.slot_utilization
    out["steady_slot_utilization"] = self.steady_slot_utilization
    return out


class ContinuousSampler:
  """K samples for each of a stream of prompts on `rows` decoding rows (see module docstring).

  ring: cache slots per row, at least the longest prompt + its max_new (prompts are padded to
  multiples of `prompt_bucket`, at most `ring`). `prefill_prompts` (C): prompts per refill; the
  decode program returns once C x K rows are idle. With a mesh, rows and cache are split over
  its data-parallel axes (rows and C are rounded up to multiples of its size) and the model's
  logical rules are in effect.
  """

  def __init__(self, model: sampler_lib.DecodeModel, cfg: sampler_lib.SamplingConfig,
               stop_ids: tuple[int, ...] = (), *, rows: int, ring: int,
               samples_per_prompt: int = 1, prefill_prompts: int = 0, prompt_bucket: int = 64,
               mesh: jax.sharding.Mesh | None = None, rules=None):
    k = samples_per_prompt
    dp = sharding.data_parallel_size(mesh) if mesh is not None else 1
    rows = max(rows, k)
    self.rows = -(-rows // dp) * dp
    # A refill waits for C x K idle rows: ~C x K / 2 rows idle on average (3% at 256 rows).
    c = prefill_prompts or max(1, self.rows // (16 * k))
    c = min(c, self.rows // k)
    self.prefill_prompts = -(-c // dp) * dp
    if ring <= cfg.max_gen_len:
      raise ValueError(f"ring of {ring} slots leaves no room for a prompt before "
                       f"max_gen_len={cfg.max_gen_len}")
    self.model, self.cfg, self.k, self.ring = model, cfg, k, model.ring(ring)
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.prompt_bucket = prompt_bucket
    self.mesh, self.rules = mesh, list(rules or sharding.DEFAULT_RULES)
    self.stats = Stats()
    self._programs: dict[str, Any] = {}

  # --------------------------------------------------------------------------- programs

  def _compile(self, params) -> None:
    """Builds the init / refill / decode programs (shardings need the vocabulary size)."""
    if self._programs:
      return
    model, n, g = self.model, self.rows, self.cfg.max_gen_len
    probe = jnp.zeros((1, 1), jnp.int32)
    vocab = jax.eval_shape(model.prefill, params, probe, jnp.ones((1,), jnp.int32))[0].shape[-1]
    init = functools.partial(sampler_lib.init_state, model, n, self.ring, vocab, g)
    out = None
    if self.mesh is not None:
      out = sampler_lib.state_shardings(model, jax.eval_shape(init), self.mesh, self.rules)
    rules = functools.partial(sharding.with_logical_rules, mesh=self.mesh, rules=self.rules)
    self._programs = {
        "init": jax.jit(init, out_shardings=out),
        "refill": jax.jit(rules(functools.partial(sampler_lib.refill, model)),
                          donate_argnums=(1,), out_shardings=out),
        "decode": jax.jit(rules(functools.partial(sampler_lib.decode, model, self.cfg,
                                                  self.stop_ids)),
                          donate_argnums=(1,), out_shardings=out),
    }

  def compiled_programs(self) -> int:
    """Compiled variants so far (init + one refill per prompt bucket + decode)."""
    return sum(p._cache_size() for p in self._programs.values())  # pylint: disable=protected-access

  # --------------------------------------------------------------------------- host loop

  def _bucket(self, n: int) -> int:
    return min(-(-n // self.prompt_bucket) * self.prompt_bucket, self.ring)

  def _refill(self, params, state, batch: list[Request], free: list[int],
              owner: dict[int, tuple[int, int]], ids: list[int]):
    c, k = self.prefill_prompts, self.k
    p = self._bucket(max(len(r.prompt) for r in batch))
    prompts = np.zeros((c, p), np.int32)
    lengths = np.ones((c,), np.int32)
    rows = np.full((c * k,), self.rows, np.int32)          # out of range: skipped
    src = np.zeros((c * k,), np.int32)
    keys = np.zeros((c, 2), np.uint32)
    limits = np.zeros((c * k,), np.int32)
    for i, (req, rid) in enumerate(zip(batch, ids)):
      n = len(req.prompt)
      limits_k = np.broadcast_to(np.asarray(req.max_new, np.int32), (k,))
      limits_k = np.where(limits_k > 0, limits_k, self.cfg.max_gen_len)
      max_new = int(limits_k.max())
      if not 0 < n or n + max_new > self.ring or max_new > self.cfg.max_gen_len:
        raise ValueError(f"request {req.id!r}: a prompt of {n} tokens and {max_new} new ones "
                         f"do not fit the ring of {self.ring} slots (max_gen_len "
                         f"{self.cfg.max_gen_len})")
      prompts[i, p - n:] = req.prompt
      lengths[i] = n
      keys[i] = np.asarray(jax.random.key_data(req.key))
      for j in range(k):
        row = free.pop(0)
        owner[row] = (rid, j)
        rows[i * k + j], src[i * k + j], limits[i * k + j] = row, i, limits_k[j]
    self.stats.refill_calls += 1
    self.stats.prompts += len(batch)
    return self._programs["refill"](params, state, prompts, lengths, keys, rows, src,
                                    np.arange(c * k, dtype=np.int32) % k, limits)

  def run(self, params, requests: Iterable[Request]) -> Iterator[tuple[Request, list[Sample]]]:
    """Yields (request, its K `Sample`s in order k = 0..K-1) as requests complete.

    `params` should already be `model.prepare`d (and placed on the mesh) by the caller.
    """
    self._compile(params)
    queue = iter(requests)
    lookahead: list[Request] = []

    def more() -> bool:
      if not lookahead:
        nxt = next(queue, None)
        if nxt is not None:
          lookahead.append(nxt)
      return bool(lookahead)

    state = self._programs["init"]()
    free = list(range(self.rows))
    owner: dict[int, tuple[int, int]] = {}          # row -> (request index, sample k)
    open_requests: dict[int, tuple[Request, list]] = {}
    next_id = 0
    g = self.cfg.max_gen_len
    while True:
      while len(free) >= self.k and more():
        batch, ids = [], []
        while len(batch) < self.prefill_prompts and len(free) >= self.k * (len(batch) + 1) \
            and more():
          req = lookahead.pop()
          batch.append(req)
          ids.append(next_id)
          open_requests[next_id] = (req, [None] * self.k)
          next_id += 1
        state = self._refill(params, state, batch, free, owner, ids)
      if not owner:
        break
      queue_left = more()
      min_free = self.prefill_prompts * self.k if queue_left else self.rows
      state = self._programs["decode"](params, state, np.int32(g), np.int32(min_free))
      active, gen, finished, start, useful, computed = jax.device_get(
          (state.active, state.gen, state.finished, state.start, state.useful, state.computed))
      self.stats.decode_calls += 1
      self.stats.useful += int(useful)
      self.stats.computed += int(computed)
      if not queue_left:
        self.stats.drain_useful += int(useful)
        self.stats.drain_computed += int(computed)
      self.stats.decode_steps += int(computed) // self.rows
      done = sorted(r for r in owner if not active[r])
      if not done:
        continue
      tokens, logprobs = jax.device_get((state.tokens, state.logprobs))
      for row in done:
        rid, j = owner.pop(row)
        n = int(gen[row])
        cols = (int(start[row]) + np.arange(n)) % g
        open_requests[rid][1][j] = Sample(tokens=tokens[row, cols].tolist(),
                                          logprobs=np.asarray(logprobs[row, cols]),
                                          finished=bool(finished[row]))
        free.append(row)
        self.stats.samples += 1
        if all(s is not None for s in open_requests[rid][1]):
          yield open_requests.pop(rid)
      free.sort()

