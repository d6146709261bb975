"""Ring KV cache: window masks, refills and the Pallas decode kernel against references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from latent_em import decode_attention, decode_attention_pallas as pallas_attn, kv_cache, model


def test_window_mask_matches_a_brute_force_reference():
  rng = np.random.default_rng(0)
  s, t = 11, 3
  for head in (0, 4, 8):  # head + T <= S
    context = rng.integers(-2, s - t, size=5)
    got = np.asarray(decode_attention.window_mask(jnp.int32(head), jnp.asarray(context), t, s))
    for b in range(5):
      for q in range(t):
        # Row b's tokens, newest first: the query itself, earlier new tokens, then the cache.
        n_visible = context[b] + q + 1
        want = {(head + q - d) % s for d in range(max(n_visible, 0))}
        assert {int(i) for i in np.flatnonzero(got[b, q])} == want, (head, b, q)


def test_insert_places_each_prompt_just_before_the_head():
  rng = np.random.default_rng(1)
  b, s, p, x = 4, 10, 6, 3
  cache = tuple({"k": jnp.asarray(rng.normal(size=(b, s, x)), jnp.float32),
                 "v": jnp.asarray(rng.normal(size=(b, s, x)), jnp.float32)} for _ in range(2))
  prompts = tuple({"k": jnp.asarray(rng.normal(size=(2, p, x)), jnp.float32),
                   "v": jnp.asarray(rng.normal(size=(2, p, x)), jnp.float32)} for _ in range(2))
  head = 3                                   # the 6 prompt slots wrap: 7, 8, 9, 0, 1, 2
  rows, src = jnp.asarray([2, 0, b]), jnp.asarray([1, 0, 1])   # row b: skipped
  out = kv_cache.insert(cache, prompts, rows, src, jnp.int32(head))
  for layer in range(2):
    for name in ("k", "v"):
      got, old = np.asarray(out[layer][name]), np.asarray(cache[layer][name])
      new = np.asarray(prompts[layer][name])
      for row, prompt in ((2, 1), (0, 0)):
        want = np.zeros((s, x), np.float32)
        want[(head - p + np.arange(p)) % s] = new[prompt]
        np.testing.assert_array_equal(got[row], want)
      for row in (1, 3):
        np.testing.assert_array_equal(got[row], old[row])


def test_blocks_per_row_cover_exactly_the_window_blocks():
  s, block = 64, 8
  for head in (0, 5, 7, 8, 40, 63):
    lengths = np.array([1, 2, 8, 9, 30, 57, 63, 64])
    got = np.asarray(pallas_attn.blocks_per_row(jnp.int32(head), jnp.asarray(lengths), s, block))
    first, _ = pallas_attn.block_range(jnp.int32(head), jnp.asarray(lengths), s, block)
    for i, n in enumerate(lengths):
      touched = {((head - d) % s) // block for d in range(n)}
      assert got[i] == len(touched), (head, n)
      visited = {(int(first[i]) + j) % (s // block) for j in range(int(got[i]))}
      assert visited == touched


@pytest.mark.parametrize("kv_heads,groups,block", [(2, 2, 16), (1, 4, 32), (4, 8, 16)])
def test_ragged_kernel_matches_dense_attention(kv_heads, groups, block):
  """The Pallas TPU kernel (interpret mode) == the XLA path, windows wrapping the ring end."""
  rng = np.random.default_rng(kv_heads)
  b, s, dh = 6, 64, 16
  q = jnp.asarray(rng.normal(size=(b, kv_heads * groups, dh)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, kv_heads * dh)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, kv_heads * dh)), jnp.float32)
  lengths = jnp.asarray([1, 5, block, block + 1, 40, s])
  for head in (0, 9, s - 1):
    got = pallas_attn.ragged(q, k, v, head, lengths, kv_heads=kv_heads, block=block,
                             interpret=True)
    mask = decode_attention.window_mask(jnp.int32(head), lengths - 1, 1, s)
    want = decode_attention.dense(q[:, None], k, v, mask, jnp.float32)[:, 0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_model_decode_with_the_kernel_matches_dense():
  cfg = model.ModelConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          mlp_dim=96)
  params = model.decode_params(cfg, model.init_params(cfg, jax.random.key(0)))
  toks = jax.random.randint(jax.random.key(1), (3, 9), 1, 61)
  lengths = jnp.asarray([2, 6, 5])
  left = np.zeros((3, 6), np.int32)
  for i, n in enumerate(np.asarray(lengths)):
    left[i, 6 - n:] = np.asarray(toks[i, :n])
  _, prompt_cache = model.prefill(cfg, params, jnp.asarray(left), lengths)
  rows = jnp.arange(3)
  head = 125   # ring of one 128-slot block: the prompts wrap
  cache = kv_cache.insert(model.init_cache(cfg, 3, 128), prompt_cache, rows, rows,
                          jnp.int32(head))
  for t in range(3):
    window = kv_cache.Window(jnp.int32((head + t) % 128), lengths + t)
    tok = toks[rows, lengths + t][:, None]
    dense, _ = model.decode(cfg, params, tok, cache, window)
    with pltpu.force_tpu_interpret_mode():
      ragged, cache = model.decode(cfg, params, tok, cache, window.replace(impl="ragged"))
    np.testing.assert_allclose(ragged, dense, atol=1e-4, rtol=1e-4)
