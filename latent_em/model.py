"""Llama-family decoder in Flax: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Shapes use the suffix convention B=batch, T=query length, S=key/cache length, D=model dim,
H=query heads, K=kv heads, G=H/K, Dh=head dim, F=mlp dim, V=vocab, L=layers.

Every parameter and key activation carries logical axis names; `sharding.py` maps them onto mesh
axes. Parameters are stored in `param_dtype` (fp32), computed in `dtype` (bf16 on accelerators),
and logits/softmax are fp32.

Attention over a whole sequence (causal, within packed segments) is `attention.py`; cached
decoding (the KV cache, its writes and attention over it) is `kv_cache.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_em import attention, config_lib, kv_cache

Array = jax.Array
Cache = kv_cache.Cache


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama architecture hyperparameters (config.model)."""
  vocab_size: int = 512
  dim: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 0                 # 0: dim // n_heads
  mlp_dim: int = 384
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None  # Llama-3 style {"rope_type": "llama3", ...} or None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = "float32"            # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  remat: Literal["none", "full", "dots"] = "none"
  scan_layers: bool = True
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim"):
      config_lib.check(getattr(self, name) > 0, f"config.model.{name}", "must be positive")
    config_lib.check(self.n_heads % self.n_kv_heads == 0, "config.model.n_kv_heads",
                     f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    config_lib.check(self.head_dim > 0 or self.dim % self.n_heads == 0, "config.model.head_dim",
                     f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
    config_lib.check(self.hd % 2 == 0, "config.model.head_dim", "RoPE needs an even head dim")
    for name in ("dtype", "param_dtype"):
      config_lib.check(getattr(self, name) in ("float32", "bfloat16", "float16"),
                       f"config.model.{name}", "use float32, bfloat16 or float16")

  @property
  def hd(self) -> int:
    return self.head_dim or self.dim // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)


def _init(cfg: ModelConfig, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


def rope_frequencies(cfg: ModelConfig) -> Array:
  """Inverse frequencies [Dh/2], with optional Llama-3 long-context scaling."""
  dh = cfg.hd
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  scaling = cfg.rope_scaling
  if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = jnp.where(wavelen > low_wavelen, inv_freq / factor,
                         jnp.where(wavelen < high_wavelen, inv_freq, smoothed))
  elif scaling:
    raise config_lib.ConfigError(
        f"config.model.rope_scaling={scaling!r}: only rope_type 'llama3' is supported")
  return inv_freq


def apply_rope(x_BTND: Array, positions_BT: Array, inv_freq: Array) -> Array:
  """Rotary embedding in the Hugging Face (rotate-half) layout, computed in fp32."""
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x = x_BTND.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BTND.dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.cfg.params_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (scale.astype(self.cfg.compute_dtype) * x32.astype(self.cfg.compute_dtype))


class Dense(nn.Module):
  """Bias-free projection contracting the last `in_dims` axes of x with a kernel of shape
  x.shape[-in_dims:] + features.

  The kernel is created at its full rank (e.g. q_proj [D, H, Dh]), so each of its axes carries
  its own logical name and the rules table can shard heads and embedding independently.
  Parameters are cast to the compute dtype for the matmul.
  """
  cfg: ModelConfig
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_dims: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    shape = tuple(x.shape[-self.in_dims:]) + tuple(self.features)
    kernel = self.param("kernel", _init(cfg, self.kernel_axes), shape, cfg.params_dtype)
    dt = cfg.compute_dtype
    contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
    return jax.lax.dot_general(x.astype(dt), kernel.astype(dt), (contract, ((), ())))


def _dense(cfg, features, in_dims, kernel_axes, name):
  features = (features,) if isinstance(features, int) else tuple(features)
  return Dense(cfg, features, kernel_axes, in_dims, name=name)


class Embed(nn.Module):
  """Token embedding table [V, D] ("vocab", "embed"); `attend` is the tied output projection."""
  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param("embedding", _init(self.cfg, ("vocab", "embed")),
                                (self.cfg.vocab_size, self.cfg.dim), self.cfg.params_dtype)

  def __call__(self, tokens_BT: Array) -> Array:
    # The lookup reads a table whose embedding dim is gathered first (as FSDP gathers every
    # weight): a lookup into a table split along D would instead gather every device's token ids,
    # i.e. the global batch.
    table = _constrain(self.embedding.astype(self.cfg.compute_dtype), ("vocab", None))
    return jnp.take(table, tokens_BT, axis=0)

  def attend(self, x_BTD: Array) -> Array:
    dt = self.cfg.compute_dtype
    return jnp.einsum("btd,vd->btv", x_BTD.astype(dt), self.embedding.astype(dt))


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache: Cache | None,
               window: kv_cache.Window | None):
    cfg = self.cfg
    h, k, dh = cfg.n_heads, cfg.n_kv_heads, cfg.hd
    q_BTHD = _dense(cfg, (h, dh), 1, ("embed", "q_heads", "kv"), "q_proj")(x_BTD)
    k_BTKD = _dense(cfg, (k, dh), 1, ("embed", "kv_heads", "kv"), "k_proj")(x_BTD)
    v_BTKD = _dense(cfg, (k, dh), 1, ("embed", "kv_heads", "kv"), "v_proj")(x_BTD)
    inv_freq = rope_frequencies(cfg)
    q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq)
    k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq)
    q_BTHD = _constrain(q_BTHD, ("activation_batch", "activation_length", "activation_heads",
                                 "activation_kv"))

    if cache is None:
      out_BTHD = attention.attend(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, cfg.compute_dtype)
      new_cache = None
    else:
      out_BTHD, new_cache = kv_cache.update_and_attend(q_BTHD, k_BTKD, v_BTKD, cache, window,
                                                       _constrain, cfg.compute_dtype)
    out = _dense(cfg, cfg.dim, 2, ("q_heads", "kv", "embed"), "o_proj")(out_BTHD)
    return out, new_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    gate = _dense(cfg, cfg.mlp_dim, 1, ("embed", "mlp"), "gate_proj")(x_BTD)
    up = _dense(cfg, cfg.mlp_dim, 1, ("embed", "mlp"), "up_proj")(x_BTD)
    hidden = _constrain(nn.silu(gate) * up, ("activation_batch", "activation_length",
                                             "activation_mlp"))
    return _dense(cfg, cfg.dim, 1, ("mlp", "embed"), "down_proj")(hidden)


class Block(nn.Module):
  """One pre-norm decoder layer. Signature fits nn.scan: (carry, per-layer cache, *broadcast)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, cache, positions_BT, segment_ids_BT, window):
    act_axes = ("activation_batch", "activation_length", "activation_embed")
    x_BTD = _constrain(x_BTD, act_axes)
    attn_out, new_cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_BTD), positions_BT, segment_ids_BT, cache, window)
    x_BTD = x_BTD + attn_out
    x_BTD = x_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BTD))
    return _constrain(x_BTD, act_axes), new_cache


class Transformer(nn.Module):
  """Decoder-only LM over whole sequences. Returns logits [B, T, V] fp32.

  Cached decoding (`decode`) runs the same Blocks one layer at a time over per-layer caches.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segment_ids_BT: Array | None = None):
    cfg = self.cfg
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))

    embed = Embed(cfg, name="embed")
    x_BTD = embed(tokens_BT)

    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                if cfg.remat == "dots" else None)
      block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
    broadcast = (positions_BT, segment_ids_BT, None)
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0,) + (nn.broadcast,) * 3, length=cfg.n_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
      x_BTD, _ = layers(x_BTD, None, *broadcast)
    else:
      for i in range(cfg.n_layers):
        x_BTD, _ = block(cfg, name=f"layers_{i}")(x_BTD, None, *broadcast)

    x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
    if cfg.tie_embeddings:
      logits = embed.attend(x_BTD)
    else:
      logits = _dense(cfg, cfg.vocab_size, 1, ("embed", "vocab"), "lm_head")(x_BTD)
    return _constrain(logits.astype(jnp.float32),
                      ("activation_batch", "activation_length", "activation_vocab"))


# ----------------------------------------------------------------------------- functional API


def init_params(cfg: ModelConfig, rng: Array, boxed: bool = False) -> Any:
  """Random parameters. `boxed=True` keeps flax's LogicallyPartitioned metadata."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = Transformer(cfg).init(rng, tokens)["params"]
  return params if boxed else nn.unbox(params)


def logical_axes(cfg: ModelConfig) -> Any:
  """PartitionSpec tree of logical axis names, matching `init_params`' structure."""
  boxed = jax.eval_shape(functools.partial(init_params, cfg, boxed=True), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def forward(cfg: ModelConfig, params: Any, tokens: Array, positions: Array | None = None,
            segment_ids: Array | None = None) -> Array:
  """Logits of a full forward pass: int32 [B, T] -> float32 [B, T, V].

  `positions` (RoPE positions) and `segment_ids` (packed documents; 0 = padding) default to
  0..T-1 and one segment.
  """
  return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
  """Zeroed ring KV cache (`kv_cache.init_cache`): one {"k", "v"} per layer, each [B, S, K * Dh]."""
  return kv_cache.init_cache(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.hd,
                             dtype or cfg.compute_dtype)


CACHE_AXES = kv_cache.CACHE_AXES


def cache_partition_specs(cfg: ModelConfig) -> Cache:
  """PartitionSpecs of logical axis names matching `init_cache`'s structure."""
  return kv_cache.partition_specs(cfg.n_layers)


def layer_params(cfg: ModelConfig, params: Any) -> list[Any]:
  """Per-layer parameter trees, from scanned ("layers", stacked [L, ...]) or unscanned params."""
  if "layers" in params:
    return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.n_layers)]
  return [params[f"layers_{i}"] for i in range(cfg.n_layers)]


def decode_params(cfg: ModelConfig, params: Any) -> Any:
  """The parameters as cached decoding reads them: one tree per layer ("layers_i") and every
  leaf in the compute dtype.

  A decode step then reads each weight once at the width it computes in, and never slices a
  layer out of the stacked [L, ...] arrays (on CPU that copy cost ~10x the step itself;
  docs/benchmarks.md). `sampler.place_params` makes this copy once on the device; dropping the
  original leaves a single one. Idempotent: already-prepared params come back unchanged.
  """
  dt = cfg.compute_dtype
  out = {k: v for k, v in params.items() if k != "layers"}
  for i, p in enumerate(layer_params(cfg, params)):
    out[f"layers_{i}"] = p
  return jax.tree.map(lambda x: x.astype(dt), out)


def decode_logical_axes(cfg: ModelConfig) -> Any:
  """PartitionSpec tree of logical axis names matching `decode_params`' structure."""
  return logical_axes(dataclasses.replace(cfg, scan_layers=False))


def _decode_layers(cfg: ModelConfig, params: Any, tokens: Array, cache: Cache,
                   window: kv_cache.Window, positions: Array) -> tuple[Array, Cache]:
  """Embedding and the Blocks, one layer after another over its own cache -> (x [B, T, D], cache).

  Layers are not an nn.scan: a decode step then neither slices weights out of stacked arrays nor
  re-stacks the whole cache (measured 2x faster decoding; docs/benchmarks.md).
  """
  x = Embed(cfg).apply({"params": params["embed"]}, tokens)
  new_cache = []
  for p, layer_cache in zip(layer_params(cfg, params), cache):
    x, c = Block(cfg).apply({"params": p}, x, layer_cache, positions, None, window)
    new_cache.append(c)
  return RMSNorm(cfg).apply({"params": params["final_norm"]}, x), tuple(new_cache)


def _output_logits(cfg: ModelConfig, params: Any, x: Array) -> Array:
  dt = cfg.compute_dtype
  if cfg.tie_embeddings:
    logits = jnp.einsum("...d,vd->...v", x, params["embed"]["embedding"].astype(dt))
  else:
    logits = jnp.einsum("...d,dv->...v", x, params["lm_head"]["kernel"].astype(dt))
  return logits.astype(jnp.float32)


def prefill(cfg: ModelConfig, params: Any, tokens: Array, lengths: Array
            ) -> tuple[Array, Cache]:
  """Prompts -> (logits of each prompt's next token [B, V] fp32, their cache [B, T, K * Dh]).

  `tokens` [B, T] are LEFT-padded: row b's prompt is its last lengths[b] tokens, at positions
  0..lengths[b]-1. The cache holds exactly the T slots (prompts end at slot T - 1);
  `kv_cache.insert` copies it into decoding rows of a ring.
  """
  t = tokens.shape[1]
  window = kv_cache.prefill_window(lengths, t)
  positions = window.context[:, None] + jnp.arange(t)[None, :]
  x, cache = _decode_layers(cfg, params, tokens, kv_cache.prefill_cache(cfg.n_layers), window,
                            positions)
  logits = _output_logits(cfg, params, x[:, -1])
  return _constrain(logits, ("activation_batch", "activation_vocab")), cache


def decode(cfg: ModelConfig, params: Any, tokens: Array, cache: Cache, window: kv_cache.Window,
           positions: Array | None = None) -> tuple[Array, Cache]:
  """Cached step: tokens [B, T] enter the ring at slots window.head.. -> (logits [B, T, V], cache).

  Row b attends over its `window.context[b]` cached tokens and the new ones (kv_cache.py).
  `positions` (RoPE) default to context[b] + 0..T-1, i.e. the row's tokens are numbered from 0.
  Any params layout works; `decode_params` is the one a decode loop should hold.
  """
  t = tokens.shape[1]
  if positions is None:
    positions = window.context[:, None] + jnp.arange(t)[None, :]
  x, new_cache = _decode_layers(cfg, params, tokens, cache, window, positions)
  logits = _constrain(_output_logits(cfg, params, x),
                      ("activation_batch", "activation_length", "activation_vocab"))
  return logits, new_cache


def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
  d, f, h, k, dh, v = cfg.dim, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.vocab_size
  per_layer = d * dh * (2 * h + 2 * k) + 3 * d * f + 2 * d
  total = cfg.n_layers * per_layer + d
  if include_embedding:
    total += v * d * (1 if cfg.tie_embeddings else 2)
  return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (6N for matmuls incl. lm head, plus attention)."""
  d, f, h, k, dh, v = cfg.dim, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.vocab_size
  matmul_params = cfg.n_layers * (d * dh * (2 * h + 2 * k) + 3 * d * f) + v * d
  attention = cfg.n_layers * 2 * 2 * h * dh * seq_len / 2  # causal: half the QK^T and PV work
  return 6 * matmul_params + 3 * attention
