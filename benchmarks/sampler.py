"""Sampler throughput: latent_em's jitted sampler vs Hugging Face `generate`, and the saving from
sharing one prompt's KV cache between its K samples.

Part 1 (generation). Both frameworks sample from the same Llama (our random weights, copied into
`LlamaForCausalLM` through `hf.save_llama`) for the same batch of random prompts: temperature
1.0, no top-k / top-p, exactly `gen_len` new tokens per row (no stop ids for us; HF gets
`min_new_tokens = max_new_tokens`, its default dynamic cache and `torch.inference_mode`). Our
sampler is compiled by one untimed call; then the runners alternate, round after round, so all
see the same load on a shared machine. Tokens/s counts generated tokens over the whole call
(prefill included). PyTorch runs with threads = cores as asked, and also with one thread: on an
oversubscribed machine OpenMP's spinning threads can make the multi-threaded run several times
slower, and the honest comparison is against the faster of the two.

`--decoders=ours,scan` adds a runner that uses the same sampler with the layer loop written as
one `lax.scan` over stacked weights and a stacked [L, B, K, S, Dh] cache (`ScanDecode`, checked
against `model.decode`'s logits before timing). `model.decode` runs the layers one by one over
per-layer cache buffers; the `scan` runner shows what that buys.

Part 2 (shared prompts). A prompt-heavy E-step shape (prompt 512, thought 128 tokens, the small
preset): B prompts x K samples through one call with `num_samples=K` (prefill once per prompt)
vs the naive B*K repeated prompts with `num_samples=1`.

Part 3 (memory-bandwidth bound). A decode step must read every weight and the filled KV cache,
so tokens/s <= rows / (bytes per step / bandwidth). The bandwidth is a measured large copy (or
`--mem_bw_gbps`); the bound ignores prefill, so the ratio understates decode efficiency a little.

  python benchmarks/sampler.py --preset=tiny --shared_decoders=ours,scan
  python benchmarks/sampler.py --preset=small --batch=8 --skip_shared --json
  python benchmarks/sampler.py --preset=tinyllama --batch=128 --prompt_len=512 --gen_len=256 \\
      --decoders=ours --skip_hf --skip_shared --mem_bw_gbps=3350   # GPU (H100 SXM)

Results are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

# JAX would otherwise reserve 75% of GPU memory up front and leave none for PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from latent_em import hf, model  # noqa: E402
from latent_em.sampling import sampler as sampler_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
  model: model.ModelConfig
  gpu_only: bool = False


PRESETS = {
    "tiny": Preset(model.ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4,
                                     n_kv_heads=2, mlp_dim=384)),
    "small": Preset(model.ModelConfig(vocab_size=8192, dim=512, n_layers=8, n_heads=8,
                                      n_kv_heads=4, mlp_dim=1408)),
    # TinyLlama-1.1B plus the four latent tokens, weights and compute in bf16 (inference).
    "tinyllama": Preset(model.ModelConfig(vocab_size=32004, dim=2048, n_layers=22, n_heads=32,
                                          n_kv_heads=4, mlp_dim=5632, dtype="bfloat16",
                                          param_dtype="bfloat16"), gpu_only=True),
}

FIRST_TOKEN = 3  # prompts avoid ids 0-2 (pad / BOS / EOS in the saved HF config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  p.add_argument("--batch", type=int, default=8, help="prompts per call (part 1)")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--gen_len", type=int, default=64)
  p.add_argument("--runs", type=int, default=5, help="timed rounds per runner (part 1)")
  p.add_argument("--decoders", default="ours,scan",
                 help="decode implementations timed in part 1 (comma-separated; ours = "
                      "model.decode, scan = ScanDecode)")
  p.add_argument("--skip_hf", action="store_true", help="do not run Hugging Face generate")
  p.add_argument("--skip_shared", action="store_true", help="skip part 2")
  p.add_argument("--shared_preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--shared_prompts", type=int, default=2, help="prompts per call (part 2)")
  p.add_argument("--shared_prompt_len", type=int, default=512)
  p.add_argument("--shared_gen_len", type=int, default=128)
  p.add_argument("--shared_k", default="1,4,8", help="samples per prompt (part 2)")
  p.add_argument("--shared_runs", type=int, default=3, help="timed rounds per K (part 2)")
  p.add_argument("--shared_decoders", default="ours", help="decoders timed in part 2")
  p.add_argument("--mem_bw_gbps", type=float, default=0.0,
                 help="memory bandwidth for the bound (GB/s); 0: a measured copy")
  p.add_argument("--json", action="store_true", help="also print one JSON line with all numbers")
  p.add_argument("--force", action="store_true", help="run a GPU-only preset on CPU anyway")
  args = p.parse_args(argv)
  for name in ("batch", "prompt_len", "gen_len", "runs", "shared_prompts", "shared_prompt_len",
               "shared_gen_len", "shared_runs"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  try:
    args.shared_k = tuple(int(k) for k in args.shared_k.split(","))
  except ValueError:
    p.error(f"--shared_k={args.shared_k!r}: expected comma-separated integers, e.g. 1,4,8")
  if not args.shared_k or min(args.shared_k) < 1:
    p.error(f"--shared_k={args.shared_k}: every K must be >= 1")
  for flag in ("decoders", "shared_decoders"):
    names = tuple(n for n in getattr(args, flag).split(",") if n)
    bad = [n for n in names if n not in DECODERS]
    if bad or not names:
      p.error(f"--{flag}={getattr(args, flag)!r}: choose from {','.join(DECODERS)}")
    setattr(args, flag, names)
  if "ours" not in args.decoders:
    args.decoders = ("ours",) + args.decoders  # the reference every speedup is relative to
  return args


# ----------------------------------------------------------------------------- machine


def cpu_cores() -> int:
  """Cores this process may run on (the affinity mask, not the host's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _load() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return -1.0


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


def copy_bandwidth(backend: str) -> float:
  """Bytes/s of a large in-place elementwise update (read + write), best of several.

  The input is donated so the output reuses its buffer: a fresh output would spend most of the
  time on first-touch page faults on CPU.
  """
  n = (256 << 20) // 4 if backend == "cpu" else (2 << 30) // 4
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
  x = f(x).block_until_ready()
  best = float("inf")
  for _ in range(7):
    t0 = time.perf_counter()
    x = f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * 4 * n / best


def decode_bytes_per_step(cfg: model.ModelConfig, rows: int, context: float) -> float:
  """Bytes one decode step must read: every weight except the embedding table (only `rows`
  rows of it) and the K/V of `context` filled slots per row."""
  param_bytes = jnp.dtype(cfg.param_dtype).itemsize
  cache_bytes = jnp.dtype(cfg.dtype).itemsize
  # The output layer reads the whole [D, V] matrix (lm_head, or the table when tied).
  weights = model.param_count(cfg, include_embedding=False) + cfg.vocab_size * cfg.dim
  embed_rows = rows * cfg.dim
  kv = 2 * cfg.n_layers * rows * context * cfg.n_kv_heads * cfg.hd
  return (weights + embed_rows) * param_bytes + kv * cache_bytes


# ----------------------------------------------------------------------------- scanned decode


class ScanDecode:
  """The layer loop as one `lax.scan` over the stacked [L, ...] weights and a stacked
  {"k", "v"}: [L, N, K, S, Dh] cache (what `nn.scan` compiles to), with the model's own `Block`.

  `model.decode` instead runs the layers one after another over per-layer cache buffers; this
  runner measures what that choice buys inside the sampler's while loop.
  """

  cache_batch_axis = 1

  def __init__(self, cfg: model.ModelConfig):
    self.cfg = cfg

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    cfg = self.cfg
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.hd)
    return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}

  def __call__(self, params: Any, tokens_BT: jax.Array, cache: dict[str, jax.Array],
               cache_index_B: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    dt = cfg.compute_dtype
    slots_BT = cache_index_B[:, None] + jnp.arange(tokens_BT.shape[1])[None, :]
    table = params["embed"]["embedding"]
    x = jnp.take(table.astype(dt), tokens_BT, axis=0)

    def body(x, layer):
      p, c = layer
      return model.Block(cfg).apply({"params": p}, x, c, slots_BT, slots_BT, None, None,
                                    cache_index_B)

    x, new_cache = jax.lax.scan(body, x, (params["layers"], cache))
    x = model.RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, table.astype(dt))
    else:
      logits = jnp.einsum("btd,dv->btv", x, params["lm_head"]["kernel"].astype(dt))
    return logits.astype(jnp.float32), new_cache


def check_decoder(cfg: model.ModelConfig, params: Any, dec: ScanDecode,
                  prompts: jax.Array) -> float:
  """Max |logit difference| between model.decode and another decoder on a prefill + one step."""
  b, p = prompts.shape
  zeros = jnp.zeros((b,), jnp.int32)
  ref, ref_cache = model.decode(cfg, params, prompts, model.init_cache(cfg, b, p + 1), zeros)
  got, got_cache = dec(params, prompts, dec.init_cache(b, p + 1), zeros)
  nxt = prompts[:, :1]
  ref2, _ = model.decode(cfg, params, nxt, ref_cache, zeros + p)
  got2, _ = dec(params, nxt, got_cache, zeros + p)
  return float(max(jnp.max(jnp.abs(ref - got)), jnp.max(jnp.abs(ref2 - got2))))


@dataclasses.dataclass(frozen=True)
class Decoder:
  """What a Sampler needs for one decode implementation."""
  decode_fn: Callable
  init_cache: Callable
  params: Any
  cache_batch_axis: int


DECODERS = ("ours", "scan")


def make_decoder(name: str, cfg: model.ModelConfig, params: Any) -> Decoder:
  """'ours' is model.decode as the E-step uses it; 'scan' is ScanDecode above."""
  if name == "ours":
    return Decoder(functools.partial(model.decode, cfg), functools.partial(model.init_cache, cfg),
                   params, cache_batch_axis=0)
  dec = ScanDecode(cfg)
  return Decoder(dec, dec.init_cache, params, dec.cache_batch_axis)


# ----------------------------------------------------------------------------- runners


class JaxRunner:
  """One `Sampler` call on fixed prompts; compiled by the first (untimed) call."""

  def __init__(self, name: str, dec: Decoder, prompts: np.ndarray, gen_len: int,
               num_samples: int = 1):
    self.name = name
    self.smp = sampler_lib.Sampler(
        dec.decode_fn, dec.init_cache,
        sampler_lib.SamplingConfig(temperature=1.0, max_gen_len=gen_len),
        cache_batch_axis=dec.cache_batch_axis)
    self.params = dec.params
    self.prompts = jnp.asarray(prompts)
    self.lens = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    self.num_samples = num_samples
    self._calls = 0
    t0 = time.perf_counter()
    out = self.run()
    self.compile_s = time.perf_counter() - t0
    lengths = np.asarray(out.lengths)
    if not np.all(lengths == gen_len):
      raise RuntimeError(f"{name}: rows generated {sorted(set(lengths.tolist()))} tokens, "
                         f"expected exactly {gen_len}")

  def run(self) -> sampler_lib.SampleOutput:
    self._calls += 1
    out = self.smp(self.params, self.prompts, self.lens, jax.random.key(self._calls),
                   num_samples=self.num_samples)
    return jax.block_until_ready(out)

  def compiles(self) -> int:
    """Compiled variants of the sampler (1 = no recompilation across calls)."""
    return self.smp._fn._cache_size()  # pylint: disable=protected-access


class HfRunner:
  """transformers `generate` (sampling, exactly gen_len new tokens) with a given thread count."""

  def __init__(self, name: str, hf_model: Any, prompts: np.ndarray, gen_len: int, threads: int):
    import torch
    self.torch, self.name, self.model, self.threads = torch, name, hf_model, threads
    self.ids = torch.from_numpy(prompts.astype(np.int64)).to(hf_model.device)
    self.gen_len = gen_len
    self._calls = 0
    self.run()  # warm-up (allocator, kernels)

  def run(self) -> None:
    torch = self.torch
    torch.set_num_threads(self.threads)
    self._calls += 1
    torch.manual_seed(self._calls)
    with torch.inference_mode():
      out = self.model.generate(
          input_ids=self.ids, attention_mask=torch.ones_like(self.ids), do_sample=True,
          temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=self.gen_len,
          min_new_tokens=self.gen_len, pad_token_id=0)
    if self.model.device.type == "cuda":
      torch.cuda.synchronize()
    new = out.shape[1] - self.ids.shape[1]
    if new != self.gen_len:
      raise RuntimeError(f"{self.name}: generated {new} tokens per row, expected {self.gen_len}")


def time_rounds(runners: list, rounds: int) -> dict[str, dict[str, list[float]]]:
  """Wall and process-CPU seconds per call for each runner, interleaved round by round.

  CPU seconds (all threads of this process) depend less on other processes' load than wall
  seconds, but count spin-waiting threads as busy.
  """
  out = {r.name: {"wall": [], "cpu": []} for r in runners}
  for _ in range(rounds):
    for r in runners:
      c0, t0 = time.process_time(), time.perf_counter()
      r.run()
      out[r.name]["wall"].append(time.perf_counter() - t0)
      out[r.name]["cpu"].append(time.process_time() - c0)
  return out


def _spread(xs: list[float]) -> dict[str, float]:
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _ratios(num: list[float], den: list[float]) -> dict[str, float]:
  """Median / min / max over rounds of num[i] / den[i] (same-round pairs)."""
  return _spread([n / d for n, d in zip(num, den)])


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(FIRST_TOKEN, vocab, (batch, length)).astype(np.int32)


def init_params(cfg: model.ModelConfig) -> Any:
  params = jax.jit(lambda r: model.init_params(cfg, r))(jax.random.key(0))
  # Inference presets store weights in the compute dtype (half the bytes a decode step reads).
  return jax.tree.map(lambda x: x.astype(cfg.params_dtype), params)


# ----------------------------------------------------------------------------- part 1


def run_generation(args: argparse.Namespace, cfg: model.ModelConfig, backend: str,
                   cores: int) -> dict[str, Any]:
  """Part 1: tokens/s of our sampler (and the scan variant) vs HF generate, alternating rounds."""
  b, p, g = args.batch, args.prompt_len, args.gen_len
  res: dict[str, Any] = {"batch": b, "prompt_len": p, "gen_len": g, "runs": args.runs,
                         "params": model.param_count(cfg), "logit_check": {}}
  params = init_params(cfg)
  prompts = random_prompts(b, p, cfg.vocab_size)
  runners: list = []
  for name in args.decoders:
    dec = make_decoder(name, cfg, params)
    if name != "ours":
      diff = check_decoder(cfg, params, dec.decode_fn, jnp.asarray(prompts[:2, :16]))
      res["logit_check"][name] = diff
      if cfg.dtype == "float32" and diff > 1e-3:
        raise RuntimeError(f"{name}'s logits differ from model.decode by {diff:.2e}")
    runners.append(JaxRunner(name, dec, prompts, g))
  res["compile_s"] = {r.name: r.compile_s for r in runners}
  jax_names = [r.name for r in runners]

  hf_model = None
  with tempfile.TemporaryDirectory(prefix="bench_sampler_hf_") as tmp:
    if not args.skip_hf:
      import torch
      import transformers
      device = "cuda" if backend == "gpu" else "cpu"
      if device == "cuda" and not torch.cuda.is_available():
        res["hf_skipped"] = "JAX runs on GPU but this PyTorch build has no CUDA"
      else:
        hf_dir = os.path.join(tmp, "llama")
        hf.save_llama(cfg, jax.device_get(params), hf_dir,
                      torch_dtype="bfloat16" if cfg.dtype == "bfloat16" else "float32")
        hf_model = transformers.LlamaForCausalLM.from_pretrained(
            hf_dir, dtype=getattr(torch, cfg.dtype)).to(device).eval()
        res["hf_attn_implementation"] = hf_model.config._attn_implementation  # pylint: disable=protected-access
        runners.append(HfRunner("hf", hf_model, prompts, g, threads=cores))
        if device == "cpu" and cores > 1:
          runners.append(HfRunner("hf_1thread", hf_model, prompts, g, threads=1))
        res["hf_threads"] = {r.name: r.threads for r in runners if isinstance(r, HfRunner)}
    res["load_before"] = _load()
    times = time_rounds(runners, args.runs)
    res["load_after"] = _load()
  res["compiles_after_timing"] = {r.name: r.compiles() for r in runners
                                  if isinstance(r, JaxRunner)}
  del hf_model

  bw = args.mem_bw_gbps * 1e9 if args.mem_bw_gbps else copy_bandwidth(backend)
  res["mem_bw_gbps"] = bw / 1e9
  res["mem_bw_source"] = "--mem_bw_gbps" if args.mem_bw_gbps else "measured copy"
  res["decode_bytes_per_step"] = decode_bytes_per_step(cfg, b, p + g / 2)
  res["bound_tokens_per_s"] = b * bw / res["decode_bytes_per_step"]

  tokens = b * g
  for r in runners:
    t = times[r.name]
    res[r.name] = {"wall_s": _spread(t["wall"]), "cpu_s": _spread(t["cpu"]),
                   "tokens_per_s": tokens / statistics.median(t["wall"])}
    if r.name in jax_names:
      res[r.name]["of_bound"] = res[r.name]["tokens_per_s"] / res["bound_tokens_per_s"]
  hf_names = [n for n in ("hf", "hf_1thread") if n in times]
  ratios: dict[str, Any] = {}
  for mine in jax_names:
    for other in hf_names:
      ratios[f"{mine}/{other}"] = _ratios(times[other]["wall"], times[mine]["wall"])
    if len(hf_names) > 1:
      # Per round, against whichever HF setting was faster in that round.
      best = [min(times[n]["wall"][i] for n in hf_names) for i in range(args.runs)]
      ratios[f"{mine}/hf_best"] = _ratios(best, times[mine]["wall"])
    if mine != "ours":
      ratios[f"{mine}/ours"] = _ratios(times["ours"]["wall"], times[mine]["wall"])
  res["speedups"] = ratios
  return res


# ----------------------------------------------------------------------------- part 2


def run_shared(args: argparse.Namespace) -> dict[str, Any]:
  """Part 2: B prompts x K samples, shared prompt cache vs K-fold repeated prompts."""
  cfg = PRESETS[args.shared_preset].model
  b, p, g = args.shared_prompts, args.shared_prompt_len, args.shared_gen_len
  res: dict[str, Any] = {"preset": args.shared_preset, "prompts": b, "prompt_len": p,
                         "gen_len": g, "runs": args.shared_runs, "rows": []}
  params = init_params(cfg)
  prompts = random_prompts(b, p, cfg.vocab_size, seed=1)
  # Prefill alone (B prompts), to show what the naive layout repeats K times.
  prefill = jax.jit(lambda prm, toks: model.decode(
      cfg, prm, toks, model.init_cache(cfg, toks.shape[0], p + g),
      jnp.zeros((toks.shape[0],), jnp.int32))[0][:, -1])
  jax.block_until_ready(prefill(params, jnp.asarray(prompts)))
  prefill_s = []
  for _ in range(args.shared_runs):
    t0 = time.perf_counter()
    jax.block_until_ready(prefill(params, jnp.asarray(prompts)))
    prefill_s.append(time.perf_counter() - t0)
  res["prefill_s"] = _spread(prefill_s)
  res["load_before"] = _load()
  decoders = {name: make_decoder(name, cfg, params) for name in args.shared_decoders}
  for k in args.shared_k:
    # Every decoder's shared and naive calls alternate within each round.
    runners = []
    for name, dec in decoders.items():
      runners.append(JaxRunner(f"{name}/shared", dec, prompts, g, num_samples=k))
      if k > 1:
        runners.append(JaxRunner(f"{name}/naive", dec, np.repeat(prompts, k, axis=0), g))
    times = time_rounds(runners, args.shared_runs)
    for name in decoders:
      row: dict[str, Any] = {"decoder": name, "k": k, "generated": b * k * g}
      for mode in ("shared", "naive"):
        t = times.get(f"{name}/{mode}")
        if t:
          row[mode] = {"wall_s": _spread(t["wall"]), "cpu_s": _spread(t["cpu"]),
                       "s_per_token": statistics.median(t["wall"]) / (b * k * g)}
      if k > 1:
        row["naive/shared"] = _ratios(times[f"{name}/naive"]["wall"],
                                      times[f"{name}/shared"]["wall"])
      if name != "ours" and "ours" in decoders:
        row["speedup_over_ours"] = _ratios(times["ours/shared"]["wall"],
                                           times[f"{name}/shared"]["wall"])
      res["rows"].append(row)
    del runners
    jax.clear_caches()
  res["load_after"] = _load()
  return res


# ----------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
  backend = jax.default_backend()
  cores = cpu_cores()
  result: dict[str, Any] = {"preset": args.preset, "backend": backend, "cores": cores,
                            "cpu": _cpu_model(), "device": str(jax.devices()[0]),
                            "versions": _versions(), "loadavg_start": list(os.getloadavg()),
                            "xla_flags": os.environ.get("XLA_FLAGS", ""),
                            "date": time.strftime("%Y-%m-%d %H:%M")}
  if not args.skip_hf:
    import torch
    torch.set_num_threads(cores)
  preset = PRESETS[args.preset]
  if preset.gpu_only and backend == "cpu" and not args.force:
    result["generation_skipped"] = (
        f"preset {args.preset!r} is a GPU shape (bf16, 1.1B parameters); JAX found no GPU. "
        "Pass --force to run it on CPU anyway.")
  else:
    result["generation"] = run_generation(args, preset.model, backend, cores)
  if not args.skip_shared:
    if PRESETS[args.shared_preset].gpu_only and backend == "cpu" and not args.force:
      result["shared_skipped"] = (f"--shared_preset={args.shared_preset} is a GPU shape; pass "
                                  "--force to run it on CPU anyway")
    else:
      result["shared"] = run_shared(args)
  result["loadavg_end"] = list(os.getloadavg())
  return result


def _fmt_spread(s: dict[str, float], unit: str = "") -> str:
  return f"{s['median']:.2f}{unit} [{s['min']:.2f}-{s['max']:.2f}]"


def _format_generation(r: dict[str, Any]) -> list[str]:
  x = r["generation"]
  lines = [
      f"Part 1: preset={r['preset']} ({x['params'] / 1e6:.2f}M params)  batch={x['batch']}  "
      f"prompt={x['prompt_len']}  gen={x['gen_len']}  rounds={x['runs']}  "
      f"load {x['load_before']:.1f} -> {x['load_after']:.1f}",
      "compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in x["compile_s"].items())
      + "   compiled variants after timing: "
      + ", ".join(f"{k} {v}" for k, v in x["compiles_after_timing"].items()),
  ]
  for name, diff in x["logit_check"].items():
    lines.append(f"{name} vs model.decode: max |logit diff| {diff:.2e}")
  if "hf_attn_implementation" in x:
    lines.append(f"HF attention: {x['hf_attn_implementation']}  threads: {x['hf_threads']}")
  if "hf_skipped" in x:
    lines.append(f"HF skipped: {x['hf_skipped']}")
  lines.append(f"{'runner':<14}{'wall s: median [min-max]':>26}{'cpu s':>9}{'tokens/s':>10}"
               f"{'of bound':>10}")
  for name in DECODERS + ("hf", "hf_1thread"):
    if name in x:
      y = x[name]
      bound = f"{y['of_bound']:>10.1%}" if "of_bound" in y else f"{'':>10}"
      lines.append(f"{name:<14}{_fmt_spread(y['wall_s']):>26}{y['cpu_s']['median']:>9.2f}"
                   f"{y['tokens_per_s']:>10.1f}{bound}")
  lines.append("speedup = ratio of tokens/s within each round, median [min-max] over rounds:")
  for mine in DECODERS:
    pairs = [f"{k.split('/')[1]} {_fmt_spread(v, 'x')}" for k, v in x["speedups"].items()
             if k.startswith(mine + "/")]
    if pairs:
      lines.append(f"  {mine} over: " + ",  ".join(pairs))
  lines.append(f"memory-bandwidth bound: {x['bound_tokens_per_s']:.0f} tokens/s "
               f"({x['decode_bytes_per_step'] / 1e6:.1f} MB read per decode step at "
               f"{x['mem_bw_gbps']:.1f} GB/s, {x['mem_bw_source']})")
  return lines


def _format_shared(r: dict[str, Any]) -> list[str]:
  s = r["shared"]
  lines = [f"Part 2: preset={s['preset']}  prompts={s['prompts']}  prompt={s['prompt_len']}  "
           f"gen={s['gen_len']}  rounds={s['runs']}  load {s['load_before']:.1f} -> "
           f"{s['load_after']:.1f}  prefill of the {s['prompts']} prompts alone: "
           f"{_fmt_spread(s['prefill_s'], 's')}",
           f"{'decoder':<14}{'K':>3}{'rows':>6}{'shared s/call':>24}{'ms/tok':>8}"
           f"{'naive s/call':>24}{'ms/tok':>8}{'naive/shared':>22}{'shared vs ours':>22}"]
  for row in s["rows"]:
    sh, nv = row["shared"], row.get("naive")
    line = (f"{row['decoder']:<14}{row['k']:>3}{s['prompts'] * row['k']:>6}"
            f"{_fmt_spread(sh['wall_s']):>24}{sh['s_per_token'] * 1e3:>8.1f}")
    if nv:
      line += (f"{_fmt_spread(nv['wall_s']):>24}{nv['s_per_token'] * 1e3:>8.1f}"
               f"{_fmt_spread(row['naive/shared'], 'x'):>22}")
    else:
      line += f"{'(same call)':>24}{'':>8}{'1':>22}"
    if "speedup_over_ours" in row:
      line += f"{_fmt_spread(row['speedup_over_ours'], 'x'):>22}"
    lines.append(line)
  return lines


def format_table(r: dict[str, Any]) -> str:
  """Human-readable summary of `run`'s result."""
  lines = [f"{r['date']}  device={r['device']}  cpu={r['cpu']}  cores={r['cores']}  "
           f"load avg start={r['loadavg_start'][0]:.1f} end={r['loadavg_end'][0]:.1f}  "
           f"XLA_FLAGS={r['xla_flags'] or '(unset)'}",
           "versions: " + " ".join(f"{k}={v}" for k, v in r["versions"].items())]
  if "generation_skipped" in r:
    lines.append(f"[{r['preset']}] generation skipped: {r['generation_skipped']}")
  if "generation" in r:
    lines += [""] + _format_generation(r)
  if "shared_skipped" in r:
    lines.append(f"Part 2 skipped: {r['shared_skipped']}")
  if "shared" in r:
    lines += [""] + _format_shared(r)
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
