"""latent_em.hf against transformers' own LlamaForCausalLM on tiny random checkpoints."""
import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from latent_em import config_lib  # pylint: disable=g-import-not-at-top
from latent_em import hf  # pylint: disable=g-import-not-at-top
from latent_em import model as model_lib  # pylint: disable=g-import-not-at-top


@pytest.fixture(autouse=True, scope="module")
def _deterministic_torch():
  """One thread and deterministic kernels for this module only; restored afterwards."""
  threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  yield
  torch.set_num_threads(threads)
  torch.use_deterministic_algorithms(deterministic)


VOCAB, DIM, TOL = 100, 64, 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "tied_gqa": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "untied_mha": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "untied_gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "head_dim_32": dict(num_key_value_heads=2, head_dim=32),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                        max_position_embeddings=256),
}


def make_hf_model(**overrides):
  """A random 2-layer HF Llama whose weights (norms included) are far from their init."""
  kwargs = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                tie_word_embeddings=False, attn_implementation="eager")
  kwargs.update(overrides)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def save_hf(model, path, **kwargs):
  model.save_pretrained(str(path), **kwargs)
  return str(path)


def tokens(batch=2, length=40, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int32)


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.from_numpy(toks.astype(np.int64))).logits.float().numpy()


def our_logits(cfg, params, toks):
  return np.asarray(model_lib.forward(cfg, params, toks))


@pytest.mark.parametrize("case,scan_layers", [(c, True) for c in CASES] + [
    ("tied_gqa", False), ("untied_gqa", False)])
def test_logits_match_transformers(tmp_path, case, scan_layers):
  model = make_hf_model(**CASES[case])
  # A sharded save exercises model.safetensors.index.json.
  hf_dir = save_hf(model, tmp_path / "hf", max_shard_size="40KB")
  assert os.path.exists(os.path.join(hf_dir, hf.INDEX_NAME))
  cfg, params = hf.load_llama(hf_dir, scan_layers=scan_layers)
  assert cfg.scan_layers == scan_layers
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  assert ("lm_head" in params) != cfg.tie_embeddings
  assert ("layers" in params) == scan_layers
  toks = tokens()
  expected = hf_logits(model, toks)
  assert np.abs(expected).max() > 1.0  # logits big enough for TOL to mean something
  np.testing.assert_allclose(our_logits(cfg, params, toks), expected, atol=TOL, rtol=0)


def test_llama3_rope_scaling_is_used(tmp_path):
  model = make_hf_model(**CASES["llama3_rope"])
  cfg, params = hf.load_llama(save_hf(model, tmp_path / "hf"))
  assert cfg.rope_theta == 500000.0
  assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
  toks = tokens()
  unscaled = our_logits(dataclasses.replace(cfg, rope_scaling=None), params, toks)
  assert np.abs(unscaled - hf_logits(model, toks)).max() > 1e-2


def test_legacy_config_dialect(tmp_path):
  """Checkpoints written by transformers 4.x spell RoPE as top-level rope_theta/rope_scaling."""
  model = make_hf_model(**CASES["llama3_rope"])
  hf_dir = save_hf(model, tmp_path / "hf")
  cfg_new, _ = hf.load_llama(hf_dir)
  path = os.path.join(hf_dir, hf.CONFIG_NAME)
  with open(path) as f:
    config = json.load(f)
  rope = config.pop("rope_parameters")
  config["rope_theta"] = rope.pop("rope_theta")
  config["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))
  with open(path, "w") as f:
    json.dump(config, f)
  cfg_old, _ = hf.load_llama(hf_dir)
  assert cfg_old == cfg_new


@pytest.mark.parametrize("case,scan_layers", [("untied_gqa", True), ("tied_gqa", False),
                                              ("llama3_rope", False)])
def test_round_trip_through_transformers(tmp_path, case, scan_layers):
  model = make_hf_model(**CASES[case])
  cfg, params = hf.load_llama(save_hf(model, tmp_path / "hf"), scan_layers=scan_layers)
  out_dir = str(tmp_path / "export")
  hf.save_llama(cfg, params, out_dir)
  hf.save_llama(cfg, params, out_dir)  # replacing an existing export must work too
  assert sorted(os.listdir(tmp_path)) == ["export", "hf"]  # no temp dirs left behind
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
      out_dir, attn_implementation="eager", dtype=torch.float32).eval()
  toks = tokens()
  np.testing.assert_allclose(hf_logits(reloaded, toks), hf_logits(model, toks), atol=TOL, rtol=0)
  for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_save_bfloat16(tmp_path):
  model = make_hf_model(**CASES["untied_gqa"])
  cfg, params = hf.load_llama(save_hf(model, tmp_path / "hf"))
  hf.save_llama(cfg, params, str(tmp_path / "bf16"), torch_dtype="bfloat16",
                extra_config={"eos_token_id": 7})
  with open(tmp_path / "bf16" / hf.CONFIG_NAME) as f:
    assert json.load(f)["eos_token_id"] == 7
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype="auto")
  assert reloaded.dtype == torch.bfloat16
  expected = model.state_dict()["model.layers.1.self_attn.o_proj.weight"].to(torch.bfloat16)
  got = reloaded.state_dict()["model.layers.1.self_attn.o_proj.weight"]
  assert torch.equal(got, expected)


@pytest.mark.parametrize("case", ["untied_gqa", "tied_gqa"])
def test_extra_vocab(tmp_path, case):
  model = make_hf_model(**CASES[case])
  hf_dir = save_hf(model, tmp_path / "hf")
  n = 4
  cfg, params = hf.load_llama(hf_dir, extra_vocab=n, rng_seed=3)
  assert cfg.vocab_size == VOCAB + n
  embed = params["embed"]["embedding"]
  assert embed.shape == (VOCAB + n, DIM)
  new = [embed[VOCAB:]]
  if not cfg.tie_embeddings:
    assert params["lm_head"]["kernel"].shape == (DIM, VOCAB + n)
    new.append(params["lm_head"]["kernel"][:, VOCAB:].T)
  for rows in new:
    assert rows.shape == (n, DIM)
    # 256 draws: the sample std is within ~5% of the true one; d^-0.5 = 0.125.
    assert abs(rows.std() - DIM ** -0.5) < 0.25 * DIM ** -0.5
    assert abs(rows.mean()) < 0.05
  toks = tokens()
  ours = our_logits(cfg, params, toks)
  assert ours.shape == toks.shape + (VOCAB + n,)
  np.testing.assert_allclose(ours[..., :VOCAB], hf_logits(model, toks), atol=TOL, rtol=0)
  # The new rows are a fixed function of the seed.
  _, again = hf.load_llama(hf_dir, extra_vocab=n, rng_seed=3)
  np.testing.assert_array_equal(again["embed"]["embedding"], embed)
  _, other = hf.load_llama(hf_dir, extra_vocab=n, rng_seed=4)
  assert not np.allclose(other["embed"]["embedding"][VOCAB:], embed[VOCAB:])


def test_bfloat16_checkpoint_loads(tmp_path):
  model = make_hf_model(**CASES["untied_gqa"]).to(torch.bfloat16)
  hf_dir = save_hf(model, tmp_path / "hf")
  with open(os.path.join(hf_dir, hf.CONFIG_NAME)) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  cfg, params = hf.load_llama(hf_dir)
  assert params["layers"]["mlp"]["up_proj"]["kernel"].dtype == np.float32
  # The same bf16 values upcast to fp32 (`model.float()` would keep a bf16-rounded RoPE buffer).
  reference = transformers.LlamaForCausalLM.from_pretrained(
      hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
  assert reference.dtype == torch.float32
  toks = tokens()
  np.testing.assert_allclose(our_logits(cfg, params, toks), hf_logits(reference, toks),
                             atol=TOL, rtol=0)


def test_bfloat16_without_numpy_support(tmp_path, monkeypatch):
  """safetensors releases without ml_dtypes support fail on bf16 as numpy; the flax path reads."""
  model = make_hf_model(**CASES["tied_gqa"]).to(torch.bfloat16)
  hf_dir = save_hf(model, tmp_path / "hf")
  real_open = hf.safe_open

  class NoBf16Numpy:
    def __init__(self, path, framework):
      self._f = real_open(path, framework=framework)
      self._np = framework == "np"

    def __enter__(self):
      self._f.__enter__()
      return self

    def __exit__(self, *exc):
      return self._f.__exit__(*exc)

    def keys(self):
      return self._f.keys()

    def get_tensor(self, name):
      if self._np:
        raise TypeError("data type 'bfloat16' not understood")
      return self._f.get_tensor(name)

  monkeypatch.setattr(hf, "safe_open", NoBf16Numpy)
  _, params = hf.load_llama(hf_dir)
  expected = model.state_dict()["model.embed_tokens.weight"].float().numpy()
  np.testing.assert_array_equal(params["embed"]["embedding"], expected)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*config.json"):
    hf.load_llama(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty/config\.json not found"):
    hf.load_llama(str(tmp_path / "empty"))
  hf_dir = save_hf(make_hf_model(), tmp_path / "hf")
  os.remove(os.path.join(hf_dir, hf.WEIGHTS_NAME))
  with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
    hf.load_llama(hf_dir)


@pytest.mark.parametrize("key,value,match", [
    ("attention_bias", True, "'attention_bias' is true"),
    ("mlp_bias", True, "'mlp_bias' is true"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
     "'rope_parameters' has rope_type='linear'"),
    ("model_type", "gpt2", "'model_type' is 'gpt2'"),
    ("hidden_act", "gelu", "'hidden_act' is 'gelu'"),
])
def test_unsupported_config(tmp_path, key, value, match):
  hf_dir = save_hf(make_hf_model(), tmp_path / "hf")
  path = os.path.join(hf_dir, hf.CONFIG_NAME)
  with open(path) as f:
    config = json.load(f)
  config[key] = value
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(config_lib.ConfigError, match=r"config\.json: key " + match):
    hf.load_llama(hf_dir)


def test_wrong_tensor_shape(tmp_path):
  hf_dir = save_hf(make_hf_model(), tmp_path / "hf")
  path = os.path.join(hf_dir, hf.CONFIG_NAME)
  with open(path) as f:
    config = json.load(f)
  config["intermediate_size"] = 96
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight.*\(128, 64\).*\(96, 64\)"):
    hf.load_llama(hf_dir)


def test_tinyllama_config():
  """TinyLlama v1.1's config.json (transformers 4.x dialect) gives the paper's 1.1B model."""
  tinyllama = {
      "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
      "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
      "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
      "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
      "vocab_size": 32000}
  cfg = hf.config_from_hf(tinyllama)
  assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.mlp_dim) == (
      2048, 22, 32, 4, 64, 5632)
  assert cfg.rope_scaling is None and not cfg.tie_embeddings and cfg.norm_eps == 1e-5
  assert model_lib.param_count(cfg) == 1_100_048_384  # TinyLlama's published parameter count
  assert hf.config_from_hf(tinyllama, extra_vocab=4).vocab_size == 32004
  exported = hf.hf_config_from(cfg)
  assert {k: exported[k] for k in tinyllama if k not in ("torch_dtype", "use_cache")} == {
      k: v for k, v in tinyllama.items() if k not in ("torch_dtype", "use_cache")}


def test_init_from_hf_dir_adds_latent_rows(tmp_path):
  """train.load_init_params on a HF dir: same weights, plus new rows for the larger vocab."""
  from latent_em import config_lib, train
  hf_dir = save_hf(make_hf_model(), tmp_path / "hf")
  ref_cfg, ref = hf.load_llama(hf_dir)
  cfg = model_lib.ModelConfig(**{**ref_cfg.__dict__, "vocab_size": ref_cfg.vocab_size + 4})
  params = train.load_init_params(hf_dir, cfg)
  np.testing.assert_array_equal(params["embed"]["embedding"][:ref_cfg.vocab_size],
                                ref["embed"]["embedding"])
  assert params["embed"]["embedding"].shape[0] == ref_cfg.vocab_size + 4
  bad = model_lib.ModelConfig(**{**cfg.__dict__, "n_layers": cfg.n_layers + 1})
  with pytest.raises(config_lib.ConfigError, match="config.model.n_layers"):
    train.load_init_params(hf_dir, bad)
