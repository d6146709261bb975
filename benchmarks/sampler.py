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

`--prototype` (default on) adds a third runner: the same sampler with a prototype decode
function (`ProtoDecode`) that keeps one cache buffer and one parameter set per layer instead of
`nn.scan`'s stacked ones, so a decode step neither slices every weight out of the stacked
[L, ...] arrays nor copies the whole [L, B, S, K, Dh] cache. Its logits are checked against
`model.decode` before timing.

Part 2 (shared prompts). A prompt-heavy E-step shape (prompt 512, thought 128 tokens, the small
preset): B prompts x K samples through one call with `num_samples=K` (prefill once per prompt)
vs the naive B*K repeated prompts with `num_samples=1`.

Part 3 (memory-bandwidth bound). A decode step must read every weight and the filled KV cache,
so tokens/s <= rows / (bytes per step / bandwidth). The bandwidth is a measured large copy (or
`--mem_bw_gbps`); the bound ignores prefill, so the ratio understates decode efficiency a little.

  python benchmarks/sampler.py --preset=tiny
  python benchmarks/sampler.py --preset=small --batch=8 --skip_shared --json
  python benchmarks/sampler.py --preset=tinyllama --batch=128 --prompt_len=512 --gen_len=256 \\
      --skip_hf --skip_shared --mem_bw_gbps=3350            # GPU (H100 SXM: 3.35 TB/s)

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
  p.add_argument("--prototype", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the sampler with the per-layer prototype decode")
  p.add_argument("--skip_hf", action="store_true", help="do not run Hugging Face generate")
  p.add_argument("--skip_shared", action="store_true", help="skip part 2")
  p.add_argument("--shared_preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--shared_prompts", type=int, default=2, help="prompts per call (part 2)")
  p.add_argument("--shared_prompt_len", type=int, default=512)
  p.add_argument("--shared_gen_len", type=int, default=128)
  p.add_argument("--shared_k", default="1,4,8", help="samples per prompt (part 2)")
  p.add_argument("--shared_runs", type=int, default=3, help="timed rounds per K (part 2)")
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


# ----------------------------------------------------------------------------- prototype decode


def unroll_layers(params: Any, n_layers: int) -> Any:
  """The scanned params tree with 'layers' turned into a tuple of per-layer trees."""
  out = {k: v for k, v in params.items() if k != "layers"}
  out["layers"] = tuple(jax.tree.map(lambda x, i=i: x[i], params["layers"])
                        for i in range(n_layers))
  return out


class ProtoDecode:
  """`model.decode` over per-layer parameters and per-layer caches ([N, S, K, Dh] each, batch
  axis 0), built from the model's own `Block` and `RMSNorm` so the arithmetic is the same.

  Inside the sampler's while loop each layer's cache is its own loop-carried buffer, so XLA
  updates it in place; `nn.scan` instead slices each layer's weights out of the stacked arrays
  and stacks a fresh [L, N, S, K, Dh] cache on every step.
  """

  cache_batch_axis = 0

  def __init__(self, cfg: model.ModelConfig):
    self.cfg = cfg

  def init_cache(self, batch: int, max_len: int) -> tuple[dict[str, jax.Array], ...]:
    cfg = self.cfg
    shape = (batch, max_len, cfg.n_kv_heads, cfg.hd)
    return tuple({"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
                 for _ in range(cfg.n_layers))

  def __call__(self, params: Any, tokens: jax.Array, cache: tuple, cache_index: jax.Array):
    cfg = self.cfg
    t = tokens.shape[1]
    slots = cache_index[:, None] + jnp.arange(t)[None, :]
    table = params["embed"]["embedding"]
    x = jnp.take(table.astype(cfg.compute_dtype), tokens, axis=0)
    new_cache = []
    for layer_params, layer_cache in zip(params["layers"], cache):
      x, c = model.Block(cfg).apply({"params": layer_params}, x, layer_cache, slots, slots,
                                    None, None, cache_index)
      new_cache.append(c)
    x = model.RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, table.astype(cfg.compute_dtype))
    else:
      logits = jnp.einsum("btd,dv->btv", x, params["lm_head"]["kernel"].astype(cfg.compute_dtype))
    return logits.astype(jnp.float32), tuple(new_cache)


class ProtoDecodeKV(ProtoDecode):
  """ProtoDecode with the cache stored [N, K, S, Dh] (kv heads before slots) and attention
  written out here, so the score and value einsums read the cache in the layout the matmul wants.

  `model.Attention` keeps [N, S, K, Dh], and XLA transposes each layer's whole K and V cache on
  every step to feed the batched (n, k) matmuls.
  """

  def init_cache(self, batch: int, max_len: int) -> tuple[dict[str, jax.Array], ...]:
    cfg = self.cfg
    shape = (batch, cfg.n_kv_heads, max_len, cfg.hd)
    return tuple({"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
                 for _ in range(cfg.n_layers))

  def _attention(self, p: Any, x_BTD: jax.Array, cache: dict[str, jax.Array], slots_BT: jax.Array,
                 cache_index_B: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    dt, h, k, dh = cfg.compute_dtype, cfg.n_heads, cfg.n_kv_heads, cfg.hd
    b, t, _ = x_BTD.shape
    q_BTHD = jnp.einsum("btd,dhe->bthe", x_BTD, p["q_proj"]["kernel"].astype(dt))
    k_BTKD = jnp.einsum("btd,dke->btke", x_BTD, p["k_proj"]["kernel"].astype(dt))
    v_BTKD = jnp.einsum("btd,dke->btke", x_BTD, p["v_proj"]["kernel"].astype(dt))
    inv_freq = model.rope_frequencies(cfg)
    q_BTHD = model.apply_rope(q_BTHD, slots_BT, inv_freq)
    k_BTKD = model.apply_rope(k_BTKD, slots_BT, inv_freq)
    write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new, (0, i, 0)))
    keys = write(cache["k"], k_BTKD.transpose(0, 2, 1, 3).astype(cache["k"].dtype), cache_index_B)
    values = write(cache["v"], v_BTKD.transpose(0, 2, 1, 3).astype(cache["v"].dtype),
                   cache_index_B)
    q_BTKGD = q_BTHD.reshape(b, t, k, h // k, dh)
    logits = jnp.einsum("btkgd,bksd->bkgts", q_BTKGD, keys.astype(dt)).astype(jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(dh))
    mask_BTS = jnp.arange(keys.shape[2])[None, None, :] <= slots_BT[:, :, None]
    logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out_BTHD = jnp.einsum("bkgts,bksd->btkgd", probs, values.astype(dt)).reshape(b, t, h, dh)
    out = jnp.einsum("bthe,hed->btd", out_BTHD, p["o_proj"]["kernel"].astype(dt))
    return out, {"k": keys, "v": values}

  def _block(self, p: Any, x: jax.Array, cache: dict[str, jax.Array], slots: jax.Array,
             cache_index: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    dt = cfg.compute_dtype
    norm = model.RMSNorm(cfg)
    attn, cache = self._attention(p["attn"], norm.apply({"params": p["attn_norm"]}, x), cache,
                                  slots, cache_index)
    x = x + attn
    y = norm.apply({"params": p["mlp_norm"]}, x)
    m = p["mlp"]
    hidden = (jax.nn.silu(y @ m["gate_proj"]["kernel"].astype(dt))
              * (y @ m["up_proj"]["kernel"].astype(dt)))
    return x + hidden @ m["down_proj"]["kernel"].astype(dt), cache

  def __call__(self, params: Any, tokens: jax.Array, cache: tuple, cache_index: jax.Array):
    cfg = self.cfg
    slots = cache_index[:, None] + jnp.arange(tokens.shape[1])[None, :]
    table = params["embed"]["embedding"]
    x = jnp.take(table.astype(cfg.compute_dtype), tokens, axis=0)
    new_cache = []
    for layer_params, layer_cache in zip(params["layers"], cache):
      x, c = self._block(layer_params, x, layer_cache, slots, cache_index)
      new_cache.append(c)
    x = model.RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, table.astype(cfg.compute_dtype))
    else:
      logits = jnp.einsum("btd,dv->btv", x, params["lm_head"]["kernel"].astype(cfg.compute_dtype))
    return logits.astype(jnp.float32), tuple(new_cache)


def check_proto(cfg: model.ModelConfig, params: Any, proto_params: Any, proto: ProtoDecode,
                prompts: jax.Array) -> float:
  """Max |logit difference| between model.decode and ProtoDecode on a prefill + one step."""
  b, p = prompts.shape
  zeros = jnp.zeros((b,), jnp.int32)
  ref, ref_cache = model.decode(cfg, params, prompts, model.init_cache(cfg, b, p + 1), zeros)
  got, got_cache = proto(proto_params, prompts, proto.init_cache(b, p + 1), zeros)
  nxt = prompts[:, :1]
  ref2, _ = model.decode(cfg, params, nxt, ref_cache, zeros + p)
  got2, _ = proto(proto_params, nxt, got_cache, zeros + p)
  return float(max(jnp.max(jnp.abs(ref - got)), jnp.max(jnp.abs(ref2 - got2))))


# ----------------------------------------------------------------------------- runners


class JaxRunner:
  """One `Sampler` call on fixed prompts; compiled by the first (untimed) call."""

  def __init__(self, name: str, decode_fn: Callable, init_cache: Callable, params: Any,
               prompts: np.ndarray, gen_len: int, num_samples: int = 1,
               cache_batch_axis: int = 1):
    self.name = name
    self.smp = sampler_lib.Sampler(decode_fn, init_cache,
                                   sampler_lib.SamplingConfig(temperature=1.0,
                                                              max_gen_len=gen_len),
                                   cache_batch_axis=cache_batch_axis)
    self.params = params
    self.prompts = jnp.asarray(prompts)
    self.lens = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    self.num_samples = num_samples
    self.generated = prompts.shape[0] * num_samples * gen_len
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
    self.generated = prompts.shape[0] * gen_len
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


def time_rounds(runners: list, rounds: int) -> dict[str, list[float]]:
  """Seconds per call for each runner, the runners interleaved round by round."""
  out: dict[str, list[float]] = {r.name: [] for r in runners}
  for _ in range(rounds):
    for r in runners:
      t0 = time.perf_counter()
      r.run()
      out[r.name].append(time.perf_counter() - t0)
  return out


def _spread(xs: list[float]) -> dict[str, float]:
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(FIRST_TOKEN, vocab, (batch, length)).astype(np.int32)


def init_params(cfg: model.ModelConfig) -> Any:
  params = jax.jit(lambda r: model.init_params(cfg, r))(jax.random.key(0))
  # Inference presets store weights in the compute dtype (half the bytes a decode step reads).
  return jax.tree.map(lambda x: x.astype(cfg.params_dtype), params)


# ----------------------------------------------------------------------------- part 1


def run_generation(args: argparse.Namespace, cfg: model.ModelConfig, backend: str,
                   cores: int) -> dict[str, Any]:
  """Part 1: tokens/s of our sampler (and prototype) vs HF generate, alternating rounds."""
  b, p, g = args.batch, args.prompt_len, args.gen_len
  res: dict[str, Any] = {"batch": b, "prompt_len": p, "gen_len": g, "runs": args.runs,
                         "params": model.param_count(cfg)}
  params = init_params(cfg)
  prompts = random_prompts(b, p, cfg.vocab_size)
  runners: list = [JaxRunner("ours", functools.partial(model.decode, cfg),
                             functools.partial(model.init_cache, cfg), params, prompts, g)]
  if args.prototype:
    proto = ProtoDecode(cfg)
    proto_params = unroll_layers(params, cfg.n_layers)
    res["proto_max_abs_logit_diff"] = check_proto(cfg, params, proto_params, proto,
                                                  jnp.asarray(prompts[:2, :16]))
    runners.append(JaxRunner("proto", proto, proto.init_cache, proto_params, prompts, g))
  res["compile_s"] = {r.name: r.compile_s for r in runners}

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

  tokens = b * g
  for r in runners:
    res[r.name] = {"seconds": _spread(times[r.name]),
                   "tokens_per_s": tokens / statistics.median(times[r.name])}
  hf_names = [n for n in ("hf", "hf_1thread") if n in times]
  for mine in [r.name for r in runners if isinstance(r, JaxRunner)]:
    for other in hf_names:
      ratios = [t_hf / t_me for t_me, t_hf in zip(times[mine], times[other])]
      res[f"{mine}_over_{other}"] = _spread(ratios)
    if hf_names:
      # Per round, against whichever HF setting was faster in that round.
      best = [min(times[n][i] for n in hf_names) for i in range(args.runs)]
      res[f"{mine}_over_hf_best"] = _spread([t / m for m, t in zip(times[mine], best)])
  if "proto" in times:
    res["proto_over_ours"] = _spread([a / b_ for a, b_ in zip(times["ours"], times["proto"])])

  bw = args.mem_bw_gbps * 1e9 if args.mem_bw_gbps else copy_bandwidth(backend)
  step_bytes = decode_bytes_per_step(cfg, b, p + g / 2)
  res["mem_bw_gbps"] = bw / 1e9
  res["mem_bw_source"] = "--mem_bw_gbps" if args.mem_bw_gbps else "measured copy"
  res["decode_bytes_per_step"] = step_bytes
  res["bound_tokens_per_s"] = b * bw / step_bytes
  for r in runners:
    if isinstance(r, JaxRunner):
      res[r.name]["of_bound"] = res[r.name]["tokens_per_s"] / res["bound_tokens_per_s"]
  del hf_model
  return res


# ----------------------------------------------------------------------------- part 2


def run_shared(args: argparse.Namespace) -> dict[str, Any]:
  """Part 2: B prompts x K samples, shared prompt cache vs K-fold repeated prompts."""
  cfg = PRESETS[args.shared_preset].model
  b, p, g = args.shared_prompts, args.shared_prompt_len, args.shared_gen_len
  res: dict[str, Any] = {"preset": args.shared_preset, "prompts": b, "prompt_len": p,
                         "gen_len": g, "runs": args.shared_runs, "rows": {}}
  params = init_params(cfg)
  prompts = random_prompts(b, p, cfg.vocab_size, seed=1)
  decode = functools.partial(model.decode, cfg)
  cache = functools.partial(model.init_cache, cfg)

  # Prefill alone, to show what the naive layout repeats.
  prefill = jax.jit(lambda prm, toks: decode(prm, toks, cache(toks.shape[0], p + g),
                                             jnp.zeros((toks.shape[0],), jnp.int32))[0])
  res["load_before"] = _load()
  for k in args.shared_k:
    runners = [JaxRunner("shared", decode, cache, params, prompts, g, num_samples=k)]
    if k > 1:
      runners.append(JaxRunner("naive", decode, cache, params, np.repeat(prompts, k, axis=0), g))
    jax.block_until_ready(prefill(params, jnp.asarray(prompts)))
    times = time_rounds(runners, args.shared_runs)
    prefill_s = []
    for _ in range(args.shared_runs):
      t0 = time.perf_counter()
      jax.block_until_ready(prefill(params, jnp.asarray(prompts)))
      prefill_s.append(time.perf_counter() - t0)
    row: dict[str, Any] = {"k": k, "generated": b * k * g,
                           "prefill_s": statistics.median(prefill_s)}
    for r in runners:
      row[r.name] = {"seconds": _spread(times[r.name]),
                     "s_per_token": statistics.median(times[r.name]) / (b * k * g)}
    if k > 1:
      row["naive_over_shared"] = _spread([n / s for s, n in zip(times["shared"], times["naive"])])
    res["rows"][str(k)] = row
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
                            "xla_flags": os.environ.get("XLA_FLAGS", "")}
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
      result["shared_skipped"] = f"--shared_preset={args.shared_preset} is GPU-only"
    else:
      result["shared"] = run_shared(args)
  result["loadavg_end"] = list(os.getloadavg())
  return result


def _fmt_spread(s: dict[str, float], unit: str = "") -> str:
  return f"{s['median']:.3f}{unit} [{s['min']:.3f}-{s['max']:.3f}]"


def format_table(r: dict[str, Any]) -> str:
  lines = [f"device={r['device']}  cpu={r['cpu']}  cores={r['cores']}  "
           f"load avg start={r['loadavg_start'][0]:.1f} end={r['loadavg_end'][0]:.1f}  "
           f"XLA_FLAGS={r['xla_flags'] or '(unset)'}",
           "versions: " + " ".join(f"{k}={v}" for k, v in r["versions"].items())]
  if "generation_skipped" in r:
    lines.append(f"[{r['preset']}] generation skipped: {r['generation_skipped']}")
  if "generation" in r:
    x = r["generation"]
    lines += [
        "",
        f"Part 1: preset={r['preset']} ({x['params'] / 1e6:.2f}M params)  batch={x['batch']}  "
        f"prompt={x['prompt_len']}  gen={x['gen_len']}  rounds={x['runs']}  "
        f"load {x['load_before']:.1f} -> {x['load_after']:.1f}",
        "compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in x["compile_s"].items())
        + "   compiled variants after timing: "
        + ", ".join(f"{k} {v}" for k, v in x["compiles_after_timing"].items()),
    ]
    if "proto_max_abs_logit_diff" in x:
      lines.append(f"prototype decode vs model.decode: max |logit diff| "
                   f"{x['proto_max_abs_logit_diff']:.2e}")
    if "hf_attn_implementation" in x:
      lines.append(f"HF attention: {x['hf_attn_implementation']}  threads: {x['hf_threads']}")
    if "hf_skipped" in x:
      lines.append(f"HF skipped: {x['hf_skipped']}")
    lines.append(f"{'runner':<12}{'median s':>10}{'min s':>9}{'max s':>9}{'tokens/s':>11}"
                 f"{'of bound':>10}")
    for name in ("ours", "proto", "hf", "hf_1thread"):
      if name in x:
        y = x[name]
        bound = f"{y['of_bound']:>10.1%}" if "of_bound" in y else f"{'':>10}"
        lines.append(f"{name:<12}{y['seconds']['median']:>10.3f}{y['seconds']['min']:>9.3f}"
                     f"{y['seconds']['max']:>9.3f}{y['tokens_per_s']:>11.1f}{bound}")
    for key in sorted(k for k in x if "_over_" in k):
      lines.append(f"{key}: {_fmt_spread(x[key], 'x')}  (median [min-max] over rounds)")
    lines.append(f"memory-bandwidth bound: {x['bound_tokens_per_s']:.0f} tokens/s "
                 f"({x['decode_bytes_per_step'] / 1e6:.1f} MB/step at "
                 f"{x['mem_bw_gbps']:.1f} GB/s, {x['mem_bw_source']})")
  if "shared_skipped" in r:
    lines.append(f"Part 2 skipped: {r['shared_skipped']}")
  if "shared" in r:
    s = r["shared"]
    lines += ["",
              f"Part 2: preset={s['preset']}  prompts={s['prompts']}  prompt={s['prompt_len']}  "
              f"gen={s['gen_len']}  rounds={s['runs']}  load {s['load_before']:.1f} -> "
              f"{s['load_after']:.1f}",
              f"{'K':>3}{'rows':>6}{'prefill s':>11}{'shared s/call':>15}{'ms/token':>10}"
              f"{'naive s/call':>14}{'ms/token':>10}{'naive/shared':>24}"]
    for row in s["rows"].values():
      n = row.get("naive")
      lines.append(
          f"{row['k']:>3}{s['prompts'] * row['k']:>6}{row['prefill_s']:>11.3f}"
          f"{row['shared']['seconds']['median']:>15.3f}{row['shared']['s_per_token'] * 1e3:>10.2f}"
          + (f"{n['seconds']['median']:>14.3f}{n['s_per_token'] * 1e3:>10.2f}"
             f"{_fmt_spread(row['naive_over_shared'], 'x'):>24}" if n else
             f"{'(same call)':>14}{'':>10}{'1':>24}"))
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
