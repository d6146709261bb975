"""The LM head over sequence chunks: loss, gradients and scorer log-probs equal those of the
whole fp32 logits, and the compiled train step holds no [B, T, V] fp32 buffer."""
import dataclasses
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from latent_em import lm_head, model, optim, sharding, train_step as ts
from latent_em.sampling import sampler, scoring

CFG = model.ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                        attention="reference")


def _batch(b=3, t=40, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, 17:] = 2
  seg[:, -5:] = 0
  pos = np.concatenate([np.arange(17), np.arange(t - 17)])[None].repeat(b, 0).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_weights": (seg > 0).astype(np.float32)}


def _whole_logits_loss(cfg, params, batch):
  """Reference: full logits from `model.forward`, log-softmax, a gather of the targets."""
  logits = model.forward(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch["loss_weights"])


@pytest.mark.parametrize("chunk,tied", [(8, False), (12, True), (64, False)])
def test_chunked_loss_and_grads_equal_whole_logits(chunk, tied):
  """chunk 8 divides T = 40; 12 pads it to 48; 64 is one chunk."""
  cfg = dataclasses.replace(CFG, logits_chunk=chunk, tie_embeddings=tied)
  params = model.init_params(cfg, jax.random.key(1))
  batch = _batch()
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(
      lambda p: _whole_logits_loss(cfg, p, batch)))(params)
  (loss, weight), grads = jax.jit(jax.value_and_grad(
      lambda p: ts._sum_loss(p, cfg, batch), has_aux=True))(params)
  assert float(weight) == batch["loss_weights"].sum()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5), grads,
               ref_grads)
  nll, _ = jax.jit(lambda p: ts.token_nll(cfg, p, batch))(params)
  assert nll.shape == batch["targets"].shape and nll.dtype == jnp.float32


def test_bf16_chunked_loss_equals_whole_logits():
  cfg = dataclasses.replace(CFG, logits_chunk=16, dtype="bfloat16")
  params = model.init_params(cfg, jax.random.key(2))
  batch = _batch(t=48)
  ref = jax.jit(jax.value_and_grad(lambda p: _whole_logits_loss(cfg, p, batch)))(params)
  out = jax.jit(jax.value_and_grad(lambda p: ts._sum_loss(p, cfg, batch)[0]))(params)
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
  # bf16 matmuls: the chunks' LM-head gradients are rounded to bf16 per chunk and summed in
  # fp32, the whole logits' once; they agree to a few bf16 ulps of each leaf's largest entry.
  def close(g, r):
    assert np.abs(g - r).max() <= 2 ** -6 * np.abs(r).max(), (np.abs(g - r).max(),
                                                               np.abs(r).max())
  jax.tree.map(close, out[1], ref[1])


@pytest.mark.parametrize("temperature,top_k,top_p,banned", [
    (1.0, 0, 1.0, ()), (0.7, 0, 1.0, ()), (1.0, 5, 1.0, ()), (0.8, 0, 0.9, (3, 4)),
    (0.0, 0, 1.0, ())])
def test_scorer_chunked_equals_processed_whole_logits(temperature, top_k, top_p, banned):
  cfg = dataclasses.replace(CFG, logits_chunk=12)
  params = model.init_params(cfg, jax.random.key(3))
  batch = _batch(b=2, t=30)
  fn = scoring.make_token_logprobs(cfg, temperature, top_k, top_p, banned)
  out = fn(params, batch["inputs"], batch["targets"], batch["positions"], batch["segment_ids"])
  logits = model.forward(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"])
  logp = sampler.process_logits(logits, temperature, top_k, top_p, banned)
  ref = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def _f32_sizes(hlo: str, with_dim: int | None = None) -> list[int]:
  """Element counts of the f32 buffers in optimized HLO (those with a dim `with_dim`)."""
  shapes = [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"\bf32\[([0-9,]*)\]", hlo)]
  return [int(np.prod(s)) for s in shapes if with_dim is None or with_dim in s]


def test_compiled_step_has_no_whole_logits_buffer():
  """The optimized HLO of the jitted train step: with chunks of 16 positions no f32 buffer has
  B*T*V elements (the largest is one chunk's logits); without chunks the whole logits exist."""
  b, t, v = 4, 64, 1000
  tx, sched = optim.make_optimizer(optim.OptimConfig(lr=1e-3, warmup_steps=0), 10)
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
  rules = sharding.MeshConfig().rules_list
  batch = {k: jax.ShapeDtypeStruct((b, t), d) for k, d in
           [("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
            ("positions", jnp.int32), ("loss_weights", jnp.float32)]}

  def compile_step(chunk):
    cfg = dataclasses.replace(CFG, vocab_size=v, logits_chunk=chunk)
    abstract, shd = ts.state_shardings(cfg, tx, mesh, rules)
    step = ts.jit_train_step(ts.make_train_step(cfg, tx, sched, 1, mesh, rules), mesh, shd)
    return step.lower(abstract, batch).compile()

  chunked, whole = compile_step(16), compile_step(0)
  assert max(_f32_sizes(whole.as_text())) >= b * t * v
  assert max(_f32_sizes(chunked.as_text())) < b * t * v
  assert max(_f32_sizes(chunked.as_text(), with_dim=v)) <= b * 16 * v
  # The step's temporaries shrink by more than half a whole fp32 logits buffer.
  assert (chunked.memory_analysis().temp_size_in_bytes
          < whole.memory_analysis().temp_size_in_bytes - b * t * v * 4 // 2)


def test_chunked_sharded_step_keeps_the_batch_sharded():
  """FSDP over 8 devices with 3 chunks per sequence and blocked attention: no activation is
  all-gathered to the global batch (the test_sharding check on the chunked step)."""
  from test_sharding import _COMPILE
  code = _COMPILE + textwrap.dedent("""
    import dataclasses
    from latent_em import attention
    attention.BLOCK_Q = 8
    CFG = dataclasses.replace(CFG, logits_chunk=8, attention="blocked")
    for accum in (1, 2):
      eight = compile_train(jax.devices(), (1, -1, 1), accum)
      assert not global_batch_gathers(eight, B // accum), global_batch_gathers(eight, B // accum)
    print("OK")
  """)
  out = run_python(code, devices=8, env={"PYTHONPATH": "tests"})
  assert "OK" in out, out


def test_map_chunks_pads_and_drops_the_tail():
  """Per-token values of a function that sees each chunk's positions."""
  cfg = dataclasses.replace(CFG, vocab_size=7)
  hidden = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3) / 50
  kernel = jnp.ones((3, 7), jnp.float32)
  targets = jnp.arange(20).reshape(2, 10) % 7
  fn = lambda logits, tg: logits[..., 0] * 100 + tg
  whole = lm_head.map_chunks(cfg, fn, hidden, kernel, targets, chunk=0)
  np.testing.assert_allclose(whole, hidden.sum(-1) * 100 + targets, rtol=1e-6)
  for chunk in (3, 4, 5, 10):
    np.testing.assert_allclose(lm_head.map_chunks(cfg, fn, hidden, kernel, targets, chunk), whole,
                               rtol=1e-6)
