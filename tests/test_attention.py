"""Attention implementations against the reference math (`attention.masked_attention`):
outputs, input gradients, and loss + gradients through the whole model, with packed segments
and padding. Splash runs in Pallas TPU interpret mode on CPU."""
import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python, tpu_interpret
from latent_em import attention, config_lib, model, sharding, train_step as ts

CFG = model.ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                        attention="reference")


def _segments(b, t, cut, pad):
  """Packed documents (row 0: two, split at `cut`; later rows: three) and `pad` padding
  positions (segment 0) at the end of each row -> (segment ids, positions) [B, T]."""
  seg = np.ones((b, t), np.int32)
  seg[:, cut:] = 2
  seg[1:, cut // 2:] = 2  # rows after the first: three documents
  seg[1:, cut:] = 3
  seg[:, t - pad:] = 0
  pos = np.zeros((b, t), np.int32)
  for r in range(b):
    for s in np.unique(seg[r]):
      idx = np.flatnonzero(seg[r] == s)
      pos[r, idx] = np.arange(len(idx))
  return seg, pos


def _qkv(b, t, h, k, dh, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, dh), dtype)
  kk = jax.random.normal(ks[1], (b, t, k, dh), dtype)
  v = jax.random.normal(ks[2], (b, t, k, dh), dtype)
  w = jax.random.normal(ks[3], (b, t, h, dh), jnp.float32)
  return q, kk, v, w


def _value_and_grads(fn, q, k, v, w):
  """Output and d/d(q, k, v) of sum(out * w)."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _compare(impl_fn, seg, q, k, v, w, dtype, atol):
  ref = lambda q, k, v: attention.attend(q, k, v, seg, dtype, "reference")
  out, grads = jax.jit(lambda q, k, v: _value_and_grads(impl_fn, q, k, v, w))(q, k, v)
  ref_out, ref_grads = jax.jit(lambda q, k, v: _value_and_grads(ref, q, k, v, w))(q, k, v)
  assert out.dtype == ref_out.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             atol=atol, rtol=atol)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               atol=atol * 10, rtol=atol * 10)


@pytest.mark.parametrize("impl", ["xla", "blocked"])
@pytest.mark.parametrize("segmented", [True, False])
def test_implementation_matches_reference(impl, segmented):
  b, t = 3, 4 * attention.BLOCK_Q
  seg = jnp.asarray(_segments(b, t, cut=t // 2 + 5, pad=9)[0]) if segmented else None
  q, k, v, w = _qkv(b, t, 4, 2, 16)
  _compare(lambda q, k, v: attention.attend(q, k, v, seg, jnp.float32, impl), seg, q, k, v, w,
           jnp.float32, 2e-5)


@pytest.mark.parametrize("block_q", [16, 48])
def test_blocked_block_sizes(block_q):
  """Blocks that split a segment, and a T that is not a multiple of the block (-> reference)."""
  b, t = 2, 96
  seg = jnp.asarray(_segments(b, t, cut=37, pad=5)[0])
  q, k, v, w = _qkv(b, t, 6, 3, 8, seed=1)
  _compare(lambda q, k, v: attention._blocked(q, k, v, seg, jnp.float32, block_q), seg, q, k, v,
           w, jnp.float32, 2e-5)


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_bf16_matches_reference(impl):
  b, t = 2, 2 * attention.BLOCK_Q
  seg = jnp.asarray(_segments(b, t, cut=50, pad=3)[0])
  q, k, v, w = _qkv(b, t, 4, 1, 32, jnp.bfloat16, seed=2)
  _compare(lambda q, k, v: attention.attend(q, k, v, seg, jnp.bfloat16, impl), seg, q, k, v, w,
           jnp.bfloat16, 2e-2)


@pytest.mark.parametrize("t", [384, 200])
def test_splash_matches_reference(t):
  """The Pallas kernel (interpreted): three 128-blocks with causal block skipping, and a length
  padded up to 256."""
  b = 2
  seg = jnp.asarray(_segments(b, t, cut=150, pad=11)[0])
  q, k, v, w = _qkv(b, t, 4, 2, 64, seed=3)
  with tpu_interpret():
    _compare(lambda q, k, v: attention.attend(q, k, v, seg, jnp.float32, "splash"), seg, q, k, v,
             w, jnp.float32, 2e-5)


def _batch(b, t, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  seg, pos = _segments(b, t, cut=t // 2 + 3, pad=7)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_weights": (seg > 0).astype(np.float32)}


def _loss_and_grads(cfg, params, batch):
  fn = jax.jit(jax.value_and_grad(lambda p: ts._sum_loss(p, cfg, batch)[0]))
  return fn(params)


@pytest.mark.parametrize("impl,t", [("xla", 100), ("blocked", 2 * attention.BLOCK_Q),
                                    ("splash", 100)])
def test_model_loss_and_grads_match_reference(impl, t):
  """Loss and every parameter gradient of the whole model (2 layers, scanned, remat), packed
  segments and padding, against the reference attention."""
  ref_cfg = dataclasses.replace(CFG, remat="full")
  cfg = dataclasses.replace(ref_cfg, attention=impl)
  params = model.init_params(CFG, jax.random.key(0))
  batch = _batch(2, t)
  ref_loss, ref_grads = _loss_and_grads(ref_cfg, params, batch)
  with tpu_interpret():
    loss, grads = _loss_and_grads(cfg, params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5), grads,
               ref_grads)


def test_splash_sharded_train_step_matches_single_device():
  """The splash kernel inside shard_map on a (2 data, 2 fsdp, 2 tensor) mesh of 8 devices, in
  the scanned, rematerialised train step with gradient accumulation == the reference attention
  on one device (2 steps)."""
  code = textwrap.dedent("""
    import dataclasses, jax, numpy as np
    from conftest import tpu_interpret
    from latent_em import model, optim, sharding, train_step as ts
    from test_train_step import CFG, OPT, make_batch
    def run(devices, shape, impl):
      cfg = dataclasses.replace(CFG, attention=impl, remat="full")
      mcfg = sharding.MeshConfig(shape=shape)
      mesh = sharding.make_mesh(mcfg, devices)
      tx, sched = optim.make_optimizer(OPT, 10)
      state = ts.create_sharded_state(cfg, tx, mesh, mcfg.rules_list, jax.random.key(0))
      _, shd = ts.state_shardings(cfg, tx, mesh, mcfg.rules_list)
      step = ts.jit_train_step(ts.make_train_step(cfg, tx, sched, 2, mesh, mcfg.rules_list),
                               mesh, shd)
      rng = np.random.default_rng(0)
      losses = []
      for _ in range(2):
        state, m = step(state, sharding.host_to_global(make_batch(rng), mesh))
        losses.append(float(m["loss"]))
      return losses, jax.device_get(state.params)
    l1, p1 = run(jax.devices()[:1], (1, 1, 1), "reference")
    with tpu_interpret():
      l8, p8 = run(jax.devices(), (2, 2, 2), "splash")
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in
                            zip(jax.tree.leaves(p1), jax.tree.leaves(p8))])
    assert diffs.max() < 2e-3 and diffs.mean() < 1e-5, (diffs.max(), diffs.mean())
    print("OK", l1, l8)
  """)
  out = run_python(code, devices=8, env={"PYTHONPATH": "tests"})
  assert "OK" in out


class _Device:
  def __init__(self, platform):
    self.platform = platform


@pytest.mark.parametrize("platform,dtype,expected", [
    ("tpu", "bfloat16", "splash"), ("TPU", "float32", "splash"), ("gpu", "bfloat16", "cudnn"),
    ("cuda", "float16", "cudnn"), ("gpu", "float32", "xla"), ("cpu", "float32", "blocked")])
def test_auto_resolves_by_the_devices_platform(platform, dtype, expected):
  cfg = dataclasses.replace(CFG, attention="auto", dtype=dtype)
  assert model.resolve_attention(cfg, [_Device(platform)] * 2).attention == expected
  assert model.resolve_attention(cfg, _Device(platform)).attention == expected
  fixed = dataclasses.replace(cfg, attention="xla")
  assert model.resolve_attention(fixed, [_Device(platform)]).attention == "xla"


def test_auto_resolves_for_a_mesh():
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
  assert attention.platform_of(mesh) == "cpu"
  assert model.resolve_attention(dataclasses.replace(CFG, attention="auto"),
                                 mesh).attention == "blocked"


def test_unknown_implementation_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.attention.*'flash'"):
    dataclasses.replace(CFG, attention="flash")
