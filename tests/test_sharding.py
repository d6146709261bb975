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
