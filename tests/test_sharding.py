"""The logical-axis rules shard activations: checked on the compiled step of 8 fake devices."""
import textwrap

from conftest import run_python

# Shared by the subprocesses: a global batch whose [B, T] prefix no weight shape has, so any
# all-gather of an activation to the global batch shows up in the optimized HLO by its shape.
_COMPILE = textwrap.dedent("""
  import re
  import jax, jax.numpy as jnp
  from latent_em import model, optim, sharding, train_step as ts
  CFG = model.ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          mlp_dim=160, remat="full")
  OPT = optim.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
  B, T = 32, 24
  KEYS = [("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
          ("positions", jnp.int32), ("loss_weights", jnp.float32)]

  def batch_spec(mesh):
    bs = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((B, T), d, sharding=bs) for k, d in KEYS}

  def compile_train(devices, shape, accum, rules=True):
    mcfg = sharding.MeshConfig(shape=shape)
    mesh = sharding.make_mesh(mcfg, devices)
    tx, sched = optim.make_optimizer(OPT, 10)
    abstract, shd = ts.state_shardings(CFG, tx, mesh, mcfg.rules_list)
    fn = ts.make_train_step(CFG, tx, sched, accum, mesh if rules else None, mcfg.rules_list)
    return ts.jit_train_step(fn, mesh, shd).lower(abstract, batch_spec(mesh)).compile()

  def compile_eval(devices, shape):
    mcfg = sharding.MeshConfig(shape=shape)
    mesh = sharding.make_mesh(mcfg, devices)
    tx, _ = optim.make_optimizer(OPT, 10)
    abstract, shd = ts.state_shardings(CFG, tx, mesh, mcfg.rules_list)
    fn = ts.make_eval_step(CFG, mesh, shd.params, mcfg.rules_list)
    return fn.lower(abstract.params, batch_spec(mesh)).compile()

  def global_batch_gathers(compiled, rows):
    shapes = re.findall(r"= \\w+\\[([0-9,]*)\\][^ ]* all-gather\\(", compiled.as_text())
    return [s for s in shapes if s.startswith(f"{rows},{T}")]
""")


def test_train_step_activations_sharded_with_the_batch():
  """FSDP over 8 devices: no activation is all-gathered to the global batch (with or without
  gradient accumulation), and per-device temporaries shrink with the data-parallel size."""
  code = _COMPILE + textwrap.dedent("""
    assert jax.device_count() == 8
    for accum in (1, 2):
      one = compile_train(jax.devices()[:1], (1, 1, 1), accum)
      eight = compile_train(jax.devices(), (1, -1, 1), accum)
      assert not global_batch_gathers(eight, B // accum), global_batch_gathers(eight, B // accum)
      ratio = (eight.memory_analysis().temp_size_in_bytes
               / one.memory_analysis().temp_size_in_bytes)
      # 1/8 for activations, plus the gathered weights of one layer.
      assert ratio < 0.25, (accum, ratio)
      print("accum", accum, "temp ratio", round(ratio, 3))
    # Without the rules the partitioner gathers activations (what the check above rules out).
    free = compile_train(jax.devices(), (1, -1, 1), 1, rules=False)
    assert global_batch_gathers(free, B), "expected global-batch gathers without the rules"
    print("OK")
  """)
  out = run_python(code, devices=8)
  assert "OK" in out, out


def test_eval_step_and_mixed_mesh_keep_activations_sharded():
  """The validation step on FSDP, and the train step on a (2 data, 2 fsdp, 2 tensor) mesh."""
  code = _COMPILE + textwrap.dedent("""
    ev = compile_eval(jax.devices(), (1, -1, 1))
    assert not global_batch_gathers(ev, B), global_batch_gathers(ev, B)
    mixed = compile_train(jax.devices(), (2, 2, 2), 2)
    assert not global_batch_gathers(mixed, B // 2), global_batch_gathers(mixed, B // 2)
    print("OK")
  """)
  out = run_python(code, devices=8)
  assert "OK" in out, out


def test_decode_loop_keeps_rows_and_cache_sharded():
  """The continuous-batching programs on 8 devices (FSDP, and data x tensor): the ring cache and
  every row array stay split along the batch (no all-gather to the global rows), the one-token
  step has no loop but the decode loop itself (cache writes are one in-place slice update per
  buffer), and the per-device cache is 1/8 of the whole."""
  code = _COMPILE + textwrap.dedent("""
    import functools
    import numpy as np
    from latent_em.sampling import sampler as S
    N, RING, G = 32, 48, 16
    dm = S.DecodeModel.for_model(CFG)
    cfg = S.SamplingConfig(max_gen_len=G)

    def compile_programs(devices, shape):
      mcfg = sharding.MeshConfig(shape=shape)
      mesh = sharding.make_mesh(mcfg, devices)
      rules = mcfg.rules_list
      pshd = sharding.logical_to_sharding(dm.param_specs, mesh, rules)
      params = jax.eval_shape(lambda: dm.prepare(model.init_params(CFG, jax.random.key(0))))
      params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            params, pshd)
      init = functools.partial(S.init_state, dm, N, RING, CFG.vocab_size, G)
      shd = S.state_shardings(dm, jax.eval_shape(init), mesh, rules)
      state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           jax.eval_shape(init), shd)
      scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
      decode = jax.jit(sharding.with_logical_rules(
          functools.partial(S.decode, dm, cfg, (3,)), mesh, rules), donate_argnums=(1,),
          out_shardings=shd)
      refill = jax.jit(sharding.with_logical_rules(functools.partial(S.refill, dm), mesh, rules),
                       donate_argnums=(1,), out_shardings=shd)
      rep = lambda shp, dt=jnp.int32: jax.ShapeDtypeStruct(shp, dt,
                                                           sharding=sharding.replicated(mesh))
      C, P, M = 8, 16, 16
      refill_args = (rep((C, P)), rep((C,)), rep((C, 2), jnp.uint32), rep((M,)), rep((M,)),
                     rep((M,)), rep((M,)))
      return (decode.lower(params, state, scalar, scalar).compile(),
              refill.lower(params, state, *refill_args).compile())

    def row_gathers(compiled):
      shapes = re.findall(r"= \\w+\\[([0-9,]*)\\][^ ]* all-gather\\(", compiled.as_text())
      return [s for s in shapes if s.split(",")[0] == str(N)]

    one_decode, _ = compile_programs(jax.devices()[:1], (1, 1, 1))
    for shape in ((1, -1, 1), (4, 1, 2)):
      decode, refill = compile_programs(jax.devices(), shape)
      assert not row_gathers(decode), (shape, row_gathers(decode))
      assert not row_gathers(refill), (shape, row_gathers(refill))
      text = decode.as_text()
      kv = CFG.n_kv_heads * CFG.hd
      local = N // 8 if shape[2] == 1 else N // 4
      width = kv if shape[2] == 1 else kv // 2
      cache = f"[{local},{RING},{width}]"
      assert cache in text, (shape, "per-device cache shape not found")
      assert f"[{N},{RING},{kv}]" not in text, shape
      # The only loop that carries the cache is the decode loop (the others on CPU are the
      # PRNG's threefry rounds); its buffers are written by in-place slice updates.
      loops = [l for l in text.splitlines() if " while(" in l]
      assert sum(cache in l.split(" while(")[0] for l in loops) == 1, loops
      updates = re.findall(r"= \\w+\\[([0-9,]*)\\][^ ]* dynamic-update-slice\\(", text)
      assert updates.count(cache[1:-1]) == 2 * CFG.n_layers, updates
    print("OK")
  """)
  out = run_python(code, devices=8)
  assert "OK" in out, out


def test_ragged_kernel_runs_per_device_under_the_rules():
  """With the rules in effect the Pallas decode kernel (TPU interpret mode) runs on each
  device's own rows and kv heads (data x tensor mesh) and matches the single-device XLA path."""
  code = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental.pallas import tpu as pltpu
    from latent_em import kv_cache, model, sharding
    cfg = model.ModelConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            mlp_dim=96)
    params = model.decode_params(cfg, model.init_params(cfg, jax.random.key(0)))
    B, S = 8, 128
    rng = np.random.default_rng(0)
    cache = tuple({k: jnp.asarray(rng.normal(size=(B, S, 2 * cfg.hd)), jnp.float32)
                   for k in ("k", "v")} for _ in range(cfg.n_layers))
    tok = jnp.asarray(rng.integers(1, 61, size=(B, 1)), jnp.int32)
    ctx = jnp.asarray(rng.integers(0, S - 1, size=(B,)), jnp.int32)

    def step(p, t, c, x, impl):
      return model.decode(cfg, p, t, c, kv_cache.Window(jnp.int32(100), x, impl))[0]

    want = step(params, tok, cache, ctx, "dense")
    mcfg = sharding.MeshConfig(shape=(4, 1, 2))
    mesh = sharding.make_mesh(mcfg, jax.devices())
    fn = jax.jit(sharding.with_logical_rules(
        lambda p, t, c, x: step(p, t, c, x, "ragged"), mesh, mcfg.rules_list))
    cache = jax.device_put(cache, sharding.logical_to_sharding(
        model.cache_partition_specs(cfg), mesh, mcfg.rules_list))
    args = (params, jax.device_put(tok, sharding.batch_sharding(mesh)), cache,
            jax.device_put(ctx, sharding.batch_sharding(mesh, 1)))
    with pltpu.force_tpu_interpret_mode():
      got = fn(*args)
    np.testing.assert_allclose(got, want, atol=1e-5)
    print("OK")
  """)
  out = run_python(code, devices=8)
  assert "OK" in out, out
