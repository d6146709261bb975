"""Sampler benchmarks: latent_em's samplers against Hugging Face `generate`, the shared prompt
cache, continuous batching's slot utilization, and the bytes one decode step moves at the
TinyLlama shape on TPU (compiled for a topology, no hardware needed).

Part 1 (generation). Both frameworks sample from the same Llama (our random weights, copied into
`LlamaForCausalLM` through `hf.save_llama`) for the same batch of random prompts: temperature
1.0, no top-k / top-p, exactly `gen_len` new tokens per row (no stop ids for us; HF gets
`min_new_tokens = max_new_tokens`, its default dynamic cache and `torch.inference_mode`). Our
static `Sampler` holds the params as decoding reads them (`model.decode_params`: per layer, in
the compute dtype, prepared once like HF's loaded model) and is compiled by one untimed call;
then the runners alternate, round after round, so all see the same load on a shared machine.
Tokens/s counts generated tokens over the whole call (prefill included). PyTorch runs with
threads = cores and with one thread (on an oversubscribed machine OpenMP's spinning threads can
make the multi-threaded run several times slower); the headline ratio is against the faster.

Part 2 (shared prompts). A prompt-heavy E-step shape (prompt 512, thought 128 tokens, the small
preset): B prompts x K samples through one call with `num_samples=K` (prefill once per prompt)
vs the naive B*K repeated prompts with `num_samples=1`.

Part 3 (memory-bandwidth bound). A decode step must read every weight and the filled KV cache,
so tokens/s <= rows / (bytes per step / bandwidth). The bandwidth is a measured large copy (or
`--mem_bw_gbps`); the bound ignores prefill, so the ratio understates decode efficiency a little.

Part 4 (continuous batching). K = 4 samples per prompt whose lengths follow a thought-length
distribution like the paper's (up to 1,024 tokens, mean well below: lognormal with median
`--cb_median` 150 and sigma `--cb_sigma` 0.9, rounded and clipped to [1, 1024]; each sample's
length is imposed as its limit, no stop ids). (a) The scheduler at scale: `--cb_rows` 256 rows,
`--cb_prompts` prompts, on a toy model whose step costs nothing (the schedule does not depend on
the model): slot utilization (useful / computed row-steps), the same without the run's tail,
and the utilization static batches of the same rows would get (each batch runs as long as its
longest sample). (b) The same on a real model (`--cb_preset`, `--cb_model_rows` rows,
`--cb_model_prompts` prompts of 16-64 tokens): wall time and generated tokens/s of
`ContinuousSampler` against static `Sampler` batches (per-row length limits), alternating.

Part 5 (bytes per decode step on TPU, `--tpu_topology=v5e:2x2`; needs libtpu, e.g. the
`[tpu]` venv). The one-token decode step of the TinyLlama shape (bf16 weights and cache,
`--tpu_rows` 256 rows, a `--tpu_ring` 2,048-slot ring) compiled for one chip with the dense XLA
attention and with the Pallas ragged kernel: compiled memory, XLA's cost-model bytes, and the
HLO checks (loops, cache-sized copies, in-place cache writes). XLA's cost model cannot see what
the kernel reads (it is data dependent), so the bytes are also counted analytically for a
stated context distribution: rows at a random step of a continuous E-step, each row's context =
its prompt (uniform in [256, 1019], the E-step budget at max_seq_len 2048 and max_gen_len 1024)
+ its sample's tokens so far (a sample drawn in proportion to its Part 4 length, a uniform
position in it), idle rows as measured in Part 4. Minimum = weights + each row's filled K/V;
dense = weights + the whole ring; kernel = weights + the blocks it fetches
(`decode_attention_pallas.blocks_per_row`) + the cache writes + the refills' row writes spread
over the steps.

  python benchmarks/sampler.py --preset=tiny
  python benchmarks/sampler.py --preset=small --batch=8 --gen_len=32 --parts=generation --json
  python benchmarks/sampler.py --parts=continuous --cb_prompts=4096
  /work/tpuvenv/bin/python benchmarks/sampler.py --parts=bytes --tpu_topology=v5e:2x2
  python benchmarks/sampler.py --preset=tinyllama --batch=128 --prompt_len=512 --gen_len=256 \\
      --parts=generation --skip_hf --mem_bw_gbps=3350   # GPU (H100 SXM)

Results are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
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

from latent_em import decode_attention_pallas, kv_cache, model, sharding  # noqa: E402
from latent_em.sampling import continuous, sampler as sampler_lib  # noqa: E402


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

PARTS = ("generation", "shared", "continuous", "bytes")
FIRST_TOKEN = 3  # prompts avoid ids 0-2 (pad / BOS / EOS in the saved HF config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="generation,shared,continuous",
                 help=f"comma-separated parts to run, of {','.join(PARTS)}")
  p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  p.add_argument("--batch", type=int, default=8, help="prompts per call (part 1)")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--gen_len", type=int, default=64)
  p.add_argument("--runs", type=int, default=5, help="timed rounds per runner (part 1)")
  p.add_argument("--skip_hf", action="store_true", help="do not run Hugging Face generate")
  p.add_argument("--shared_preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--shared_prompts", type=int, default=2, help="prompts per call (part 2)")
  p.add_argument("--shared_prompt_len", type=int, default=512)
  p.add_argument("--shared_gen_len", type=int, default=128)
  p.add_argument("--shared_k", default="1,4,8", help="samples per prompt (part 2)")
  p.add_argument("--shared_runs", type=int, default=3, help="timed rounds per K (part 2)")
  p.add_argument("--mem_bw_gbps", type=float, default=0.0,
                 help="memory bandwidth for the bound (GB/s); 0: a measured copy")
  p.add_argument("--cb_rows", type=int, default=256, help="decoding rows (part 4a)")
  p.add_argument("--cb_prompts", type=int, default=4096, help="prompts (part 4a)")
  p.add_argument("--cb_k", type=int, default=4, help="samples per prompt (part 4)")
  p.add_argument("--cb_median", type=float, default=150.0, help="median thought length")
  p.add_argument("--cb_sigma", type=float, default=0.9, help="lognormal sigma of the lengths")
  p.add_argument("--cb_max_len", type=int, default=1024, help="thought length cap")
  p.add_argument("--cb_preset", choices=sorted(PRESETS), default="tiny")
  p.add_argument("--cb_model_rows", type=int, default=64, help="decoding rows (part 4b)")
  p.add_argument("--cb_model_prompts", type=int, default=64, help="prompts (part 4b)")
  p.add_argument("--cb_runs", type=int, default=2, help="timed rounds (part 4b)")
  p.add_argument("--tpu_topology", default="v5e:2x2", help="TPU topology to compile for")
  p.add_argument("--tpu_rows", type=int, default=256, help="decoding rows per chip")
  p.add_argument("--tpu_chips", type=int, default=1, help="chips of the topology to use")
  p.add_argument("--tpu_ring", type=int, default=2048)
  p.add_argument("--json", action="store_true", help="also print one JSON line with all numbers")
  p.add_argument("--force", action="store_true", help="run a GPU-only preset on CPU anyway")
  args = p.parse_args(argv)
  args.parts = tuple(x for x in args.parts.split(",") if x)
  bad = [x for x in args.parts if x not in PARTS]
  if bad or not args.parts:
    p.error(f"--parts={','.join(args.parts)!r}: choose from {','.join(PARTS)}")
  for name in ("batch", "prompt_len", "gen_len", "runs", "shared_prompts", "shared_prompt_len",
               "shared_gen_len", "shared_runs", "cb_rows", "cb_prompts", "cb_k", "cb_max_len",
               "cb_model_rows", "cb_model_prompts", "cb_runs", "tpu_rows", "tpu_chips",
               "tpu_ring"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  try:
    args.shared_k = tuple(int(k) for k in args.shared_k.split(","))
  except ValueError:
    p.error(f"--shared_k={args.shared_k!r}: expected comma-separated integers, e.g. 1,4,8")
  if not args.shared_k or min(args.shared_k) < 1:
    p.error(f"--shared_k={args.shared_k}: every K must be >= 1")
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
  rows of it), in the compute dtype the sampler holds them in, and the K/V of `context` filled
  slots per row."""
  return weight_bytes(cfg, rows) + kv_slot_bytes(cfg) * rows * context


def weight_bytes(cfg: model.ModelConfig, rows: int) -> float:
  """Weights a decode step reads (compute dtype): all but the embedding table, of which only
  `rows` rows; the output layer reads the whole [D, V] matrix (lm_head, or the tied table)."""
  n = model.param_count(cfg, include_embedding=False) + cfg.vocab_size * cfg.dim + rows * cfg.dim
  return n * jnp.dtype(cfg.dtype).itemsize


def kv_slot_bytes(cfg: model.ModelConfig) -> int:
  """Bytes of one cached token, K and V, all layers."""
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.hd * jnp.dtype(cfg.dtype).itemsize


# ----------------------------------------------------------------------------- runners


class JaxRunner:
  """One static `Sampler` call on fixed prompts; compiled by the first (untimed) call."""

  def __init__(self, name: str, cfg: model.ModelConfig, params: Any, prompts: np.ndarray,
               gen_len: int, num_samples: int = 1):
    self.name = name
    dm = sampler_lib.DecodeModel.for_model(cfg)
    self.smp = sampler_lib.Sampler(dm, sampler_lib.SamplingConfig(temperature=1.0,
                                                                  max_gen_len=gen_len))
    self.params = sampler_lib.place_params(dm, params)
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
  return jax.tree.map(lambda x: x.astype(cfg.params_dtype), params)


# ----------------------------------------------------------------------------- part 1


def run_generation(args: argparse.Namespace, cfg: model.ModelConfig, backend: str,
                   cores: int) -> dict[str, Any]:
  """Part 1: tokens/s of our sampler vs HF generate, alternating rounds."""
  b, p, g = args.batch, args.prompt_len, args.gen_len
  res: dict[str, Any] = {"batch": b, "prompt_len": p, "gen_len": g, "runs": args.runs,
                         "params": model.param_count(cfg)}
  params = init_params(cfg)
  prompts = random_prompts(b, p, cfg.vocab_size)
  runners: list = [JaxRunner("ours", cfg, params, prompts, g)]
  res["compile_s"] = {"ours": runners[0].compile_s}

  hf_model = None
  with tempfile.TemporaryDirectory(prefix="bench_sampler_hf_") as tmp:
    if not args.skip_hf:
      import torch
      import transformers
      from latent_em import hf
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
  res["compiles_after_timing"] = {"ours": runners[0].compiles()}
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
  res["ours"]["of_bound"] = res["ours"]["tokens_per_s"] / res["bound_tokens_per_s"]
  hf_names = [n for n in ("hf", "hf_1thread") if n in times]
  ratios: dict[str, Any] = {}
  for other in hf_names:
    ratios[f"ours/{other}"] = _ratios(times[other]["wall"], times["ours"]["wall"])
  if len(hf_names) > 1:
    # Per round, against whichever HF setting was faster in that round.
    best = [min(times[n]["wall"][i] for n in hf_names) for i in range(args.runs)]
    ratios["ours/hf_best"] = _ratios(best, times["ours"]["wall"])
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
  dparams = model.decode_params(cfg, params)
  prefill = jax.jit(lambda prm, toks: model.prefill(cfg, prm, toks, jnp.full((b,), p))[0])
  jax.block_until_ready(prefill(dparams, jnp.asarray(prompts)))
  prefill_s = []
  for _ in range(args.shared_runs):
    t0 = time.perf_counter()
    jax.block_until_ready(prefill(dparams, jnp.asarray(prompts)))
    prefill_s.append(time.perf_counter() - t0)
  res["prefill_s"] = _spread(prefill_s)
  res["load_before"] = _load()
  for k in args.shared_k:
    # The shared and naive calls alternate within each round.
    runners = [JaxRunner("shared", cfg, params, prompts, g, num_samples=k)]
    if k > 1:
      runners.append(JaxRunner("naive", cfg, params, np.repeat(prompts, k, axis=0), g))
    times = time_rounds(runners, args.shared_runs)
    row: dict[str, Any] = {"k": k, "generated": b * k * g}
    for mode in ("shared", "naive"):
      t = times.get(mode)
      if t:
        row[mode] = {"wall_s": _spread(t["wall"]), "cpu_s": _spread(t["cpu"]),
                     "s_per_token": statistics.median(t["wall"]) / (b * k * g)}
    if k > 1:
      row["naive/shared"] = _ratios(times["naive"]["wall"], times["shared"]["wall"])
    res["rows"].append(row)
    del runners
    jax.clear_caches()
  res["load_after"] = _load()
  return res


# ----------------------------------------------------------------------------- part 4


def thought_lengths(args: argparse.Namespace, prompts: int, seed: int = 0) -> np.ndarray:
  """[prompts, K] sample lengths: lognormal (median, sigma), rounded, clipped to [1, max]."""
  rng = np.random.default_rng(seed)
  lengths = rng.lognormal(np.log(args.cb_median), args.cb_sigma, size=(prompts, args.cb_k))
  return np.clip(np.round(lengths), 1, args.cb_max_len).astype(np.int32)


def static_utilization(lengths: np.ndarray, rows: int) -> tuple[float, int]:
  """(useful / computed row-steps, steps) of static batches of rows // K prompts each."""
  per_batch = rows // lengths.shape[1]
  steps = sum(int(lengths[i:i + per_batch].max()) for i in range(0, len(lengths), per_batch))
  return float(lengths.sum()) / (rows * steps), steps


def _toy_model(vocab: int = 8) -> sampler_lib.DecodeModel:
  """Uniform next-token logits and no cache: the scheduler alone."""
  logits = jnp.zeros((vocab,), jnp.float32)
  return sampler_lib.DecodeModel(
      prefill=lambda params, tokens, lengths: (jnp.broadcast_to(logits, (len(tokens), vocab)),
                                               None),
      decode=lambda params, tokens, cache, window: (
          jnp.broadcast_to(logits, tokens.shape + (vocab,)), cache),
      init_cache=lambda n, s: None, insert=lambda cache, prompt_cache, *_: cache)


def run_schedule(args: argparse.Namespace) -> dict[str, Any]:
  """Part 4a: slot utilization of continuous vs static batching at scale (toy model)."""
  k = args.cb_k
  lengths = thought_lengths(args, args.cb_prompts)
  cfg = sampler_lib.SamplingConfig(max_gen_len=args.cb_max_len)
  smp = continuous.ContinuousSampler(_toy_model(), cfg, rows=args.cb_rows,
                                     ring=args.cb_max_len + 1, samples_per_prompt=k,
                                     prompt_bucket=1)
  t0 = time.perf_counter()
  requests = (continuous.Request(i, [FIRST_TOKEN], jax.random.key(i), max_new=tuple(n))
              for i, n in enumerate(lengths.tolist()))
  for _ in smp.run(None, requests):
    pass
  static_u, static_steps = static_utilization(lengths, smp.rows)
  return {
      "rows": smp.rows, "prompts": args.cb_prompts, "prefill_prompts": smp.prefill_prompts,
      "mean_len": float(lengths.mean()), "p50": float(np.median(lengths)),
      "p90": float(np.percentile(lengths, 90)),
      "at_cap": float((lengths == args.cb_max_len).mean()),
      **smp.stats.as_dict(), "static_slot_utilization": static_u, "static_steps": static_steps,
      "wall_s": time.perf_counter() - t0}


def run_continuous(args: argparse.Namespace) -> dict[str, Any]:
  """Part 4: the schedule at scale (4a), then continuous vs static batches on a real model."""
  k = args.cb_k
  res: dict[str, Any] = {"k": k, "median": args.cb_median, "sigma": args.cb_sigma,
                         "max_len": args.cb_max_len, "load_before": _load(),
                         "schedule": run_schedule(args)}
  mcfg = PRESETS[args.cb_preset].model
  rows, n = args.cb_model_rows, args.cb_model_prompts
  lengths = thought_lengths(args, n, seed=1)
  rng = np.random.default_rng(2)
  prompt_lens = rng.integers(16, 65, size=n)
  prompts = [rng.integers(FIRST_TOKEN, mcfg.vocab_size, size=m).tolist() for m in prompt_lens]
  dm = sampler_lib.DecodeModel.for_model(mcfg)
  params = sampler_lib.place_params(dm, init_params(mcfg))
  cfg = sampler_lib.SamplingConfig(temperature=1.0, max_gen_len=args.cb_max_len)
  per_batch = rows // k
  static = sampler_lib.Sampler(dm, cfg)

  class Continuous:
    name = "continuous"

    def __init__(self):
      self.smp = continuous.ContinuousSampler(dm, cfg, rows=rows, ring=64 + args.cb_max_len,
                                              samples_per_prompt=k, prompt_bucket=64)

    def run(self):
      reqs = (continuous.Request(i, p, jax.random.key(i), max_new=tuple(m))
              for i, (p, m) in enumerate(zip(prompts, lengths.tolist())))
      out = {r.id: s for r, s in self.smp.run(params, reqs)}
      assert all(len(s.tokens) == m for i in out for s, m in zip(out[i], lengths[i]))

  class Static:
    name = "static"

    def run(self):
      for start in range(0, n, per_batch):
        arr = np.zeros((per_batch, 64), np.int32)
        lens = np.ones((per_batch,), np.int32)
        limits = np.ones((per_batch, k), np.int32)
        for j, i in enumerate(range(start, min(start + per_batch, n))):
          arr[j, :prompt_lens[i]] = prompts[i]
          lens[j], limits[j] = prompt_lens[i], lengths[i]
        out = static(params, jnp.asarray(arr), jnp.asarray(lens), jax.random.key(start), k,
                     jnp.asarray(limits.reshape(-1)))
        jax.block_until_ready(out)

  runners = [Continuous(), Static()]
  for r in runners:   # compile (and check) untimed
    r.run()
  times = time_rounds(runners, args.cb_runs)
  tokens = int(lengths.sum())
  res["model"] = {"preset": args.cb_preset, "rows": rows, "prompts": n, "tokens": tokens,
                  "mean_len": float(lengths.mean()),
                  "continuous_slot_utilization": runners[0].smp.stats.slot_utilization,
                  "static_slot_utilization": static_utilization(lengths, rows)[0]}
  for r in runners:
    res["model"][r.name] = {"wall_s": _spread(times[r.name]["wall"]),
                            "tokens_per_s": tokens / statistics.median(times[r.name]["wall"])}
  res["model"]["continuous/static"] = _ratios(times["static"]["wall"],
                                              times["continuous"]["wall"])
  res["load_after"] = _load()
  return res


# ----------------------------------------------------------------------------- part 5


def step_contexts(args: argparse.Namespace, rows: int, idle: float, seed: int = 3
                  ) -> np.ndarray:
  """[rows] context lengths (slots in each row's window, the new token included) at a random
  step of a continuous E-step: see the module docstring (Part 5)."""
  rng = np.random.default_rng(seed)
  lengths = thought_lengths(args, 20000, seed=seed).reshape(-1)
  pick = rng.choice(len(lengths), size=rows, p=lengths / lengths.sum())
  prompts = rng.integers(256, 1020, size=rows)
  ctx = prompts + rng.integers(0, lengths[pick]) + 1
  ctx[rng.random(rows) < idle] = 1          # an idle row's window is its own slot
  return ctx


def _compile_step(cfg: model.ModelConfig, devices: list, rows: int, ring: int, impl: str):
  """The one-token decode step, rows (and the cache) data-parallel over `devices`, with the
  logical rules in effect (as the E-step runs it)."""
  mcfg = sharding.MeshConfig(shape=(-1, 1, 1))
  mesh = sharding.make_mesh(mcfg, devices)
  rules = mcfg.rules_list
  params = jax.eval_shape(lambda: model.decode_params(cfg, model.init_params(cfg,
                                                                             jax.random.key(0))))
  cache = jax.eval_shape(lambda: model.init_cache(cfg, rows, ring))
  with_shd = lambda tree, shd: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shd)
  params = with_shd(params, sharding.logical_to_sharding(model.decode_logical_axes(cfg), mesh,
                                                         rules))
  cache_shd = sharding.logical_to_sharding(model.cache_partition_specs(cfg), mesh, rules)
  cache = with_shd(cache, cache_shd)

  def step(p, tokens, c, head, context):
    logits, c = model.decode(cfg, p, tokens, c, kv_cache.Window(head, context, impl))
    return logits[:, 0], c

  rows_spec = lambda shape: jax.ShapeDtypeStruct(
      shape, jnp.int32, sharding=sharding.batch_sharding(mesh, len(shape)))
  head = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  fn = jax.jit(sharding.with_logical_rules(step, mesh, rules), donate_argnums=2,
               out_shardings=(sharding.batch_sharding(mesh), cache_shd))
  return fn.lower(params, rows_spec((rows, 1)), cache, head, rows_spec((rows,))).compile()


def _compile_programs(cfg: model.ModelConfig, device, rows: int, ring: int, prefill: int,
                      prompt_len: int) -> dict[str, dict[str, float]]:
  """Memory of the E-step's two programs on one chip: the decode loop (ragged kernel) and a
  refill of `prefill` prompts of `prompt_len` tokens (K = 4 samples each)."""
  mesh = jax.sharding.Mesh(np.array([device]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                  sharding=rep), tree)
  dm = sampler_lib.DecodeModel.for_model(cfg, attention="ragged")
  params = spec(jax.eval_shape(lambda: dm.prepare(model.init_params(cfg, jax.random.key(0)))))
  state = spec(jax.eval_shape(functools.partial(sampler_lib.init_state, dm, rows, ring,
                                                cfg.vocab_size, ring // 2)))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
  m = prefill * 4
  decode = jax.jit(functools.partial(sampler_lib.decode, dm, sampler_lib.SamplingConfig(
      max_gen_len=ring // 2), (2,)), donate_argnums=(1,))
  refill = jax.jit(functools.partial(sampler_lib.refill, dm), donate_argnums=(1,))
  out = {}
  for name, lowered in (
      ("decode_loop", decode.lower(params, state, i32(), i32())),
      ("refill", refill.lower(params, state, i32(prefill, prompt_len), i32(prefill),
                              jax.ShapeDtypeStruct((prefill, 2), jnp.uint32, sharding=rep),
                              i32(m), i32(m), i32(m), i32(m)))):
    mem = lowered.compile().memory_analysis()
    out[name] = {"argument_bytes": mem.argument_size_in_bytes,
                 "temp_bytes": mem.temp_size_in_bytes,
                 "peak_bytes": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                + mem.output_size_in_bytes - mem.alias_size_in_bytes)}
  return out


def hlo_checks(text: str, cfg: model.ModelConfig, rows: int, ring: int, chips: int
               ) -> dict[str, int]:
  """Loops, gathers of the rows, cache-sized copies and in-place cache writes in an optimized
  HLO text (`rows` in all, `rows / chips` per chip)."""
  cache = f"[{rows // chips},{ring},{cfg.n_kv_heads * cfg.hd}]"
  lines = text.splitlines()
  gathered = re.findall(r"= \w+\[([0-9,]*)\][^ ]* all-gather(-start)?\(", text)
  return {
      "row_all_gathers": sum(shape.split(",")[0] == str(rows) for shape, _ in gathered),
      "while_loops": sum(" while(" in l for l in lines),
      "cache_copies": sum(cache in l and re.search(r" copy(-start)?\(", l) is not None
                          for l in lines),
      "cache_writes": sum(cache in l.split("dynamic-update-slice(")[0]
                          for l in lines if "dynamic-update-slice(" in l),
      "kernel_calls": sum('custom_call_target="tpu_custom_call"' in l for l in lines),
  }


def _hbm_bytes(device) -> float:
  """HBM a program may use on one chip (what the compiler reports as available; 0: unknown)."""
  return {"TPU v5 lite": 15.75 * 2 ** 30}.get(device.device_kind, 0.0)


def _matmul_calibration(cfg: model.ModelConfig, device, rows: int) -> dict[str, float]:
  """What XLA's cost model charges one MLP matmul [rows, D] x [D, F] (bf16) against its
  operands' bytes: the model's "bytes accessed" is not the HBM traffic of a matmul."""
  mesh = jax.sharding.Mesh(np.array([device]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((rows, cfg.dim), jnp.bfloat16, sharding=rep)
  w = jax.ShapeDtypeStruct((cfg.dim, cfg.mlp_dim), jnp.bfloat16, sharding=rep)
  compiled = jax.jit(jnp.dot).lower(x, w).compile()
  operands = 2 * (rows * cfg.dim + cfg.dim * cfg.mlp_dim + rows * cfg.mlp_dim)
  return {"xla_cost_bytes": compiled.cost_analysis()["bytes accessed"],
          "operand_bytes": operands}


def run_bytes(args: argparse.Namespace, idle: float, refills_per_step: float) -> dict[str, Any]:
  """Part 5: compiled decode steps for a TPU chip, and analytic bytes per step."""
  from jax.experimental import topologies
  cfg = PRESETS["tinyllama"].model
  chips, ring = args.tpu_chips, args.tpu_ring
  rows = args.tpu_rows * chips
  topo = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology)
  res: dict[str, Any] = {"topology": args.tpu_topology, "device": topo.devices[0].device_kind,
                         "chips": chips, "rows": rows, "ring": ring,
                         "block": decode_attention_pallas.BLOCK}
  for impl in ("dense", "ragged"):
    compiled = _compile_step(cfg, topo.devices[:chips], rows, ring, impl)
    mem = compiled.memory_analysis()
    res[impl] = {"xla_cost_bytes": compiled.cost_analysis()["bytes accessed"],
                 "argument_bytes": mem.argument_size_in_bytes,
                 "temp_bytes": mem.temp_size_in_bytes,
                 **hlo_checks(compiled.as_text(), cfg, rows, ring, chips)}
  res["calibration"] = _matmul_calibration(cfg, topo.devices[0], args.tpu_rows)
  # The E-step's programs as config.estep would size them (refill rows / 16 / K prompts of the
  # longest bucket), with the chip's memory.
  res["programs"] = _compile_programs(cfg, topo.devices[0], args.tpu_rows, ring,
                                      max(1, args.tpu_rows // 64), 1024)
  res["hbm_bytes"] = _hbm_bytes(topo.devices[0])
  # Bytes per chip: its rows' contexts, all the weights.
  rows = args.tpu_rows
  ctx = step_contexts(args, rows, idle)
  slot = kv_slot_bytes(cfg)
  weights = weight_bytes(cfg, rows)
  heads = np.arange(0, ring, 7)    # the shared head's position varies from step to step
  blocks = np.mean([np.asarray(decode_attention_pallas.blocks_per_row(
      jnp.int32(h), jnp.asarray(ctx), ring, decode_attention_pallas.BLOCK)).sum() for h in heads])
  writes = rows * slot                               # this step's token, every row
  refill = refills_per_step * ring * slot            # whole rows written by kv_cache.insert
  res["analytic"] = {
      "idle_rows": idle, "refilled_rows_per_step": refills_per_step,
      "mean_context": float(ctx.mean()), "weights": weights,
      "minimum": weights + ctx.sum() * slot,
      "dense": weights + rows * ring * slot + writes,
      "kernel": weights + blocks * decode_attention_pallas.BLOCK * slot + writes + refill,
      "kernel_kv_fetched_over_filled": blocks * decode_attention_pallas.BLOCK / ctx.sum()}
  a = res["analytic"]
  a["dense/minimum"] = a["dense"] / a["minimum"]
  a["kernel/minimum"] = a["kernel"] / a["minimum"]
  res["dense_attention_xla_cost_bytes"] = (res["dense"]["xla_cost_bytes"]
                                           - res["ragged"]["xla_cost_bytes"])
  res["whole_ring_bytes"] = rows * ring * slot   # one chip's rows
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
  if "generation" in args.parts and not args.skip_hf:
    import torch
    torch.set_num_threads(cores)
  preset = PRESETS[args.preset]
  if "generation" in args.parts:
    if preset.gpu_only and backend == "cpu" and not args.force:
      result["generation_skipped"] = (
          f"preset {args.preset!r} is a GPU shape (bf16, 1.1B parameters); JAX found no GPU. "
          "Pass --force to run it on CPU anyway.")
    else:
      result["generation"] = run_generation(args, preset.model, backend, cores)
  if "shared" in args.parts:
    if PRESETS[args.shared_preset].gpu_only and backend == "cpu" and not args.force:
      result["shared_skipped"] = (f"--shared_preset={args.shared_preset} is a GPU shape; pass "
                                  "--force to run it on CPU anyway")
    else:
      result["shared"] = run_shared(args)
  if "continuous" in args.parts:
    result["continuous"] = run_continuous(args)
  if "bytes" in args.parts:
    # Idle rows and refills per step: Part 4a's schedule (run here if Part 4 was not).
    sched = result["continuous"]["schedule"] if "continuous" in result else run_schedule(args)
    result["bytes"] = run_bytes(args, 1 - sched["steady_slot_utilization"],
                                sched["samples"] / sched["decode_steps"])
    result["bytes"]["schedule"] = sched
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
      f"compile s: {x['compile_s']['ours']:.1f}   compiled variants after timing: "
      f"{x['compiles_after_timing']['ours']}",
  ]
  if "hf_attn_implementation" in x:
    lines.append(f"HF attention: {x['hf_attn_implementation']}  threads: {x['hf_threads']}")
  if "hf_skipped" in x:
    lines.append(f"HF skipped: {x['hf_skipped']}")
  lines.append(f"{'runner':<14}{'wall s: median [min-max]':>26}{'cpu s':>9}{'tokens/s':>10}"
               f"{'of bound':>10}")
  for name in ("ours", "hf", "hf_1thread"):
    if name in x:
      y = x[name]
      bound = f"{y['of_bound']:>10.1%}" if "of_bound" in y else f"{'':>10}"
      lines.append(f"{name:<14}{_fmt_spread(y['wall_s']):>26}{y['cpu_s']['median']:>9.2f}"
                   f"{y['tokens_per_s']:>10.1f}{bound}")
  if x["speedups"]:
    lines.append("ours over (ratio of tokens/s within each round, median [min-max]): " + ",  ".join(
        f"{k.split('/')[1]} {_fmt_spread(v, 'x')}" for k, v in x["speedups"].items()))
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
           f"{'K':>3}{'rows':>6}{'shared s/call':>24}{'ms/tok':>8}{'naive s/call':>24}"
           f"{'ms/tok':>8}{'naive/shared':>22}"]
  for row in s["rows"]:
    sh, nv = row["shared"], row.get("naive")
    line = (f"{row['k']:>3}{s['prompts'] * row['k']:>6}{_fmt_spread(sh['wall_s']):>24}"
            f"{sh['s_per_token'] * 1e3:>8.1f}")
    if nv:
      line += (f"{_fmt_spread(nv['wall_s']):>24}{nv['s_per_token'] * 1e3:>8.1f}"
               f"{_fmt_spread(row['naive/shared'], 'x'):>22}")
    else:
      line += f"{'(same call)':>24}{'':>8}{'1':>22}"
    lines.append(line)
  return lines


def _format_continuous(r: dict[str, Any]) -> list[str]:
  c = r["continuous"]
  s, m = c["schedule"], c["model"]
  return [
      f"Part 4: K={c['k']}  lengths lognormal(median {c['median']:.0f}, sigma {c['sigma']}) "
      f"clipped to [1, {c['max_len']}]  load {c['load_before']:.1f} -> {c['load_after']:.1f}",
      f"(a) schedule: {s['prompts']} prompts on {s['rows']} rows (refill {s['prefill_prompts']} "
      f"prompts at a time); lengths mean {s['mean_len']:.0f}, p50 {s['p50']:.0f}, "
      f"p90 {s['p90']:.0f}, {s['at_cap']:.1%} at the cap",
      f"    continuous: slot_utilization {s['slot_utilization']:.3f} (without the run's tail "
      f"{s['steady_slot_utilization']:.3f}), {s['decode_steps']} decode steps, "
      f"{s['decode_calls']} decode / {s['refill_calls']} refill calls",
      f"    static batches: slot_utilization {s['static_slot_utilization']:.3f}, "
      f"{s['static_steps']} decode steps",
      f"(b) preset={m['preset']}: {m['prompts']} prompts x {c['k']} on {m['rows']} rows, "
      f"{m['tokens']} tokens (mean {m['mean_len']:.0f}); slot_utilization continuous "
      f"{m['continuous_slot_utilization']:.3f}, static {m['static_slot_utilization']:.3f}",
      f"    continuous {_fmt_spread(m['continuous']['wall_s'], 's')} "
      f"({m['continuous']['tokens_per_s']:.0f} tokens/s), static "
      f"{_fmt_spread(m['static']['wall_s'], 's')} ({m['static']['tokens_per_s']:.0f} tokens/s); "
      f"continuous / static {_fmt_spread(m['continuous/static'], 'x')}"]


def _format_bytes(r: dict[str, Any]) -> list[str]:
  b = r["bytes"]
  a = b["analytic"]
  gb = lambda x: f"{x / 1e9:.2f} GB"
  cal = b["calibration"]
  lines = [f"Part 5: one decode step, TinyLlama shape (bf16), {b['rows']} rows, ring {b['ring']}, "
           f"compiled for {b['chips']} chip(s) of {b['topology']} ({b['device']}); per chip:"]
  for impl in ("dense", "ragged"):
    x = b[impl]
    lines.append(f"  {impl:<7} compiled: arguments {gb(x['argument_bytes'])}, temporaries "
                 f"{gb(x['temp_bytes'])}, XLA cost-model bytes {gb(x['xla_cost_bytes'])}; "
                 f"while loops {x['while_loops']}, all-gathers of the rows "
                 f"{x['row_all_gathers']}, cache-sized copies {x['cache_copies']}, in-place "
                 f"cache writes {x['cache_writes']}, kernel calls {x['kernel_calls']}")
  lines += [
      f"  XLA's cost model charges the dense attention {gb(b['dense_attention_xla_cost_bytes'])}"
      f" (dense - kernel step); the whole ring is {gb(b['whole_ring_bytes'])}; it charges one "
      f"MLP matmul {cal['xla_cost_bytes'] / 1e6:.0f} MB for {cal['operand_bytes'] / 1e6:.0f} MB "
      "of operands",
      "  E-step programs on one chip (ragged kernel; usable HBM " + gb(b["hbm_bytes"]) + "): "
      + ", ".join(
          f"{name} arguments {gb(x['argument_bytes'])} + temporaries {gb(x['temp_bytes'])} = "
          f"peak {gb(x['peak_bytes'])}" for name, x in b["programs"].items()),
      f"  analytic (mean context {a['mean_context']:.0f}, idle rows {a['idle_rows']:.1%}, "
      f"{a['refilled_rows_per_step']:.2f} rows refilled per step): weights {gb(a['weights'])}, "
      f"minimum {gb(a['minimum'])}, dense {gb(a['dense'])} ({a['dense/minimum']:.2f}x), "
      f"kernel {gb(a['kernel'])} ({a['kernel/minimum']:.2f}x; K/V fetched / filled "
      f"{a['kernel_kv_fetched_over_filled']:.2f})"]
  return lines


def format_table(r: dict[str, Any]) -> str:
  """Human-readable summary of `run`'s result."""
  lines = [f"{r['date']}  device={r['device']}  cpu={r['cpu']}  cores={r['cores']}  "
           f"load avg start={r['loadavg_start'][0]:.1f} end={r['loadavg_end'][0]:.1f}  "
           f"XLA_FLAGS={r['xla_flags'] or '(unset)'}",
           "versions: " + " ".join(f"{k}={v}" for k, v in r["versions"].items())]
  for key in ("generation_skipped", "shared_skipped"):
    if key in r:
      lines.append(f"{key}: {r[key]}")
  for key, fmt in (("generation", _format_generation), ("shared", _format_shared),
                   ("continuous", _format_continuous), ("bytes", _format_bytes)):
    if key in r:
      lines += [""] + fmt(r)
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  result = run(args)
  print(format_table(result), flush=True)
  if args.json:
    print(json.dumps(result, sort_keys=True, default=float), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
