"""Import and export of Hugging Face Llama checkpoints (config.json + *.safetensors).

`load_llama` turns a HF Llama-architecture checkpoint (TinyLlama, Llama-2/3: MHA or GQA, tied or
untied embeddings, optional Llama-3 RoPE scaling) into a `ModelConfig` and a host-side fp32
params tree in `latent_em.model`'s layout; `save_llama` writes such a tree back so that
`transformers.LlamaForCausalLM.from_pretrained` loads it. torch is not needed for either.

Layout: a HF Linear weight is [out, in]; our kernels are [in, *out]:
  q_proj.weight [H*Dh, D] -> [D, H, Dh]     k_proj / v_proj [K*Dh, D] -> [D, K, Dh]
  o_proj.weight [D, H*Dh] -> [H, Dh, D]     gate / up [F, D] -> [D, F]    down [D, F] -> [F, D]
  lm_head.weight [V, D] -> [D, V]           embed_tokens [V, D] and norm weights as they are.
All of these are `ours = W.T.reshape(our_shape)` and `W = ours.reshape(hf_shape[::-1]).T`.
Head h of q_proj is query head h, which uses kv head h // (H / K) in both codebases.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping

import flax.linen as nn
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from latent_em import config_lib
from latent_em.model import ModelConfig

Params = dict[str, Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_SAVE_DTYPES = ("float32", "bfloat16", "float16")
_SUPPORTED_MODEL_TYPES = ("llama",)


# ----------------------------------------------------------------------------- config


def _config_error(path: str, key: str, message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f"{path}: key {key!r} {message}")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """The parsed config.json of a HF checkpoint directory, with clear errors if it is missing."""
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(
        f"Hugging Face checkpoint directory {hf_dir!r} does not exist; expected a directory "
        f"with {CONFIG_NAME} and {WEIGHTS_NAME} (or sharded *.safetensors + {INDEX_NAME}), "
        "e.g. from `huggingface-cli download TinyLlama/TinyLlama_v1.1 --local-dir DIR`")
  path = os.path.join(hf_dir, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: a Hugging Face Llama checkpoint directory needs its {CONFIG_NAME} "
        f"next to the *.safetensors weights")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f"{path}: not valid JSON ({e})") from None


def _rope_settings(hf: Mapping[str, Any], path: str) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling for ModelConfig) from either config.json dialect.

  transformers < 5 writes `rope_theta` + `rope_scaling`; transformers >= 5 writes one
  `rope_parameters` dict holding `rope_theta` and `rope_type`.
  """
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping):
    key = "rope_parameters"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(params)
  else:
    key = "rope_scaling"
    theta = hf.get("rope_theta", 10000.0)
    scaling = dict(hf.get("rope_scaling") or {})
  scaling.pop("rope_theta", None)
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise _config_error(path, key, f"has rope_type={rope_type!r}; only 'default' and 'llama3' "
                        "RoPE are supported")
  needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in needed if k not in scaling]
  if missing:
    raise _config_error(path, key, f"is missing {missing} required by llama3 RoPE scaling")
  out = {"rope_type": "llama3"}
  out.update({k: float(scaling[k]) for k in needed[:3]})
  out["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
  return float(theta), out


def config_from_hf(hf: Mapping[str, Any], *, extra_vocab: int = 0, dtype: str = "float32",
                   scan_layers: bool = True, path: str = CONFIG_NAME) -> ModelConfig:
  """ModelConfig for a HF Llama config dict; `path` names the file in error messages.

  vocab_size is the checkpoint's plus `extra_vocab`. Parameters are fp32; `dtype` is the
  compute dtype.
  """
  model_type = hf.get("model_type")
  if model_type not in _SUPPORTED_MODEL_TYPES:
    raise _config_error(path, "model_type", f"is {model_type!r}; only Llama-architecture "
                        f"checkpoints (model_type {list(_SUPPORTED_MODEL_TYPES)}) are supported")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      raise _config_error(path, key, "is true; Llama layers with biases are not supported")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise _config_error(path, "hidden_act", f"is {act!r}; only 'silu' (SwiGLU) is supported")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if not isinstance(hf.get(key), int):
      raise _config_error(path, key, f"is {hf.get(key)!r}; expected a positive integer")
  if extra_vocab < 0:
    raise ValueError(f"extra_vocab={extra_vocab} must be >= 0")
  theta, scaling = _rope_settings(hf, path)
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or 0
  if head_dim == hf["hidden_size"] // n_heads and hf["hidden_size"] % n_heads == 0:
    head_dim = 0  # the default; keeps the config identical to a hand-written one
  try:
    return ModelConfig(
        vocab_size=hf["vocab_size"] + extra_vocab,
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        mlp_dim=hf["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype="float32",
        scan_layers=scan_layers,
        init_std=float(hf.get("initializer_range", 0.02)))
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"{path}: {e}") from None


def hf_config_from(cfg: ModelConfig, *, torch_dtype: str = "float32",
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config.json dict for `cfg`, in the legacy (rope_theta + rope_scaling) dialect that
  transformers 4.x and 5.x both read. `extra` adds or overrides keys (e.g. bos_token_id)."""
  max_pos = 2048
  if cfg.rope_scaling:
    # HF requires the original context to be below max_position_embeddings.
    max_pos = int(cfg.rope_scaling["original_max_position_embeddings"] * cfg.rope_scaling["factor"])
  out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.hd,
      "hidden_act": "silu",
      "max_position_embeddings": max_pos,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "initializer_range": cfg.init_std,
      "pretraining_tp": 1,
      "use_cache": True,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "torch_dtype": torch_dtype,
  }
  out.update(extra or {})
  return out


# ----------------------------------------------------------------------------- weight layout


def _layer_spec(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
  """(path inside one layer, HF name inside model.layers.{i}, our per-layer shape)."""
  d, h, k, dh, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.mlp_dim
  return [
      (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", (d, h, dh)),
      (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", (d, k, dh)),
      (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", (d, k, dh)),
      (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", (h, dh, d)),
      (("attn_norm", "scale"), "input_layernorm.weight", (d,)),
      (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (d, f)),
      (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (d, f)),
      (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (f, d)),
      (("mlp_norm", "scale"), "post_attention_layernorm.weight", (d,)),
  ]


def _hf_shape(our_shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
  """HF [out, in] shape of a kernel whose (in, *out) or (*in, out) shape is `our_shape`."""
  if len(our_shape) == 1:
    return our_shape
  name = path[-2]
  if name in ("q_proj", "k_proj", "v_proj"):
    return (our_shape[1] * our_shape[2], our_shape[0])
  if name == "o_proj":
    return (our_shape[2], our_shape[0] * our_shape[1])
  return (our_shape[1], our_shape[0])


def _to_ours(w: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
  return np.ascontiguousarray(w.T).reshape(our_shape)


def _to_hf(x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  return np.ascontiguousarray(x.reshape(hf_shape[::-1]).T)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...], where: str) -> Any:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"params has no entry {'/'.join(path[:i + 1])!r} (needed for {where}); "
                       "is this a latent_em.model params tree for this ModelConfig?")
    node = node[key]
  return node


# ----------------------------------------------------------------------------- safetensors input


def _weight_files(hf_dir: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the shard index or by listing the files."""
  index_path = os.path.join(hf_dir, INDEX_NAME)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, Mapping):
      raise ValueError(f"{index_path}: no 'weight_map' dict mapping tensor names to shard files")
    files = {name: os.path.join(hf_dir, shard) for name, shard in weight_map.items()}
    for path in sorted(set(files.values())):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is listed in {index_path} but does not exist")
    return files
  single = os.path.join(hf_dir, WEIGHTS_NAME)
  paths = [single] if os.path.isfile(single) else sorted(
      glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not paths:
    other = [n for n in sorted(os.listdir(hf_dir)) if n.endswith((".bin", ".pt", ".pth"))]
    hint = (f"; found {other}: convert them to safetensors first (e.g. load with transformers "
            "and `save_pretrained(dir, safe_serialization=True)`)") if other else ""
    raise FileNotFoundError(
        f"no weights in {hf_dir}: expected {WEIGHTS_NAME}, or sharded *.safetensors files with "
        f"{INDEX_NAME}{hint}")
  files = {}
  for path in paths:
    with safe_open(path, framework="np") as f:
      files.update({name: path for name in f.keys()})
  return files


class _Reader:
  """Reads named tensors as fp32 numpy arrays, keeping each shard open once."""

  def __init__(self, files: Mapping[str, str], hf_dir: str):
    self._files, self._dir = files, hf_dir
    self._handles: dict[str, Any] = {}
    self._stack = contextlib.ExitStack()
    self._prefix = "model." if any(n.startswith("model.layers.") for n in files) else ""

  def __enter__(self) -> "_Reader":
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def has(self, name: str) -> bool:
    return self._full(name) in self._files

  def _full(self, name: str) -> str:
    return name if name == "lm_head.weight" else self._prefix + name

  def get(self, name: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    full = self._full(name)
    if full not in self._files:
      raise ValueError(f"tensor {full!r} is missing from the safetensors files in {self._dir}; "
                       "is this a Llama checkpoint matching its config.json?")
    path = self._files[full]
    if path not in self._handles:
      self._handles[path] = self._stack.enter_context(safe_open(path, framework="np"))
    try:
      w = self._handles[path].get_tensor(full)
    except (TypeError, ValueError, KeyError):
      # Older safetensors cannot hand out bfloat16 as numpy; jax (always installed) can.
      with safe_open(path, framework="flax") as f:
        w = np.asarray(f.get_tensor(full))
    if tuple(w.shape) != tuple(hf_shape):
      raise ValueError(f"tensor {full!r} in {path} has shape {tuple(w.shape)}, but config.json "
                       f"implies {tuple(hf_shape)}")
    return w.astype(np.float32)


# ----------------------------------------------------------------------------- public API


def load_llama(hf_dir: str, *, extra_vocab: int = 0, dtype: str = "float32",
               scan_layers: bool = True, rng_seed: int = 0) -> tuple[ModelConfig, Params]:
  """Loads a HF Llama checkpoint directory into (ModelConfig, fp32 numpy params tree).

  Weights stored in bf16/fp16 are upcast to fp32. With `extra_vocab=N`, N rows drawn from
  N(0, D^-0.5) with numpy seed `rng_seed` are appended to the embedding [V, D] -> [V+N, D] and,
  if untied, N columns to lm_head [D, V] -> [D, V+N]; cfg.vocab_size is V + N. `dtype` is the
  compute dtype written into the config. scan_layers=True stacks layers on a leading [L] axis
  under 'layers'; False gives 'layers_0'..'layers_{L-1}'.
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"load_llama(dtype={dtype!r}): the compute dtype must be one of "
                     f"{list(_SAVE_DTYPES)}")
  hf = read_hf_config(hf_dir)
  cfg = config_from_hf(hf, extra_vocab=extra_vocab, dtype=dtype, scan_layers=scan_layers,
                       path=os.path.join(hf_dir, CONFIG_NAME))
  with _Reader(_weight_files(hf_dir), hf_dir) as reader:
    params = _read_params(reader, cfg, hf["vocab_size"], extra_vocab,
                          np.random.default_rng(rng_seed))
  return cfg, params


def _read_params(reader: _Reader, cfg: ModelConfig, vocab: int, extra_vocab: int,
                 rng: np.random.Generator) -> Params:
  """The params tree for `cfg`; new vocabulary rows/columns come from `rng`."""
  d, n_layers = cfg.dim, cfg.n_layers
  params: Params = {}
  embed = reader.get("embed_tokens.weight", (vocab, d))
  if extra_vocab:
    # std d^-0.5 (DESIGN.md section 2) gives each new embedding unit norm in expectation.
    new_rows = rng.normal(0.0, d ** -0.5, (extra_vocab, d)).astype(np.float32)
    embed = np.concatenate([embed, new_rows], axis=0)
  params["embed"] = {"embedding": embed}

  spec = _layer_spec(cfg)
  if cfg.scan_layers:
    # Fill preallocated [L, ...] buffers so a 1B model is never held twice in memory.
    stacked = {path: np.empty((n_layers,) + shape, np.float32) for path, _, shape in spec}
    for i in range(n_layers):
      for path, name, shape in spec:
        stacked[path][i] = _to_ours(
            reader.get(f"layers.{i}.{name}", _hf_shape(shape, path)), shape)
    for path, value in stacked.items():
      _set(params, ("layers",) + path, value)
  else:
    for i in range(n_layers):
      for path, name, shape in spec:
        _set(params, (f"layers_{i}",) + path,
             _to_ours(reader.get(f"layers.{i}.{name}", _hf_shape(shape, path)), shape))
  params["final_norm"] = {"scale": reader.get("norm.weight", (d,))}

  if not cfg.tie_embeddings:
    head = _to_ours(reader.get("lm_head.weight", (vocab, d)), (d, vocab))
    if extra_vocab:
      new_cols = rng.normal(0.0, d ** -0.5, (d, extra_vocab)).astype(np.float32)
      head = np.concatenate([head, new_cols], axis=1)
    params["lm_head"] = {"kernel": head}
  elif reader.has("lm_head.weight"):
    logging.info("tie_word_embeddings is true; ignoring the stored lm_head.weight")
  return params


def save_llama(cfg: ModelConfig, params: Params, out_dir: str, *, torch_dtype: str = "float32",
               extra_config: Mapping[str, Any] | None = None) -> None:
  """Writes `params` (scan or unrolled layout, numpy or jax arrays) as a HF Llama checkpoint.

  out_dir gets config.json and model.safetensors (dtype `torch_dtype`: float32, bfloat16 or
  float16). The directory is built under a temporary name next to out_dir and renamed into
  place, replacing any previous out_dir, so readers never see a half-written checkpoint.
  `extra_config` adds or overrides config.json keys (e.g. bos_token_id, eos_token_id).
  """
  if torch_dtype not in _SAVE_DTYPES:
    raise ValueError(f"torch_dtype={torch_dtype!r}; use one of {list(_SAVE_DTYPES)}")
  np_dtype = {"float32": np.float32, "float16": np.float16,
              "bfloat16": ml_dtypes.bfloat16}[torch_dtype]
  params = nn.unbox(params)  # accepts init_params(..., boxed=True) trees too

  def put(name: str, value: Any, our_shape: tuple[int, ...], hf_shape: tuple[int, ...] | None,
          where: str) -> None:
    """hf_shape=None stores the array as it is (embedding table, norm scales)."""
    x = np.asarray(value, dtype=np.float32)
    if x.shape != our_shape:
      raise ValueError(f"params {where} has shape {x.shape}, but the ModelConfig implies "
                       f"{our_shape}")
    tensors[name] = (x if hf_shape is None else _to_hf(x, hf_shape)).astype(np_dtype)

  tensors: dict[str, np.ndarray] = {}
  v, d = cfg.vocab_size, cfg.dim
  put("model.embed_tokens.weight", _get(params, ("embed", "embedding"), "embed_tokens"),
      (v, d), None, "embed/embedding")
  scanned = "layers" in params
  for path, name, shape in _layer_spec(cfg):
    hf_shape = _hf_shape(shape, path)
    stacked = np.asarray(_get(params, ("layers",) + path, name)) if scanned else None
    if scanned and stacked.shape[0] != cfg.n_layers:
      raise ValueError(f"params layers/{'/'.join(path)} has {stacked.shape[0]} layers, "
                       f"ModelConfig.n_layers={cfg.n_layers}")
    for i in range(cfg.n_layers):
      where = f"layers/{'/'.join(path)}[{i}]" if scanned else f"layers_{i}/{'/'.join(path)}"
      value = stacked[i] if scanned else _get(params, (f"layers_{i}",) + path, name)
      put(f"model.layers.{i}.{name}", value, shape, hf_shape, where)
  put("model.norm.weight", _get(params, ("final_norm", "scale"), "norm"), (d,), None,
      "final_norm/scale")
  if not cfg.tie_embeddings:
    put("lm_head.weight", _get(params, ("lm_head", "kernel"), "lm_head"), (d, v), (v, d),
        "lm_head/kernel")

  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
  try:
    # transformers refuses safetensors files whose metadata lacks a known "format".
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(hf_config_from(cfg, torch_dtype=torch_dtype, extra=extra_config), f, indent=2,
                sort_keys=True)
      f.write("\n")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _replace_dir(tmp, out_dir)


def _replace_dir(src: str, dst: str) -> None:
  """Renames directory src to dst; an existing dst is moved aside first and restored on error."""
  if not os.path.exists(dst):
    os.rename(src, dst)
    return
  aside = tempfile.mkdtemp(dir=os.path.dirname(dst), prefix=f".{os.path.basename(dst)}.old-")
  old = os.path.join(aside, "previous")
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except BaseException:
    os.rename(old, dst)
    shutil.rmtree(src, ignore_errors=True)
    raise
  finally:
    shutil.rmtree(aside, ignore_errors=True)
