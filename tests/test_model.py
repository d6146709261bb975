"""Model tests: cached decode == full forward, packing, remat and scan equivalences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_em import kv_cache, model

CFG = model.ModelConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                        mlp_dim=160)


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.key(0))


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def test_shapes_and_dtypes(params):
  logits = model.forward(CFG, params, _tokens((2, 10)))
  assert logits.shape == (2, 10, CFG.vocab_size) and logits.dtype == jnp.float32
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == model.param_count(CFG)


def test_causal(params):
  toks = _tokens((1, 12))
  changed = toks.at[0, 8].set((toks[0, 8] + 1) % CFG.vocab_size)
  a, b = model.forward(CFG, params, toks), model.forward(CFG, params, changed)
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
  assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-4


@pytest.mark.parametrize("scan", [True, False])
def test_cached_decode_matches_full_forward(scan):
  """Prefill, a 3-token decode call, then one-token steps == the full forward's logits."""
  cfg = model.ModelConfig(**{**CFG.__dict__, "scan_layers": scan})
  p = model.init_params(cfg, jax.random.key(0))
  toks = _tokens((3, 16))
  full = model.forward(cfg, p, toks)
  last, prompt_cache = model.prefill(cfg, p, toks[:, :5], jnp.full((3,), 5, jnp.int32))
  np.testing.assert_allclose(last, full[:, 4], atol=2e-5, rtol=1e-5)
  rows = jnp.arange(3)
  cache = kv_cache.insert(model.init_cache(cfg, 3, 20), prompt_cache, rows, rows, jnp.int32(5))
  logits, cache = model.decode(cfg, p, toks[:, 5:8], cache,
                               kv_cache.Window(jnp.int32(5), jnp.full((3,), 5, jnp.int32)))
  steps = [logits]
  for t in range(8, 16):
    logits, cache = model.decode(cfg, p, toks[:, t:t + 1], cache,
                                 kv_cache.Window(jnp.int32(t), jnp.full((3,), t, jnp.int32)))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full[:, 5:], atol=2e-5, rtol=1e-5)


def test_left_padded_prompts_shared_by_samples_across_the_ring_end(params):
  """Prompts of different lengths, left-padded and prefilled once, copied to K rows each so
  that they wrap around the end of the ring; decoding continues each row exactly."""
  lengths = np.array([3, 7])
  bucket, k, gen, ring, head = 8, 2, 6, 13, 2   # the longest row fills the ring exactly
  prompts = np.asarray(_tokens((2, bucket), seed=3))
  cont = np.asarray(_tokens((2 * k, gen), seed=4))
  left = np.zeros_like(prompts)
  for b, n in enumerate(lengths):
    left[b, bucket - n:] = prompts[b, :n]
  dp = model.decode_params(CFG, params)
  _, prompt_cache = model.prefill(CFG, dp, jnp.asarray(left), jnp.asarray(lengths))
  rows = jnp.arange(2 * k)
  cache = kv_cache.insert(model.init_cache(CFG, 2 * k, ring), prompt_cache, rows, rows // k,
                          jnp.int32(head))
  context = jnp.asarray(np.repeat(lengths, k))
  outs = []
  for t in range(gen):
    window = kv_cache.Window(jnp.int32((head + t) % ring), context + t)
    logits, cache = model.decode(CFG, dp, jnp.asarray(cont[:, t:t + 1]), cache, window)
    outs.append(logits[:, 0])
  outs = np.stack(outs, 1)
  for row in range(2 * k):
    b = row // k
    seq = np.concatenate([prompts[b, :lengths[b]], cont[row]])[None]
    ref = model.forward(CFG, params, jnp.asarray(seq))[0, lengths[b]:]
    np.testing.assert_allclose(outs[row], ref, atol=2e-5, rtol=1e-5)


def test_packed_segments_equal_separate_documents(params):
  a, b = np.asarray(_tokens((1, 6), 5)), np.asarray(_tokens((1, 9), 6))
  packed = np.concatenate([a, b], 1)
  seg = np.array([[1] * 6 + [2] * 9])
  pos = np.array([list(range(6)) + list(range(9))])
  out = model.forward(CFG, params, jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
  np.testing.assert_allclose(out[:, :6], model.forward(CFG, params, jnp.asarray(a)), atol=2e-5)
  np.testing.assert_allclose(out[:, 6:], model.forward(CFG, params, jnp.asarray(b)), atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_loss_and_grads(params, remat):
  cfg = model.ModelConfig(**{**CFG.__dict__, "remat": remat})
  toks = _tokens((2, 12))

  def loss(c, p):
    return jnp.mean(jax.nn.logsumexp(model.forward(c, p, toks), -1))

  l0, g0 = jax.value_and_grad(lambda p: loss(CFG, p))(params)
  l1, g1 = jax.value_and_grad(lambda p: loss(cfg, p))(params)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g0, g1)


def test_scan_and_unrolled_agree(params):
  cfg = model.ModelConfig(**{**CFG.__dict__, "scan_layers": False})
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(CFG.n_layers):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  toks = _tokens((2, 9))
  np.testing.assert_allclose(model.forward(cfg, unrolled, toks), model.forward(CFG, params, toks),
                             atol=1e-5)


def test_bf16_compute_close_to_fp32(params):
  cfg = model.ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  toks = _tokens((2, 9))
  lo = model.forward(cfg, params, toks)
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(lo, model.forward(CFG, params, toks), atol=0.1)


def test_tied_embeddings_have_no_head():
  cfg = model.ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
  p = model.init_params(cfg, jax.random.key(0))
  assert "lm_head" not in p
  assert model.param_count(cfg) == sum(x.size for x in jax.tree.leaves(p))


def test_logical_axes_on_every_param():
  specs = model.logical_axes(CFG)
  shapes = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
  for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                         jax.tree.leaves(shapes)):
    assert len(spec) == len(shape.shape) and all(a is not None for a in spec)
