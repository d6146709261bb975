"""Config validation: unknown keys, bad values and bad overrides name the key and the fix."""
import os

import ml_collections
import pytest

from conftest import run_main
from latent_em import config_defaults, config_lib, model, runtime, sharding


def _config(**changes):
  config = config_defaults.base()
  for dotted, value in changes.items():
    node = config
    *path, last = dotted.split(".")
    for p in path:
      node = node[p]
    with node.ignore_type():
      node[last] = value
  return config


def test_base_config_is_valid():
  runtime.validate(config_defaults.base())


@pytest.mark.parametrize("key,value,needle", [
    ("model.n_kv_heads", 3, "config.model.n_kv_heads"),
    ("model.dtype", "float8", "config.model.dtype"),
    ("model.dim", "big", "config.model.dim"),
    ("model.attention", "flash", "config.model.attention"),
    ("model.logits_chunk", -1, "config.model.logits_chunk"),
    ("mesh.shape", (2, 2), "config.mesh.shape"),
    ("optim.schedule", "linear", "config.optim.schedule"),
    ("optim.lr", -1.0, "config.optim.lr"),
    ("train.steps", 0, "config.train.steps"),
    ("job", "dance", "config.job"),
])
def test_bad_values_name_the_key(key, value, needle):
  with pytest.raises(config_lib.ConfigError, match=needle.replace(".", r"\.")):
    runtime.validate(_config(**{key: value}))


def test_unknown_key_suggests_fix():
  config = config_defaults.base()
  with config.model.unlocked():
    config.model.dimm = 3
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.dimm.*did you mean config\.model\.dim"):
    runtime.validate(config)
  config = config_defaults.base()
  config.optimizer = ml_collections.ConfigDict({"lr": 1.0})
  with pytest.raises(config_lib.ConfigError, match=r"config\.optimizer.*config\.optim"):
    runtime.validate(config)


def test_from_config_coerces_and_rejects():
  cfg = config_lib.from_config(model.ModelConfig, {"dim": 64, "rope_theta": 10000},
                               "config.model")
  assert cfg.rope_theta == 10000.0 and isinstance(cfg.rope_theta, float)
  with pytest.raises(config_lib.ConfigError, match="config.model.tie_embeddings"):
    config_lib.from_config(model.ModelConfig, {"tie_embeddings": "yes"}, "config.model")


def test_mesh_shape_resolution():
  assert sharding.resolve_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(config_lib.ConfigError, match="config.mesh.shape"):
    sharding.resolve_shape((3, 1, 1), 8)


def test_parse_arg_variants():
  arg = config_defaults.parse_arg("steps=5,runlocal", steps=100, runlocal=False, name="x")
  assert arg.steps == 5 and arg.runlocal is True and arg.name == "x"
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown config variant 'smok'.*known variants are: ablate_k, "
                           r"k=\.\.\., seed=\.\.\., smoke"):
    config_defaults.parse_arg("seed=1,smok", ablate_k=False, k=8, seed=0, smoke=False)


def test_cli_stops_on_an_unknown_variant(tmp_path):
  """A misspelt variant stops before anything runs, with the known variants in one line."""
  proc = run_main(["--config=configs/quickstart.py:smok", f"--workdir={tmp_path}/w"],
                  check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  line = next(l for l in proc.stderr.splitlines() if "unknown config variant" in l)
  assert line.startswith("config error: ") and "smoke" in line and "ablate_k" in line
  assert not os.path.exists(f"{tmp_path}/w")


def test_cli_reports_bad_value_and_unknown_override(tmp_path):
  proc = run_main(["--config=configs/tiny.py", f"--workdir={tmp_path}",
                   "--config.model.n_kv_heads=3"], check=False)
  assert proc.returncode != 0
  assert "config.model.n_kv_heads" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_main(["--config=configs/tiny.py", f"--workdir={tmp_path}",
                   "--config.model.dimm=3"], check=False)
  assert proc.returncode != 0 and "dimm" in proc.stderr
