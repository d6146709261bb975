"""Continuous batching: same samples as the static sampler, and slot accounting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_em import model
from latent_em.sampling import continuous as C, sampler as S
from test_sampler import markov_model

CFG = model.ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_refilled_rows_sample_exactly_what_the_static_sampler_does(temperature):
  """13 prompts x 3 samples on 8 rows (rows refilled many times, the ring wrapping, some
  requests with a shorter length limit): every sample equals the static Sampler's sample with
  the same key, token for token, with the same log q."""
  params = model.init_params(CFG, jax.random.key(0))
  dm = S.DecodeModel.for_model(CFG)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(5, 97, size=int(n)).tolist() for n in rng.integers(1, 20, size=13)]
  cfg = S.SamplingConfig(temperature=temperature, max_gen_len=12)
  k, stop = 3, (4, 9, 11)
  base = jax.random.key(5)
  sampler = C.ContinuousSampler(dm, cfg, stop, rows=8, ring=40, samples_per_prompt=k,
                                prefill_prompts=2, prompt_bucket=24)
  requests = [C.Request(i, p, jax.random.fold_in(base, i), max_new=12 - 4 * (i % 2))
              for i, p in enumerate(prompts)]
  got = {req.id: samples for req, samples in sampler.run(dm.prepare(params), requests)}
  assert sorted(got) == list(range(13)) and sampler.stats.refill_calls >= 7

  ref = {}
  for limit in (12, 8):
    static = S.Sampler(dm, S.SamplingConfig(temperature=temperature, max_gen_len=limit), stop)
    arr = np.zeros((len(prompts), 24), np.int32)
    for i, p in enumerate(prompts):
      arr[i, :len(p)] = p
    ref[limit] = jax.device_get(static(params, jnp.asarray(arr),
                                       jnp.asarray([len(p) for p in prompts]), base, k))
  for req in requests:
    out = ref[req.max_new]
    for j, sample in enumerate(got[req.id]):
      r = req.id * k + j
      n = int(out.lengths[r])
      assert sample.tokens == out.tokens[r, :n].tolist()
      assert sample.finished == bool(out.finished[r])
      np.testing.assert_allclose(sample.logprobs, out.logprobs[r, :n], atol=1e-5)


def test_slot_utilization_on_a_constructed_schedule():
  """4 rows, K = 2, one prompt per refill; length limits 2, 4 and 1, no stop token:
  steps 1-2 run all 4 rows (request 0 ends), request 2 refills rows 0-1, step 3 runs 4 rows
  (request 2 ends), step 4 runs only request 1's 2 rows. Useful 2*(2+4+1) = 14 of 16."""
  table = jnp.zeros((5, 5), jnp.float32)
  cfg = S.SamplingConfig(temperature=1.0, max_gen_len=4)
  sampler = C.ContinuousSampler(markov_model(table), cfg, (), rows=4, ring=8,
                                samples_per_prompt=2, prefill_prompts=1, prompt_bucket=1)
  requests = [C.Request(i, [1], jax.random.key(i), max_new=n) for i, n in enumerate((2, 4, 1))]
  done = [(req.id, [len(s.tokens) for s in samples]) for req, samples in
          sampler.run(None, requests)]
  assert done == [(0, [2, 2]), (2, [1, 1]), (1, [4, 4])]
  stats = sampler.stats
  assert (stats.useful, stats.computed, stats.decode_steps) == (14, 16, 4)
  assert stats.refill_calls == 3 and stats.slot_utilization == pytest.approx(14 / 16)


def test_prompt_too_long_for_the_ring_is_refused():
  cfg = S.SamplingConfig(max_gen_len=4)
  sampler = C.ContinuousSampler(markov_model(jnp.zeros((5, 5))), cfg, rows=2, ring=8)
  with pytest.raises(ValueError, match="do not fit the ring of 8 slots"):
    list(sampler.run(None, [C.Request(0, [1] * 5, jax.random.key(0))]))
