"""The fit check (latent_em/tools/preflight.py) and the compiled-program statistics behind it.

The TPU tests compile for a v5e:2x2 topology through libtpu, without TPU hardware; they skip
where libtpu is not installed (it comes with the test extra on Linux x86-64 only).
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from conftest import REPO, run_python
from latent_em import config_defaults, config_lib, model
from latent_em.tools import compiled_stats, preflight

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]', Linux x86-64 only), so TPU "
           "topologies cannot be compiled for")
GiB = 1024 ** 3


def _preflight(*args: str, devices: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", "")})
  return subprocess.run([sys.executable, "-m", "latent_em.tools.preflight", *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _json_line(proc: subprocess.CompletedProcess) -> dict:
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(lines[0])


# ----------------------------------------------------------------------------- topologies


@pytest.mark.parametrize("spec, expected", [
    ("v5e:2x4", "v5e:2x4"), ("v4:2x2x1", "v4:2x2x1"), ("v5litepod-8", "v5e:2x4"),
    ("v5litepod-16", "v5e:4x4"), ("v5e-4", "v5e:2x2"), ("v4-8", "v4:2x2x1"),
    ("v4-32", "v4:2x2x4"), ("v5p-8", "v5p:2x2x1"), ("v6e-8", "v6e:2x4")])
def test_accelerator_types_map_to_topologies(spec, expected):
  """v4 / v5p accelerator types count TensorCores (2 per chip), v5e / v6e count chips."""
  assert preflight.topology_name(spec)[0] == expected


@pytest.mark.parametrize("spec", ["v9x:2x2", "v5e", "v5litepod-12", "v4-7", "h100"])
def test_unknown_topology_is_one_clear_line(spec):
  with pytest.raises(preflight.PreflightError, match="--topology="):
    preflight.topology_name(spec)


def test_bad_topology_on_the_command_line():
  proc = _preflight("--config=configs/tiny.py", "--topology=v9x:2x2", "--json")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip().splitlines()[-1] == (
      f"preflight: --topology='v9x:2x2' is not a TPU topology; use {preflight.EXAMPLES}")


# ----------------------------------------------------------------------------- model config


def test_vocab_sizing_without_a_tokenizer(tmp_path):
  config = config_defaults.base()
  config.model.vocab_size = 32004
  cfg, source = preflight.model_config(config)
  assert (cfg.vocab_size, source) == (32004, "config.model.vocab_size")
  # The job trains its own tokenizer of config.tokenizer.vocab_size pieces (rounded up to 128).
  config.model.vocab_size = 0
  config.tokenizer.vocab_size = 700
  cfg, source = preflight.model_config(config)
  assert cfg.vocab_size == 768 and "config.tokenizer.vocab_size" in source
  # A tokenizer file that is not here cannot size it: say so, and how to give the size.
  config.tokenizer.path = str(tmp_path / "missing.model")
  with pytest.raises(config_lib.ConfigError, match="--config.model.vocab_size=N"):
    preflight.model_config(config)


# ----------------------------------------------------------------------------- collectives


def test_collectives_are_counted_per_call_with_loops_at_their_trip_count():
  """Known programs on 8 fake devices: collectives inside (nested) loops count once per
  iteration; and a scanned train step has the collectives of its unrolled twin."""
  code = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P, NamedSharding
    from latent_em.tools import compiled_stats as cs
    mesh = Mesh(np.array(jax.devices()), ("x",))

    def body(x):                                  # per device: x f32[256]
      def inner(i, y):
        return y + jax.lax.psum(y, "x")           # all-reduce f32[256]: 1 KiB
      def outer(i, y):
        y = jax.lax.fori_loop(0, 3, inner, y)
        return y * jax.lax.all_gather(y, "x", tiled=True)[:256]   # all-gather f32[2048]
      return jax.lax.fori_loop(0, 5, outer, x)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.ShapeDtypeStruct((2048,), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    col = cs.collectives(f.lower(x).compile().as_text())
    assert col.unknown_loops == 0, col
    assert col.count == {"all-reduce": 15, "all-gather": 5}, col
    assert col.bytes == {"all-reduce": 15 * 1024, "all-gather": 5 * 8192}, col

    from latent_em import model, optim, sharding, train_step as ts
    OPT = optim.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    B, T = 16, 32
    def step_collectives(scan):
      cfg = model.ModelConfig(vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                              mlp_dim=128, remat="full", scan_layers=scan)
      mcfg = sharding.MeshConfig(shape=(1, -1, 1))
      mesh = sharding.make_mesh(mcfg, jax.devices())
      tx, sched = optim.make_optimizer(OPT, 10)
      abstract, shd = ts.state_shardings(cfg, tx, mesh, mcfg.rules_list)
      bs = sharding.batch_sharding(mesh)
      batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_weights" else jnp.int32,
                                       sharding=bs)
               for k in ("inputs", "targets", "segment_ids", "positions", "loss_weights")}
      fn = ts.jit_train_step(ts.make_train_step(cfg, tx, sched, 1, mesh, mcfg.rules_list),
                             mesh, shd)
      return cs.collectives(fn.lower(abstract, batch).compile().as_text())
    scanned, unrolled = step_collectives(True), step_collectives(False)
    assert scanned.unknown_loops == 0
    # FSDP: every layer's weights are gathered (forward, remat, backward); gradients reduced.
    assert scanned.count["all-gather"] == unrolled.count["all-gather"] > 3 * 3, (scanned, unrolled)
    assert scanned.bytes["all-gather"] == unrolled.bytes["all-gather"]
    assert abs(scanned.bytes["all-reduce"] / unrolled.bytes["all-reduce"] - 1) < 1e-3
    print("OK")
  """)
  assert "OK" in run_python(code, devices=8)


_TPU_STYLE_HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[]{:T(128)} parameter(0)
  %b = f32[]{:T(128)} parameter(1)
  ROOT %sum = f32[]{:T(128)} add(%a, %b)
}

%cond (p: (u32[], f32[2])) -> pred[] {
  %p = (u32[]{:T(128)}, f32[2]{0}) parameter(0)
  %n = u32[]{:T(128)} constant(4)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%piece.1 (x: f32[2]) -> f32[8] {
  %x = f32[2]{0} parameter(0)
  ROOT %all-gather.1 = f32[8]{0:T(256)} all-gather(%x), channel_id=7, dimensions={0}
}

%piece.2 (x: f32[2]) -> f32[8] {
  %x = f32[2]{0} parameter(0)
  ROOT %all-gather.2 = f32[8]{0:T(256)S(1)} all-gather(%x), channel_id=7, dimensions={0}
}

%body (p: (u32[], f32[2])) -> (u32[], f32[2]) {
  %p = (u32[]{:T(128)}, f32[2]{0}) parameter(0)
  %x = f32[2]{0} get-tuple-element(%p), index=1
  %f1 = f32[8]{0} fusion(%x), kind=kCustom, calls=%piece.1
  %f2 = f32[8]{0} fusion(%x), kind=kCustom, calls=%piece.2
  %ar = bf16[16]{0} all-reduce-start(%f2), channel_id=8, to_apply=%add
  ROOT %t = (u32[]{:T(128)}, f32[2]{0}) tuple(%i, %x)
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  %t = (u32[]{:T(128)}, f32[2]{0}) tuple(%z, %x)
  %w = (u32[]{:T(128)}, f32[2]{0}) while(%t), condition=%cond, body=%body
  %cp = (f32[4]{0}, f32[4]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%y), channel_id=9
  ROOT %r = f32[2]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_in_tpu_style_hlo():
  """What TPU's optimized HLO adds: loops with u32 counters (XLA's windowed matmuls), one
  collective split into pieces that keep its channel id, and -start ops whose result is a tuple
  (operand, result, context)."""
  col = compiled_stats.collectives(_TPU_STYLE_HLO)
  assert col.unknown_loops == 0
  assert col.count == {"all-gather": 4, "all-reduce": 4, "collective-permute": 1}
  assert col.bytes == {"all-gather": 4 * 32, "all-reduce": 4 * 32, "collective-permute": 16}


# ----------------------------------------------------------------------------- FLOPs


def test_train_flops_extrapolate_layers_and_count_the_remat_recompute():
  """On the CPU: the 1- and 2-layer extrapolation equals a 3-layer compile, and remat full
  costs what the analytic recompute says over remat dots (their difference, the projections
  recomputed, does not depend on how attention is computed)."""
  config = config_defaults.base()
  config.model.update(dict(vocab_size=256, dim=128, n_layers=3, n_heads=4, n_kv_heads=2,
                           mlp_dim=512))
  config.data.seq_len = 64
  base, _ = preflight.model_config(config)
  device = jax.devices()[0]
  out = {}
  for remat in ("dots", "full"):
    cfg = dataclasses.replace(base, remat=remat)
    out[remat] = preflight.train_flops(config, cfg, device)
    one = config.copy_and_resolve_references()
    one.data.batch_size = 1
    lowered, _ = preflight.train_program(one, dataclasses.replace(cfg, scan_layers=False),
                                         [device])
    direct = compiled_stats.flops(lowered.compile()) / config.data.seq_len
    assert out[remat]["compiled_per_token"] == pytest.approx(direct, rel=1e-4)
    assert out[remat]["analytic_per_token"] == (
        model.train_flops_per_token(cfg, 64) + preflight.remat_recompute_flops_per_token(cfg, 64))
  compiled = out["full"]["compiled_per_token"] - out["dots"]["compiled_per_token"]
  analytic = out["full"]["analytic_per_token"] - out["dots"]["analytic_per_token"]
  assert compiled == pytest.approx(analytic, rel=0.03)


# ----------------------------------------------------------------------------- the command


def test_local_compile_report_on_eight_cpu_devices():
  """--topology=local: the train step for this machine's devices (8 fake CPUs here), as GPU
  users run it."""
  proc = _preflight("--config=configs/tiny.py", "--topology=local", "--json", "--noflops",
                    devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = _json_line(proc)
  assert r["fits"] and r["topology"] == "local" and r["devices"] == 8
  assert r["config"] == "configs/tiny.py" and r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  step = r["programs"]["train_step"]
  # Data parallelism: every device holds the whole fp32 state (params + 2 Adam moments) and
  # all-reduces the gradients.
  n = model.param_count(preflight.model_config(_tiny_config())[0])
  assert step["memory"]["arguments"] >= 12 * n
  assert r["peak_bytes_per_device"] == step["peak_bytes"] >= step["memory"]["arguments"]
  assert step["collectives"]["bytes"]["all-reduce"] >= 4 * n


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@needs_libtpu
def test_paper_config_at_toy_size_on_v5e_2x2(tmp_path):
  """bolt_tinyllama.py:smoke (job=em): the train step and the E-step's sampler and scorer,
  compiled for 4 v5e chips; the JSON line and the HLO files."""
  hlo = tmp_path / "step.hlo"
  proc = _preflight("--config=configs/bolt_tinyllama.py:smoke", "--topology=v5e:2x2", "--json",
                    "--config.model.vocab_size=512", "--config.em.teacher_records=('t',)",
                    "--config.em.bootstrap_files=('b',)", f"--hlo_out={hlo}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = _json_line(proc)
  assert r["fits"] is True and 0 < r["headroom"] < 1
  assert r["topology"] == "v5e:2x2" and r["devices"] == 4 and r["device_kind"] == "TPU v5 lite"
  assert r["hbm_bytes_per_device"] == int(15.75 * GiB)
  assert r["config"] == "configs/bolt_tinyllama.py:smoke" and r["job"] == "em"
  assert set(r["programs"]) == {"train_step", "estep_refill", "estep_decode", "estep_scorer"}
  assert r["peak_bytes_per_device"] == max(p["peak_bytes"] for p in r["programs"].values())
  # FSDP over 4 devices: at least a quarter of the fp32 state (params + 2 Adam moments) each,
  # and less than a whole copy (TPU layouts pad this model's 16-wide heads to 128 lanes).
  n = model.param_count(model.ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4,
                                          n_kv_heads=2, mlp_dim=128))
  step = r["programs"]["train_step"]
  assert 12 * n / 4 <= step["memory"]["arguments"] < 12 * n
  assert step["collectives"]["count"]["all-gather"] > 0
  # The splash kernel (opaque to XLA's cost model) at 256 tokens is one 256-tile per head: the
  # whole square, 2 (forward) + 5 (fused backward) matmuls of 2 * 256 * 256 * 16 FLOPs.
  f = r["flops"]
  assert f["kernel_per_token"] == 2 * 4 * 7 * 2 * 256 * 256 * 16 / 256
  attention = 3 * 2 * 2 * 2 * 4 * 16 * 256 / 2          # analytic: causal half, fwd + bwd
  assert 1.0 < (f["compiled_per_token"] - f["kernel_per_token"]) / (
      f["analytic_per_token"] - attention) < 1.1, f
  for name in r["programs"]:
    assert "HloModule" in (tmp_path / f"step.{name}.hlo").read_text()


@needs_libtpu
def test_a_config_that_cannot_fit_reports_it():
  """Two layers of width 8192 (MLP 32768): 1.9 B parameters, whose fp32 state (params and Adam
  moments, 12 bytes each, split over 4 chips) and the step's temporaries need more than a v5e
  chip's HBM."""
  proc = _preflight("--config=configs/tiny.py", "--topology=v5e:2x2", "--json", "--noflops",
                    "--config.model.vocab_size=512", "--config.model.dim=8192",
                    "--config.model.mlp_dim=32768", "--config.model.n_layers=2",
                    "--config.model.n_heads=64", "--config.model.n_kv_heads=8")
  assert proc.returncode == 1, proc.stderr[-3000:]
  r = _json_line(proc)
  assert r["fits"] is False and r["peak_bytes_per_device"] > r["hbm_bytes_per_device"]
  n = model.param_count(model.ModelConfig(vocab_size=512, dim=8192, n_layers=2, n_heads=64,
                                          n_kv_heads=8, mlp_dim=32768))
  assert r["programs"]["train_step"]["memory"]["arguments"] >= 12 * n / 4


@needs_libtpu
def test_topology_that_libtpu_rejects():
  proc = _preflight("--config=configs/tiny.py", "--topology=v5e:3x5", "--json")
  assert proc.returncode == 2 and proc.stdout == ""
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("preflight: --topology=v5e:3x5: libtpu cannot describe v5e:3x5"), last
