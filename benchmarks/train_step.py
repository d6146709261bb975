"""Train-step throughput: latent_em's jitted step vs Hugging Face transformers + PyTorch.

Both frameworks train the same Llama (our random weights, copied into `LlamaForCausalLM` through
`hf.save_llama`) on the same batch of random tokens (every token weighted, no packing) with the
same AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.01 on matrices only, global-norm clip 1.0,
constant lr 1e-4). Steps of the two frameworks alternate (unless --order=sequential), so both
see the same load on a shared machine. Compilation and warm-up steps are not timed.

Reported per framework: median step time, tokens/s, model FLOP/s (`model.train_flops_per_token`
x tokens/s) and MFU against a peak measured in the same run (the faster of a large jnp and torch
matmul; `--peak_tflops` replaces it with a nominal figure), plus the JAX/PyTorch tokens/s ratio.

  python benchmarks/train_step.py --preset=tiny
  python benchmarks/train_step.py --preset=small --steps=10 --json
  python benchmarks/train_step.py --preset=tinyllama --peak_tflops=989 --skip_torch   # GPU

Results are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

# JAX would otherwise reserve 75% of GPU memory up front and leave none for PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from latent_em import attention, hf, model, optim, sharding  # noqa: E402
from latent_em import train_step as ts  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
  model: model.ModelConfig
  seq: int
  dtype: str
  remat: str = "none"
  gpu_only: bool = False


PRESETS = {
    "tiny": Preset(model.ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4,
                                     n_kv_heads=2, mlp_dim=384), seq=256, dtype="float32"),
    "small": Preset(model.ModelConfig(vocab_size=8192, dim=512, n_layers=8, n_heads=8,
                                      n_kv_heads=4, mlp_dim=1408), seq=512, dtype="float32"),
    # TinyLlama-1.1B plus the four latent tokens (32000 + 4), as trained in the paper.
    "tinyllama": Preset(model.ModelConfig(vocab_size=32004, dim=2048, n_layers=22, n_heads=32,
                                          n_kv_heads=4, mlp_dim=5632),
                        seq=2048, dtype="bfloat16", remat="dots", gpu_only=True),
}

OPTIM = optim.OptimConfig(lr=1e-4, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95,
                          eps=1e-8, weight_decay=0.01, clip_norm=1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  p.add_argument("--batch", type=int, default=8, help="sequences per step")
  p.add_argument("--seq", type=int, default=0, help="tokens per sequence (0: the preset's)")
  p.add_argument("--steps", type=int, default=10, help="timed steps per framework")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: the preset's); parameters stay fp32")
  p.add_argument("--remat", choices=("none", "full", "dots"), default=None,
                 help="rematerialisation (default: the preset's); torch uses HF gradient "
                      "checkpointing for anything but none")
  p.add_argument("--attention", choices=attention.IMPLEMENTATIONS, default="auto",
                 help="config.model.attention (auto: by the platform, `attention.resolve`)")
  p.add_argument("--logits_chunk", type=int, default=None,
                 help="config.model.logits_chunk (default: ModelConfig's; 0: whole logits)")
  p.add_argument("--scan_layers", choices=("true", "false"), default=None,
                 help="config.model.scan_layers (default: the preset's); XLA:CPU runs unrolled "
                      "layers faster (docs/benchmarks.md)")
  p.add_argument("--order", choices=("alternate", "sequential"), default="alternate",
                 help="alternate steps of the two frameworks, or run JAX to the end and free "
                      "it before PyTorch starts (for shapes where both do not fit at once)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="nominal peak for MFU (e.g. 989 for H100 bf16); 0: the measured matmul")
  p.add_argument("--json", action="store_true", help="also print one JSON line with all numbers")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads (0: one per core); on a loaded machine one thread "
                      "avoids PyTorch's spinning thread pool (docs/benchmarks.md)")
  p.add_argument("--skip_torch", action="store_true", help="time only the JAX step")
  p.add_argument("--force", action="store_true", help="run a GPU-only preset on CPU anyway")
  args = p.parse_args(argv)
  for name in ("batch", "steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.logits_chunk is not None and args.logits_chunk < 0:
    p.error(f"--logits_chunk={args.logits_chunk} must be >= 0")
  if args.warmup < 0 or args.seq < 0:
    p.error("--warmup and --seq must be >= 0")
  return args


# ----------------------------------------------------------------------------- measurements


def cpu_cores() -> int:
  """Cores this process may run on (the affinity mask, not the host's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _thread_cpu_ticks() -> dict[int, int]:
  """user + system clock ticks consumed so far by each thread of this process (Linux only)."""
  out = {}
  try:
    tids = os.listdir("/proc/self/task")
  except OSError:
    return out
  for tid in tids:
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      out[int(tid)] = int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
      continue
  return out


class ThreadUse:
  """Accumulates per-thread CPU time over the timed steps of one framework."""

  def __init__(self):
    self.ticks: dict[int, int] = {}
    self.wall = 0.0
    self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

  def add(self, before: dict[int, int], after: dict[int, int], wall: float) -> None:
    self.wall += wall
    for tid, t in after.items():
      self.ticks[tid] = self.ticks.get(tid, 0) + t - before.get(tid, 0)

  def summary(self) -> dict[str, float]:
    """busy_threads: threads that ran >= 25% of the wall time; cores_used: mean CPU / wall."""
    if not self.ticks or self.wall <= 0:
      return {"busy_threads": -1, "cores_used": -1.0}
    secs = [t * self._tick_s for t in self.ticks.values()]
    return {"busy_threads": sum(s >= 0.25 * self.wall for s in secs),
            "cores_used": round(sum(secs) / self.wall, 2)}


def matmul_peak(backend: str, dtype: str, torch_device: str | None) -> dict[str, float]:
  """Best-of-N FLOP/s of an n x n x n matmul in jnp and (given a device) in torch.

  Returns {"matmul_n", "jax_matmul_flops"[, "torch_matmul_flops"]}.
  """
  n, repeats = (2048, 4) if backend == "cpu" else (8192, 30)
  flops = 2.0 * n ** 3
  out = {"matmul_n": n}
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(key_b, (n, n), jnp.dtype(dtype))
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  out["jax_matmul_flops"] = flops / best
  if torch_device is not None:
    import torch
    tdtype = getattr(torch, dtype)
    ta = torch.randn(n, n, dtype=tdtype, device=torch_device)
    tb = torch.randn(n, n, dtype=tdtype, device=torch_device)
    sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    torch.mm(ta, tb)
    sync()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      torch.mm(ta, tb)
      sync()
      best = min(best, time.perf_counter() - t0)
    out["torch_matmul_flops"] = flops / best
  return out


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens, one document per row, every target weighted: int32/float32 [B, T]."""
  toks = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "loss_weights": np.ones((batch, seq), np.float32),
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


# ----------------------------------------------------------------------------- runners


class JaxRunner:
  """latent_em's train step (jit, donated state, single-device mesh)."""

  name = "jax"

  def __init__(self, cfg: model.ModelConfig, params: Any, batch: dict[str, np.ndarray]):
    tx, schedule = optim.make_optimizer(OPTIM, total_steps=1_000_000)
    self.mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
    rules = sharding.MeshConfig().rules_list
    self.state = ts.create_sharded_state(cfg, tx, self.mesh, rules, jax.random.key(0),
                                         params=params)
    _, shardings = ts.state_shardings(cfg, tx, self.mesh, rules)
    self.batch = sharding.host_to_global(batch, self.mesh)
    step = ts.jit_train_step(ts.make_train_step(cfg, tx, schedule), self.mesh, shardings)
    t0 = time.perf_counter()
    self._step = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self._metrics = None

  def step(self) -> None:
    self.state, self._metrics = self._step(self.state, self.batch)
    jax.block_until_ready((self.state, self._metrics))

  def loss(self) -> float:
    return float(self._metrics["loss"])

  def close(self) -> None:
    del self.state, self._step, self.batch
    jax.clear_caches()


class TorchRunner:
  """transformers LlamaForCausalLM: forward, cross-entropy, backward, clip, AdamW, zero_grad."""

  name = "torch"

  def __init__(self, hf_dir: str, batch: dict[str, np.ndarray], device: str, dtype: str,
               remat: str):
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    self.torch, self.device = torch, device
    t0 = time.perf_counter()
    self.model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    self.model.train()
    if remat != "none":
      self.model.gradient_checkpointing_enable()
    self.load_s = time.perf_counter() - t0
    self.n_params = sum(p.numel() for p in self.model.parameters())
    decay = [p for p in self.model.parameters() if p.ndim >= 2]  # as optim._decay_mask
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": OPTIM.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)
    try:  # the fused kernel is PyTorch's fastest AdamW (CPU and CUDA since torch 2.4)
      self.opt = torch.optim.AdamW(groups, fused=True, **kwargs)
      self.fused = True
    except (RuntimeError, TypeError):
      self.opt = torch.optim.AdamW(groups, **kwargs)
      self.fused = False
    self.inputs = torch.from_numpy(batch["inputs"].astype(np.int64)).to(device)
    self.targets = torch.from_numpy(batch["targets"].astype(np.int64)).to(device)
    self.amp = dtype != "float32"
    self.amp_dtype = getattr(torch, dtype)
    self._sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    self._loss = None

  def step(self) -> None:
    torch = self.torch
    with torch.autocast(self.device, dtype=self.amp_dtype, enabled=self.amp):
      logits = self.model(input_ids=self.inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM.clip_norm)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self._sync()
    self._loss = loss.detach()

  def loss(self) -> float:
    return float(self._loss)

  def close(self) -> None:
    del self.model, self.opt
    if self.device == "cuda":
      self.torch.cuda.empty_cache()


def time_steps(runners: list, steps: int, warmup: int) -> dict[str, dict[str, Any]]:
  """Runs `warmup` untimed then `steps` timed steps per runner, interleaving the runners."""
  for _ in range(warmup):
    for r in runners:
      r.step()
  out = {r.name: {"times": [], "losses": [], "use": ThreadUse()} for r in runners}
  for _ in range(steps):
    for r in runners:
      before = _thread_cpu_ticks()
      t0 = time.perf_counter()
      r.step()
      wall = time.perf_counter() - t0
      out[r.name]["use"].add(before, _thread_cpu_ticks(), wall)
      out[r.name]["times"].append(wall)
      out[r.name]["losses"].append(r.loss())
  return out


# ----------------------------------------------------------------------------- benchmark


def _versions() -> dict[str, str]:
  import flax
  import jaxlib
  out = {"python": platform.python_version(), "jax": jax.__version__,
         "jaxlib": jaxlib.__version__, "flax": flax.__version__}
  try:
    import torch
    import transformers
    out.update(torch=torch.__version__, transformers=transformers.__version__)
  except ImportError:
    pass
  return out


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds both steps, times them and returns every number as a flat-ish dict."""
  preset = PRESETS[args.preset]
  backend = jax.default_backend()
  dtype = args.dtype or preset.dtype
  remat = args.remat or preset.remat
  seq = args.seq or preset.seq
  result: dict[str, Any] = {"preset": args.preset, "backend": backend, "batch": args.batch,
                            "seq": seq, "dtype": dtype, "remat": remat, "steps": args.steps,
                            "warmup": args.warmup, "order": args.order}
  if preset.gpu_only and backend == "cpu" and not args.force:
    result["skipped"] = (f"preset {args.preset!r} is a GPU shape (bf16, 1.1B parameters); "
                         "JAX found no GPU. Pass --force to run it on CPU anyway.")
    return result

  cores = cpu_cores()
  cfg = dataclasses.replace(preset.model, dtype=dtype, remat=remat, attention=args.attention)
  if args.logits_chunk is not None:
    cfg = dataclasses.replace(cfg, logits_chunk=args.logits_chunk)
  if args.scan_layers is not None:
    cfg = dataclasses.replace(cfg, scan_layers=args.scan_layers == "true")
  cfg = model.resolve_attention(cfg, jax.devices()[:1])
  result.update(attention=cfg.attention, logits_chunk=cfg.logits_chunk,
                scan_layers=cfg.scan_layers)
  tokens_per_step = args.batch * seq
  flops_per_token = model.train_flops_per_token(cfg, seq)
  result.update(cpu=_cpu_model(), cores=cores, versions=_versions(),
                device=str(jax.devices()[0]), params=model.param_count(cfg),
                tokens_per_step=tokens_per_step, train_flops_per_token=flops_per_token,
                xla_flags=os.environ.get("XLA_FLAGS", ""))

  torch_device = None
  if not args.skip_torch:
    import torch
    torch.set_num_threads(args.torch_threads or cores)
    torch_device = "cuda" if backend == "gpu" else "cpu"
    if torch_device == "cuda" and not torch.cuda.is_available():
      result["torch_skipped"] = "JAX runs on GPU but this PyTorch build has no CUDA"
      torch_device = None
    result["torch_threads"] = torch.get_num_threads()

  peak_before = matmul_peak(backend, dtype, torch_device)

  batch = make_batch(args.batch, seq, cfg.vocab_size)
  params = jax.jit(lambda r: model.init_params(cfg, r))(jax.random.key(0))
  with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
    hf_dir = os.path.join(tmp, "llama")
    if torch_device is not None:
      hf.save_llama(cfg, jax.device_get(params), hf_dir)
    jax_runner = JaxRunner(cfg, params, batch)
    del params
    result["jax_compile_s"] = jax_runner.compile_s
    runners: list = [jax_runner]
    if torch_device is not None and args.order == "alternate":
      runners.append(TorchRunner(hf_dir, batch, torch_device, dtype, remat))
    timings = time_steps(runners, args.steps, args.warmup)
    if torch_device is not None and args.order == "sequential":
      jax_runner.close()
      runners = [TorchRunner(hf_dir, batch, torch_device, dtype, remat)]
      timings.update(time_steps(runners, args.steps, args.warmup))
    torch_runner = next((r for r in runners if r.name == "torch"), None)
    if torch_runner is not None:
      result["torch_params"] = torch_runner.n_params
      if torch_runner.n_params != result["params"]:
        raise RuntimeError(f"LlamaForCausalLM has {torch_runner.n_params} parameters but "
                           f"model.param_count gives {result['params']}: the configs differ")
      result["torch_fused_adamw"] = torch_runner.fused

  # Measured again after the steps: on a shared machine the better of the two is nearer the peak.
  peak_after = matmul_peak(backend, dtype, torch_device)
  result.update({k: max(v, peak_after[k]) for k, v in peak_before.items()})
  measured = max(v for k, v in result.items() if k.endswith("_matmul_flops"))
  result["peak_flops"] = args.peak_tflops * 1e12 if args.peak_tflops else measured
  result["peak_source"] = "nominal (--peak_tflops)" if args.peak_tflops else "measured matmul"

  for name, t in timings.items():
    median = statistics.median(t["times"])
    tps = tokens_per_step / median
    flops = flops_per_token * tps
    result[name] = {"median_step_s": median, "min_step_s": min(t["times"]),
                    "max_step_s": max(t["times"]), "tokens_per_s": tps, "model_flops": flops,
                    "mfu": flops / result["peak_flops"], "loss_first": t["losses"][0],
                    "loss_last": t["losses"][-1], **t["use"].summary()}
  if "torch" in result:
    result["jax_over_torch_tokens_per_s"] = (result["jax"]["tokens_per_s"]
                                             / result["torch"]["tokens_per_s"])
    # Fastest steps: the least disturbed by other processes on a shared machine.
    result["jax_over_torch_best_step"] = (result["torch"]["min_step_s"]
                                          / result["jax"]["min_step_s"])
    # Same weights, batch and optimizer: the losses must track each other.
    tol = 1e-3 if dtype == "float32" else 3e-2
    result["losses_agree"] = all(
        abs(result["jax"][k] - result["torch"][k]) <= tol * abs(result["torch"][k])
        for k in ("loss_first", "loss_last"))
  return result


def format_table(r: dict[str, Any]) -> str:
  """Human-readable summary of `run`'s result."""
  if "skipped" in r:
    return f"[{r['preset']}] skipped: {r['skipped']}"
  lines = [
      f"preset={r['preset']}  batch={r['batch']} x seq={r['seq']} = {r['tokens_per_step']} "
      f"tokens/step  dtype={r['dtype']}  remat={r['remat']}  attention={r['attention']}  "
      f"logits_chunk={r['logits_chunk']}  scan_layers={r['scan_layers']}  "
      f"params={r['params'] / 1e6:.2f}M  "
      f"model FLOPs/token={r['train_flops_per_token'] / 1e6:.1f}M",
      f"device={r['device']}  cpu={r['cpu']}  cores={r['cores']}  "
      f"torch_threads={r.get('torch_threads', '-')}  XLA_FLAGS={r['xla_flags'] or '(unset)'}",
      "versions: " + " ".join(f"{k}={v}" for k, v in r["versions"].items() if v),
      f"peak ({r['matmul_n']}^3 {r['dtype']} matmul, best of N before and after the steps): "
      f"jnp {r['jax_matmul_flops'] / 1e9:.1f} GFLOP/s"
      + (f", torch {r['torch_matmul_flops'] / 1e9:.1f} GFLOP/s" if "torch_matmul_flops" in r
         else "")
      + f"; MFU uses {r['peak_flops'] / 1e9:.1f} GFLOP/s ({r['peak_source']})",
      f"JAX compile {r['jax_compile_s']:.1f}s; {r['steps']} timed steps after {r['warmup']} "
      f"warm-up, order={r['order']}",
      "",
      f"{'framework':<10}{'median s':>10}{'min s':>9}{'max s':>9}{'tokens/s':>11}"
      f"{'GFLOP/s':>10}{'MFU':>8}{'busy thr':>10}{'cores':>7}{'loss 1st':>10}{'loss last':>10}",
  ]
  for name in ("jax", "torch"):
    if name not in r:
      continue
    x = r[name]
    lines.append(f"{name:<10}{x['median_step_s']:>10.4f}{x['min_step_s']:>9.4f}"
                 f"{x['max_step_s']:>9.4f}{x['tokens_per_s']:>11.0f}"
                 f"{x['model_flops'] / 1e9:>10.2f}{x['mfu']:>8.1%}{x['busy_threads']:>10}"
                 f"{x['cores_used']:>7.2f}{x['loss_first']:>10.5f}{x['loss_last']:>10.5f}")
  if "jax_over_torch_tokens_per_s" in r:
    lines += ["", f"JAX / PyTorch tokens/s: {r['jax_over_torch_tokens_per_s']:.3f} (median "
              f"steps), {r['jax_over_torch_best_step']:.3f} (fastest steps)   "
              f"losses agree: {r['losses_agree']}   torch fused AdamW: {r['torch_fused_adamw']}"]
  if "torch_skipped" in r:
    lines.append(f"PyTorch skipped: {r['torch_skipped']}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  result = run(args)
  print(format_table(result), flush=True)
  if args.json:
    print(json.dumps(result, sort_keys=True), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
