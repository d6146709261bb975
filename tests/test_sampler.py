"""Sampler, scorer and importance-weight tests against exact references."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from latent_em import model
from latent_em.sampling import sampler as S, scoring, weights

CFG = model.ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.key(0))


def _prompts():
  prompts = np.zeros((3, 8), np.int32)
  lens = np.array([3, 8, 5])
  for b, n in enumerate(lens):
    prompts[b, :n] = np.arange(1, n + 1) + 7 * b
  return jnp.asarray(prompts), jnp.asarray(lens)


@pytest.mark.parametrize("cfg", [
    S.SamplingConfig(temperature=1.0, max_gen_len=10),
    S.SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, max_gen_len=10),
    S.SamplingConfig(temperature=0.0, max_gen_len=10),
])
def test_sampler_logprobs_equal_scorer(params, cfg):
  """log q returned while sampling == teacher-forced scorer under the same processing."""
  smp = S.Sampler(S.DecodeModel.for_model(CFG), cfg, stop_ids=(4, 9))
  prompts, lens = _prompts()
  k = 4
  out = jax.device_get(smp(params, prompts, lens, jax.random.key(1), num_samples=k))
  pairs = []
  for r in range(3 * k):
    b = r // k
    n = int(out.lengths[r])
    assert n >= 1
    if out.finished[r]:
      assert out.tokens[r, n - 1] in (4, 9)
    assert np.all(out.tokens[r, n:] == 0) and np.all(out.logprobs[r, n:] == 0)
    pairs.append((np.asarray(prompts[b, :lens[b]]).tolist(), out.tokens[r, :n].tolist()))
  fn = scoring.make_token_logprobs(CFG, cfg.temperature, cfg.top_k, cfg.top_p)
  ref = scoring.score(fn, params, pairs, row_len=24, rows_per_batch=2)
  np.testing.assert_allclose(out.logprobs.sum(1), ref, atol=5e-5)
  if cfg.temperature == 0:  # greedy: every row of a prompt identical, equal to argmax of forward
    toks = out.tokens.reshape(3, k, -1)
    assert np.all(toks == toks[:, :1])
    seq = np.asarray(prompts[0, :3])[None]
    for t in range(int(out.lengths[0])):
      nxt = int(np.argmax(model.forward(CFG, params, jnp.asarray(seq))[0, -1]))
      assert nxt == out.tokens[0, t]
      seq = np.concatenate([seq, [[nxt]]], 1)


def markov_model(table):
  """A 'model' whose next-token logits depend only on the last token: exact probabilities."""
  return S.DecodeModel(
      prefill=lambda params, tokens, lengths: (table[tokens[:, -1]], jnp.zeros(tokens.shape[0])),
      decode=lambda params, tokens, cache, window: (table[tokens], cache),
      init_cache=lambda n, s: jnp.zeros((n,)),
      insert=lambda cache, prompt_cache, rows, src, head: cache)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)])
def test_sample_frequencies_match_model(temperature, top_p):
  v = 5
  table = jnp.asarray(np.random.default_rng(0).normal(size=(v, v)) * 1.5, jnp.float32)
  cfg = S.SamplingConfig(temperature=temperature, top_p=top_p, max_gen_len=2)
  smp = S.Sampler(markov_model(table), cfg)
  n = 20000
  prompts = jnp.full((1, 1), 2, jnp.int32)
  out = jax.device_get(smp(None, prompts, jnp.ones((1,), jnp.int32), jax.random.key(7),
                           num_samples=n))
  logp = np.asarray(S.process_logits(table, temperature, 0, top_p))
  expected = {}
  for a, b in itertools.product(range(v), range(v)):
    expected[(a, b)] = np.exp(logp[2, a] + logp[a, b])
  keys = [k for k, p in expected.items() if p > 1e-9]
  counts = {k: 0 for k in keys}
  for a, b in out.tokens:
    counts[(int(a), int(b))] += 1  # KeyError if a masked (top-p) pair is ever sampled
  obs = np.array([counts[k] for k in keys])
  exp = np.array([expected[k] for k in keys], np.float64) * n
  assert abs(exp.sum() - n) < 1e-3 * n
  merged = exp >= 5  # chi-square needs expected counts >= 5; pool the rare cells
  obs_m = np.append(obs[merged], obs[~merged].sum())
  exp_m = np.append(exp[merged], exp[~merged].sum())
  if exp_m[-1] == 0:
    obs_m, exp_m = obs_m[:-1], exp_m[:-1]
  p_value = stats.chisquare(obs_m, exp_m * obs_m.sum() / exp_m.sum()).pvalue
  assert p_value > 1e-3, p_value
  # Returned log q equals the exact log-probability of the sampled pair.
  for row in range(50):
    a, b = out.tokens[row]
    np.testing.assert_allclose(out.logprobs[row].sum(), np.log(expected[(int(a), int(b))]),
                               atol=1e-4)


def test_top_p_keeps_smallest_set_reaching_mass():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(S.process_logits(logits, 1.0, 0, 0.8))[0]) & (
      np.asarray(S.process_logits(logits, 1.0, 0, 0.8))[0] > -1e20)
  assert kept.tolist() == [True, True, False, False]
  probs = np.exp(np.asarray(S.process_logits(logits, 1.0, 0, 0.85))[0])
  np.testing.assert_allclose(probs, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-6)


def test_banned_ids_never_sampled(params):
  cfg = S.SamplingConfig(max_gen_len=6, banned_ids=tuple(range(0, 90)))
  smp = S.Sampler(S.DecodeModel.for_model(CFG), cfg)
  prompts, lens = _prompts()
  out = jax.device_get(smp(params, prompts, lens, jax.random.key(0), num_samples=2))
  assert np.all(out.tokens >= 90)


def test_resampling_frequencies_match_softmax():
  log_w = np.log(np.array([0.1, 0.6, 0.25, 0.05])) + 3.0
  rng = np.random.default_rng(0)
  n = 20000
  counts = np.bincount([weights.select(log_w, "resample", rng) for _ in range(n)], minlength=4)
  p_value = stats.chisquare(counts, weights.normalized(log_w) * n).pvalue
  assert p_value > 1e-3, (counts, p_value)
  assert weights.select(log_w, "argmax", rng) == 1
  uniform = np.bincount([weights.select(log_w, "uniform", rng) for _ in range(4000)], minlength=4)
  assert stats.chisquare(uniform).pvalue > 1e-3


def test_elbo_bounds_on_enumerable_toy_model():
  """ELBO_k <= log p(x) always in expectation, non-decreasing in k, and exact for q = posterior."""
  rng = np.random.default_rng(0)
  m = 6
  log_prior = np.log(rng.dirichlet(np.ones(m)))
  log_lik = np.log(rng.uniform(0.01, 1.0, m))        # p(x | z) for the observed x
  log_px = logsumexp(log_prior + log_lik)
  q = rng.dirichlet(np.ones(m))                      # a mismatched proposal q(z | x)
  ks = (1, 2, 4, 8)
  trials = 4000
  means = {k: 0.0 for k in ks}
  for _ in range(trials):
    z = rng.choice(m, size=8, p=q)
    lw = weights.log_weights(log_prior[z] + log_lik[z], np.log(q[z]))
    for k, v in weights.elbo_k(lw, ks).items():
      means[k] += v / trials
  vals = [means[k] for k in ks]
  assert all(a <= b + 1e-3 for a, b in zip(vals, vals[1:])), vals
  assert vals[-1] <= log_px + 1e-9 and vals[0] < vals[-1]
  posterior = np.exp(log_prior + log_lik - log_px)
  z = rng.choice(m, size=4, p=posterior)
  lw = weights.log_weights(log_prior[z] + log_lik[z], np.log(posterior[z]))
  for v in weights.elbo_k(lw, ks).values():
    np.testing.assert_allclose(v, log_px, atol=1e-9)


def test_effective_sample_size():
  assert weights.effective_sample_size(np.zeros(4)) == pytest.approx(4.0)
  assert weights.effective_sample_size(np.array([0.0, -50, -50, -50])) == pytest.approx(1.0)


def test_pack_respects_rows_and_owners():
  pairs = [([1, 2], [3, 4, 5]), ([1], [6]), ([1, 7, 7], [8, 9])]
  packed = scoring.pack(pairs, row_len=6)
  for i, (ctx, tgt) in enumerate(pairs):
    got = packed.targets[packed.owner == i]
    assert got.tolist() == list(tgt)
  with pytest.raises(ValueError, match="row length"):
    scoring.pack([([1] * 5, [2] * 5)], row_len=6)


def test_bucket_length():
  buckets = S.default_buckets(300)
  assert buckets == (32, 64, 128, 256, 300)
  assert S.bucket_length(33, buckets) == 64
  with pytest.raises(ValueError):
    S.bucket_length(301, buckets)
