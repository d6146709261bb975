r"""Fit check before launch: compiles a job's steps for a TPU slice (no hardware needed) or for
this machine's devices, and reports what they need per device.

  python -m latent_em.tools.preflight --config=configs/bolt_tinyllama.py:warmstart \
      --topology=v5e:2x4 [--config.train.grad_accum=2 ...] [--json] [--hlo_out=FILE]

--topology is a TPU topology (v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, ...), a Cloud TPU
accelerator type (v5litepod-8, v4-8, v5p-8, v6e-8, ...), or `local` (the devices of this machine:
GPU users get the same report from a local compile). TPU topologies compile through libtpu
(`pip install -e '.[tpu]'`, Linux x86-64), without TPU hardware.

What is compiled, at the configured shapes, exactly as the job builds it:
  job=train     the train step (`train.build`)
  job=estep     the E-step's sampler (prefill + decode loop) and joint scorer, on one host
  job=em        all three
For each program: per-device memory (arguments, outputs not written in place, temporaries and the
program's code) against the device's memory, and the collectives per call (count and bytes by
kind, from the optimized HLO, loops at their trip counts). For the train step also the compiled
FLOPs per token against the analytic count (`model.train_flops_per_token` plus the recompute of
the configured remat). XLA's cost model counts a loop body once, so the FLOPs come from two
compiles without loops (layers unrolled, `scan_layers=False`, 1 and 2 layers, one sequence on one
device): the difference is one layer's FLOPs, extrapolated linearly to the configured depth.

--json prints one line: fits, peak_bytes_per_device, hbm_bytes_per_device, headroom, topology,
config, ... Exit status: 0 fits, 1 does not fit, 2 the check could not run (bad topology, a config
that cannot be compiled, no libtpu), 3 an unexpected error (with its traceback).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from latent_em import attention, config_lib, model as model_lib, runtime, sharding
from latent_em.tools import compiled_stats

GiB = 1024 ** 3

# Memory per device (one chip; v4 and v5p run one device per chip, "megacore"): what libtpu's
# compiler budgets, as its out-of-memory message states it ("exceeds available HBM (15.75G)"):
# a little less than the chip's HBM (v5e 16 GiB, v4 and v6e 32), which the runtime shares.
HBM_BYTES = {"TPU v4": int(30.75 * GiB), "TPU v5 lite": int(15.75 * GiB),
             "TPU v5e": int(15.75 * GiB), "TPU v5": int(95.74 * GiB),
             "TPU v5p": int(95.74 * GiB), "TPU v6 lite": int(31.25 * GiB),
             "TPU v6e": int(31.25 * GiB)}
# libtpu refuses to compile a program whose temporaries exceed the budget, and says by how much.
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 * GiB}

# Generations by the names of topologies (v5e:2x4) and accelerator types (v5litepod-8).
_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, one device; accelerator types count cores
# Chips -> shape of the Cloud TPU slice of that accelerator type.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
# Largest single-host slices of the 2D generations (bigger slices have 4 chips per host).
_SINGLE_HOST_2D = {"1x1": (1, 1, 1), "2x2": (2, 2, 1), "2x4": (2, 4, 1)}
EXAMPLES = ("v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, an accelerator type such as v5litepod-8, "
            "or local")


class PreflightError(Exception):
  """The check cannot run; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices to compile for and the memory of each."""
  name: str
  devices: list
  hbm_bytes: int
  hbm_source: str

  @property
  def device_kind(self) -> str:
    return self.devices[0].device_kind

  def host_devices(self) -> list:
    """The devices of the first host (jobs that replicate the model per host use these)."""
    first = self.devices[0].process_index
    return [d for d in self.devices if d.process_index == first]


def topology_name(spec: str) -> tuple[str, str]:
  """(TPU topology name, generation) of a topology name or an accelerator type."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", spec)
  if m:
    return spec, m.group(1)
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", spec)
  if not m:
    raise PreflightError(f"--topology={spec!r} is not a TPU topology; use {EXAMPLES}")
  gen, n = _GENERATIONS[m.group(1)], int(m.group(2))
  chips = n // 2 if gen in _MEGACORE else n
  shape = (_SHAPES_3D if gen in _MEGACORE else _SHAPES_2D).get(chips)
  if shape is None or (gen in _MEGACORE and n % 2):
    raise PreflightError(f"--topology={spec!r}: no known slice shape for {n} "
                         f"{'TensorCores' if gen in _MEGACORE else 'chips'}; give the topology "
                         f"itself, e.g. {gen}:{'2x2x2' if gen in _MEGACORE else '4x4'}")
  return f"{gen}:{shape}", gen


def hbm_of(device_kind: str) -> int | None:
  if device_kind in HBM_BYTES:
    return HBM_BYTES[device_kind]
  for kind in sorted(HBM_BYTES, key=len, reverse=True):
    if device_kind.startswith(kind):
      return HBM_BYTES[kind]
  return None


def get_target(spec: str, hbm_gib: float = 0.0) -> Target:
  """The compile target of --topology (see the module docstring)."""
  if spec == "local":
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
      hbm, source = int(stats["bytes_limit"]), "memory_stats()['bytes_limit']"
    elif devices[0].platform == "cpu":
      hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
      source = f"host RAM / {len(devices)} devices"
    else:
      hbm, source = hbm_of(devices[0].device_kind) or 0, "device kind"
    return _with_override(Target("local", devices, hbm, source), hbm_gib)
  name, gen = topology_name(spec)
  if importlib.util.find_spec("libtpu") is None:
    raise PreflightError(f"--topology={spec} compiles through libtpu, which is not installed: "
                         "pip install -e '.[tpu]' (Linux x86-64); or use --topology=local")
  # Compiling for a topology opens no TPU chip: libtpu's one-process lock would only make
  # concurrent checks (or a check beside a running job) fail.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  shape = name.split(":")[1]
  options: dict[str, Any] = {}
  if gen in _MEGACORE:
    options["chip_config_name"] = "megacore"
  elif shape in _SINGLE_HOST_2D:
    options["chips_per_host_bounds"] = _SINGLE_HOST_2D[shape]
  try:
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                                **options).devices)
  except Exception as e:  # libtpu raises JaxRuntimeError with a multi-line status
    raise PreflightError(f"--topology={spec}: libtpu cannot describe {name} "
                         f"({str(e).splitlines()[0][:200]}); use {EXAMPLES}") from None
  hbm = hbm_of(devices[0].device_kind)
  if hbm is None and not hbm_gib:
    raise PreflightError(f"--topology={spec}: unknown memory per device for "
                         f"{devices[0].device_kind!r}; give --hbm_gib")
  return _with_override(Target(name, devices, hbm or 0, "device kind table"), hbm_gib)


def _with_override(target: Target, hbm_gib: float) -> Target:
  if hbm_gib > 0:
    return dataclasses.replace(target, hbm_bytes=int(hbm_gib * GiB), hbm_source="--hbm_gib")
  return target


# ----------------------------------------------------------------------------- model config


def model_config(config, workdir: str = "") -> tuple[model_lib.ModelConfig, str]:
  """(model config, where its vocabulary size came from), without the job's tokenizer when the
  config gives the size. `vocab_size = 0` (sized from the tokenizer) reads the tokenizer file if
  it is here, else uses config.tokenizer.vocab_size when the job trains its own tokenizer."""
  if config.model.get("vocab_size", 0) > 0:
    return runtime.model_config(config), "config.model.vocab_size"
  tok_cfg = runtime.section(config, "tokenizer")
  candidates = [tok_cfg.path] if tok_cfg.path else []
  if workdir:
    candidates.append(os.path.join(workdir, "tokenizer.model"))
  init_from = runtime.section(config, "estep").init_from if config.get("job") == "estep" else ""
  if init_from and not tok_cfg.path:
    candidates += [os.path.join(init_from, "tokenizer.model"),
                   os.path.join(os.path.dirname(os.path.abspath(init_from)), "tokenizer.model")]
  for path in candidates:
    if os.path.exists(path):
      from latent_em import tokenizer as tok_lib
      return runtime.model_config(config, tok_lib.load(path)), path
  if not tok_cfg.path and config.get("job", "train") in ("train", "em"):
    # The job trains a tokenizer of exactly config.tokenizer.vocab_size pieces.
    sized = config.copy_and_resolve_references()
    sized.model.vocab_size = -(-tok_cfg.vocab_size // 128) * 128
    return runtime.model_config(sized), "config.tokenizer.vocab_size (the tokenizer the job trains)"
  where = tok_cfg.path or "the tokenizer beside config.estep.init_from"
  raise config_lib.ConfigError(
      f"config.model.vocab_size=0 sizes the model from the tokenizer, and {where} is not here; "
      "give --config.model.vocab_size=N (the tokenizer's pieces rounded up to 128)")


# ----------------------------------------------------------------------------- programs


def train_program(config, model_cfg: model_lib.ModelConfig, devices: list
                  ) -> tuple[Any, tuple]:
  """The job's train step lowered (not compiled) for `devices`, and its abstract arguments."""
  from latent_em import train
  setup = train.build(config, model_cfg, devices)
  return setup.lower(), (setup.abstract_state, setup.batch_spec)


def estep_programs(config, model_cfg: model_lib.ModelConfig, devices: list
                   ) -> dict[str, tuple[Any, tuple]]:
  """The E-step's programs (lowered, abstract arguments) for one host's `devices`, built as
  `estep.core.Engine` builds them (`core.make_sampler`): the continuous sampler's refill (at
  the largest prompt bucket) and decode loop on batch_chunks x K rows over the compute-dtype
  decode params, and the joint scorer (score_rows packed rows of max_seq_len tokens) over the
  same params. Token ids only change constants, so placeholders stand in for the stop and
  banned ids."""
  from latent_em.estep import core
  from latent_em.sampling import scoring
  cfg = runtime.section(config, "estep")
  mesh_cfg = runtime.section(config, "mesh")
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = mesh_cfg.rules_list
  sampling = dataclasses.replace(cfg.sampling, banned_ids=(0,))
  sampler = core.make_sampler(cfg, model_cfg, sampling, (1, 2), mesh, rules,
                              platform=attention.platform_of(mesh))
  dm = sampler.model
  shapes = jax.eval_shape(lambda: dm.prepare(model_lib.init_params(model_cfg,
                                                                   jax.random.key(0))))
  shardings = sharding.logical_to_sharding(dm.param_specs, mesh, rules)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)
  programs = {f"estep_{name}": v for name, v in sampler.lower(params).items()}
  dp = sharding.data_parallel_size(mesh)
  tokens = jax.ShapeDtypeStruct((max(cfg.score_rows, dp), cfg.max_seq_len), jnp.int32,
                                sharding=sharding.batch_sharding(mesh, 2))
  score_args = (params, tokens, tokens, tokens, tokens)
  score = scoring.make_token_logprobs(core.scorer_config(model_cfg), mesh=mesh, rules=rules)
  programs["estep_scorer"] = (score.lower(*score_args), score_args)
  return programs


def remat_recompute_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """FLOPs per token the backward pass spends recomputing the forward under `cfg.remat`.

  full: each layer's forward again (projections and causal attention) but for the MLP's output
  projection, whose result the backward pass does not use; dots (keeps the matmuls without batch
  dims, i.e. the projections): the attention's two batched matmuls; none: nothing.
  """
  if cfg.remat == "none":
    return 0.0
  d, f, h, k, dh = cfg.dim, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd
  attention = cfg.n_layers * 2 * 2 * h * dh * seq_len / 2
  if cfg.remat == "dots":
    return attention
  return 2 * cfg.n_layers * (d * dh * (2 * h + 2 * k) + 2 * d * f) + attention


def train_flops(config, model_cfg: model_lib.ModelConfig, device) -> dict[str, Any]:
  """Compiled vs analytic train FLOPs per token, from unrolled 1- and 2-layer train steps of
  one sequence on one `device` (see the module docstring).

  One device, because XLA's partitioning of the distributed step adds loops (e.g. 8 in the
  1-layer step on v5e:2x4) whose bodies its cost model counts once; data and FSDP parallelism
  add no FLOPs per token.
  """
  cfg_data = runtime.section(config, "data")
  one = config.copy_and_resolve_references()
  one.train.grad_accum = 1
  one.data.batch_size = 1
  one.mesh.shape = tuple(1 for _ in one.mesh.shape)
  tokens = cfg_data.seq_len
  per_token, kernel_per_token = [], []
  for layers in (1, 2):
    # One LM-head chunk: XLA's cost model would count a loop over chunks once.
    cfg = dataclasses.replace(model_cfg, n_layers=layers, scan_layers=False,
                              logits_chunk=tokens)
    lowered, _ = train_program(one, cfg, [device])
    try:
      compiled = lowered.compile()
    except Exception as e:  # e.g. one layer of a very wide model does not fit one device
      return {"error": f"the {layers}-layer step does not compile on one device: "
                       f"{str(e).strip().splitlines()[0][:200]}"}
    kernel = kernel_flops(compiled.as_text(), cfg, tokens)
    kernel_per_token.append(kernel / tokens)
    per_token.append((compiled_stats.flops(compiled) + kernel) / tokens)
  layer = per_token[1] - per_token[0]
  compiled_total = per_token[0] + (model_cfg.n_layers - 1) * layer
  model_flops = model_lib.train_flops_per_token(model_cfg, cfg_data.seq_len)
  recompute = remat_recompute_flops_per_token(model_cfg, cfg_data.seq_len)
  kernel_total = kernel_per_token[0] + (model_cfg.n_layers - 1) * (kernel_per_token[1]
                                                                   - kernel_per_token[0])
  return {"compiled_per_token": compiled_total, "kernel_per_token": kernel_total,
          "model_per_token": model_flops,
          "remat_recompute_per_token": recompute, "analytic_per_token": model_flops + recompute,
          "ratio": compiled_total / (model_flops + recompute), "remat": model_cfg.remat,
          "method": (f"unrolled 1- and 2-layer steps of one {cfg_data.seq_len}-token sequence on "
                     f"one device, extrapolated linearly to {model_cfg.n_layers} layers; "
                     "Pallas attention kernels counted from their calls in the HLO and the "
                     "causal tiles they compute")}


def kernel_flops(hlo_text: str, cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """Matmul FLOPs of the splash attention kernels' calls in an optimized HLO text (one sequence
  of `seq_len` tokens per call), which XLA's cost model leaves out."""
  from latent_em import splash
  total = 0.0
  for name in splash.KERNEL_MATMULS:
    calls = len(re.findall(rf"%{name}\S* = .* custom-call\(", hlo_text))
    total += calls * splash.kernel_call_flops(name, cfg.n_heads, seq_len, cfg.hd)
  return total


# ----------------------------------------------------------------------------- the check


def _lower_programs(config, model_cfg, target: Target) -> dict[str, Any]:
  job = config.get("job", "train")
  if job not in ("train", "estep", "em"):
    raise config_lib.ConfigError(f"config.job={job!r}: the fit check compiles the train, estep "
                                 "and em jobs; use --config.job=train or estep")
  programs = {}
  if job in ("train", "em"):
    programs["train_step"] = train_program(config, model_cfg, target.devices)
  if job in ("estep", "em"):
    programs.update(estep_programs(config, model_cfg, target.host_devices()))
  return programs


def argument_bytes(args) -> int:
  """Per-device bytes of abstract arguments (ShapeDtypeStructs with shardings): each array's
  shard on one device."""
  total = 0
  for x in jax.tree.leaves(args):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def _compile(name: str, lowered, args, target: Target) -> tuple[dict[str, Any], str | None]:
  """Compiles one program: its memory and collectives; from the out-of-memory message (its
  temporaries, plus the arguments) when libtpu refuses it."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA reports compile failures as runtime errors with long messages
    message = str(e).strip()
    oom = _OOM.search(message)
    if not oom:
      raise PreflightError(f"{name} does not compile for {target.name}: "
                           f"{message.splitlines()[0][:300]}") from None
    temporaries = int(float(oom.group(1)) * _UNITS[oom.group(2)])
    args = argument_bytes(args)
    return {"peak_bytes": args + temporaries, "fits": False,
            "memory": {"arguments": args, "temporaries": temporaries,
                       "compiler_budget": int(float(oom.group(3)) * _UNITS[oom.group(4)]),
                       "source": "libtpu's out-of-memory message (code and outputs left out)"},
            "collectives": None}, None
  mem = compiled_stats.Memory.of(compiled)
  text = compiled.as_text()
  return {"peak_bytes": mem.total, "fits": mem.total <= target.hbm_bytes,
          "memory": dataclasses.asdict(mem),
          "collectives": compiled_stats.collectives(text).to_json()}, text


def check(config, target: Target, config_name: str = "", workdir: str = "",
          with_flops: bool = True, hlo_out: str = "") -> dict[str, Any]:
  """Compiles the job's programs for `target`; returns the report.

  Keys: fits, peak_bytes_per_device (the largest program's), hbm_bytes_per_device, headroom,
  topology, config, job, devices, device_kind, hbm_source, mesh, vocab_size, vocab_source,
  programs ({name: {peak_bytes, fits, memory, collectives}}) and, for jobs with a train step
  and `with_flops`, flops (see `train_flops`).
  """
  runtime.validate(config)
  model_cfg, vocab_source = model_config(config, workdir)
  lowered = _lower_programs(config, model_cfg, target)
  programs = {}
  for name, (low, args) in lowered.items():
    programs[name], text = _compile(name, low, args, target)
    if hlo_out and text:
      _write_hlo(hlo_out, name, text, len(lowered))
  peak = max(p["peak_bytes"] for p in programs.values())
  report: dict[str, Any] = {
      "fits": peak <= target.hbm_bytes, "peak_bytes_per_device": peak,
      "hbm_bytes_per_device": target.hbm_bytes,
      "headroom": 1.0 - peak / target.hbm_bytes if target.hbm_bytes else None,
      "topology": target.name, "config": config_name, "job": config.get("job", "train"),
      "devices": len(target.devices), "device_kind": target.device_kind,
      "hbm_source": target.hbm_source,
      "mesh": dict(sharding.make_mesh(runtime.section(config, "mesh"), target.devices).shape),
      "vocab_size": model_cfg.vocab_size, "vocab_source": vocab_source,
      "programs": programs,
  }
  if with_flops and "train_step" in programs:
    report["flops"] = train_flops(config, model_cfg, target.devices[0])
  return report


def _write_hlo(path: str, name: str, text: str, n_programs: int) -> None:
  if n_programs > 1:
    stem, ext = os.path.splitext(path)
    path = f"{stem}.{name}{ext}"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
  """The human-readable report."""
  lines = [f"fit check: {r['config'] or 'config'} (job={r['job']}) on {r['topology']}: "
           f"{r['devices']} x {r['device_kind']}, {_gib(r['hbm_bytes_per_device'])} each "
           f"({r['hbm_source']}); mesh {r['mesh']}; vocab {r['vocab_size']} "
           f"({r['vocab_source']})"]
  for name, p in r["programs"].items():
    m = p["memory"]
    share = p["peak_bytes"] / r["hbm_bytes_per_device"] if r["hbm_bytes_per_device"] else math.nan
    verdict = (f"fits, {100 * (1 - share):.0f}% headroom" if p["fits"]
               else f"DOES NOT FIT ({_gib(p['peak_bytes'] - r['hbm_bytes_per_device'])} over)")
    lines.append(f"  {name}: {_gib(p['peak_bytes'])} per device ({100 * share:.0f}%): {verdict}")
    if "source" in m:  # refused by the compiler
      lines.append(f"    arguments {_gib(m['arguments'])}, temporaries {_gib(m['temporaries'])} "
                   f"against the compiler's {_gib(m['compiler_budget'])} ({m['source']})")
      continue
    lines.append(f"    arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
                 f"({_gib(m['aliased'])} in place of donated arguments), temporaries "
                 f"{_gib(m['temporaries'])}, code {_gib(m['code'])}")
    col = p["collectives"]
    kinds = ", ".join(f"{k} {col['count'][k]:.0f} ({_gib(col['bytes'][k])})"
                      for k in sorted(col["count"]))
    loops = (f"; {col['unknown_loops']} loop(s) of unknown trip count counted once"
             if col["unknown_loops"] else "")
    lines.append(f"    collectives per call: {kinds or 'none'}{loops}")
  if "flops" in r and "error" in r["flops"]:
    lines.append(f"  train FLOPs per token: not measured ({r['flops']['error']})")
  elif "flops" in r:
    f = r["flops"]
    lines.append(f"  train FLOPs per token: compiled {f['compiled_per_token'] / 1e9:.3f} G vs "
                 f"analytic {f['analytic_per_token'] / 1e9:.3f} G (model "
                 f"{f['model_per_token'] / 1e9:.3f} G + remat={f['remat']} recompute "
                 f"{f['remat_recompute_per_token'] / 1e9:.3f} G): {f['ratio']:.3f}x "
                 f"[{f['method']}]")
  lines.append(("FITS" if r["fits"] else "DOES NOT FIT") +
               f": peak {_gib(r['peak_bytes_per_device'])} of {_gib(r['hbm_bytes_per_device'])}"
               + (f" ({100 * r['headroom']:.0f}% headroom)" if r["fits"] else ""))
  return "\n".join(lines)


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  raise TypeError(type(x).__name__)


def main(argv) -> None:
  del argv
  from absl import flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  if FLAGS.topology != "local":
    # Compile-only TPU devices need no accelerator here; the default backend stays the CPU.
    jax.config.update("jax_platforms", "cpu")
  try:
    target = get_target(FLAGS.topology, FLAGS.hbm_gib)
    report = check(FLAGS.config, target, config_flags.get_config_filename(FLAGS["config"]),
                   workdir=FLAGS.workdir or "", with_flops=FLAGS.flops, hlo_out=FLAGS.hlo_out)
  except (PreflightError, config_lib.ConfigError, FileNotFoundError) as e:
    print(f"preflight: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception:  # a bug, not a verdict: exit 1 must keep meaning "does not fit"
    import traceback
    traceback.print_exc()
    sys.exit(3)
  print(json.dumps(report, default=_json_default) if FLAGS.json else format_report(report))
  sys.exit(0 if report["fits"] else 1)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
  flags.DEFINE_string("topology", None, f"Where to compile for: {EXAMPLES}.")
  flags.DEFINE_string("workdir", "", "The job's workdir (only read: its tokenizer, if the config "
                      "sizes the vocabulary from it).")
  flags.DEFINE_bool("json", False, "Print one JSON line instead of the report.")
  flags.DEFINE_string("hlo_out", "", "Write the optimized HLO here (FILE.<program>.EXT for "
                      "jobs with several programs).")
  flags.DEFINE_float("hbm_gib", 0.0, "Memory per device in GiB (default: by device kind).")
  flags.DEFINE_bool("flops", True, "Compare the train step's FLOPs with the analytic count "
                    "(two more, smaller compiles).")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
