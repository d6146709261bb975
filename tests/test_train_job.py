"""The train job: exact resume after a kill, NaN detection, init_from, CLI."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import run_main
from latent_em import checkpoint, config_defaults, io_utils, train, train_step
from latent_em.data import mathcorpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  splits = mathcorpus.make_splits(mathcorpus.CorpusConfig(n_warmstart=10, n_bootstrap=300,
                                                          n_validation=20, n_eval=10))
  train_path, val_path = str(root / "train.jsonl"), str(root / "val.jsonl")
  io_utils.write_jsonl(train_path, splits["bootstrap"])
  io_utils.write_jsonl(val_path, splits["validation"])
  return train_path, val_path


def tiny_config(corpus, steps=6, **train_kw):
  config = config_defaults.base()
  config.model.update(dict(vocab_size=0, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                           mlp_dim=64))
  config.tokenizer.vocab_size = 384
  config.data.train_files = (corpus[0],)
  config.data.validation_files = (corpus[1],)
  config.data.seq_len = 64
  config.data.batch_size = 4
  config.data.shuffle_buffer = 100
  config.optim.lr = 1e-2
  config.optim.warmup_steps = 2
  config.train.steps = steps
  config.train.log_every = 1
  config.train.eval_batches = 2
  config.train.progress_bar = False
  config.checkpoint.every_steps = 3
  config.checkpoint.async_save = True
  for k, v in train_kw.items():
    config.train[k] = v
  return config


def _params(workdir):
  return jax.device_get(checkpoint.load_params(os.path.join(workdir, "params")))


def test_resume_after_kill_equals_uninterrupted(corpus, tmp_path, monkeypatch):
  full = str(tmp_path / "full")
  summary = train.run(tiny_config(corpus), full)
  assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["eval_nll_per_token"])

  killed = str(tmp_path / "killed")
  os.makedirs(killed)
  # Reuse the tokenizer so both runs tokenize identically (training one is deterministic too).
  import shutil
  shutil.copy(os.path.join(full, "tokenizer.model"), killed)
  real = train_step.jit_train_step

  def dying(*args, **kw):
    fn = real(*args, **kw)
    calls = {"n": 0}

    def step(state, batch):
      calls["n"] += 1
      if calls["n"] == 5:
        raise KeyboardInterrupt("simulated kill at step 5")
      return fn(state, batch)
    return step

  monkeypatch.setattr(train_step, "jit_train_step", dying)
  with pytest.raises(KeyboardInterrupt):
    train.run(tiny_config(corpus), killed)
  assert checkpoint.Checkpointer(os.path.join(killed, "checkpoints"),
                                 checkpoint.CheckpointConfig(every_steps=3)).latest_step() == 3
  monkeypatch.setattr(train_step, "jit_train_step", real)
  train.run(tiny_config(corpus), killed)
  a, b = _params(full), _params(killed)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_nan_stops_with_step_number(corpus, tmp_path):
  config = tiny_config(corpus, steps=20)
  config.optim.lr = 1e6
  config.optim.clip_norm = 0.0
  config.optim.warmup_steps = 0
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d+"):
    train.run(config, str(tmp_path))


def test_init_from_params_starts_from_them(corpus, tmp_path):
  base = str(tmp_path / "base")
  train.run(tiny_config(corpus, steps=3), base)
  config = tiny_config(corpus, steps=1, init_from=base)
  config.tokenizer.path = os.path.join(base, "tokenizer.model")
  config.optim.lr = 1e-9
  config.optim.warmup_steps = 0
  child = str(tmp_path / "child")
  train.run(config, child)
  a, b = _params(base), _params(child)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
  bad = tiny_config(corpus, steps=1, init_from=str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="init_from"):
    train.run(bad, str(tmp_path / "bad"))


def test_cli_trains_and_reruns_as_resume(corpus, tmp_path):
  args = ["--config=configs/tiny.py:steps=4", f"--workdir={tmp_path}",
          f"--config.data.train_files=('{corpus[0]}',)",
          f"--config.data.validation_files=('{corpus[1]}',)",
          "--config.model.dim=32", "--config.model.n_layers=1", "--config.data.seq_len=64",
          "--config.data.batch_size=4", "--config.tokenizer.vocab_size=384",
          "--config.checkpoint.every_steps=2", "--config.train.eval_every=2",
          "--config.train.eval_batches=1"]
  run_main(args)
  summary = json.load(open(tmp_path / "train_summary.json"))
  assert summary["steps"] == 4 and np.isfinite(summary["eval_nll_per_token"])
  assert summary["input"]["docs_kept"] > 0 and summary["input"]["skipped"] == 0
  proc = run_main(args)
  assert "resuming from step 4" in proc.stderr


def test_trains_on_thought_records_mixed_with_raw(corpus, tmp_path):
  """M-step data: oracle-thought records mixed 1:1 with raw text."""
  from latent_em.data import chunking, records
  docs = [json.loads(l) for l in open(corpus[0])][:40]
  cfg = chunking.ChunkConfig(avg_units=2, max_units=4)
  recs = []
  for d in docs:
    chunks = chunking.chunk_document(d["text"], cfg)
    recs.append(records.DocRecord(d["id"], d["text"], [
        records.ChunkRecord(prefix="".join(chunks[:i]), suffix=c, source="teacher",
                            thought=mathcorpus.oracle_thought("".join(chunks[:i]), c))
        for i, c in enumerate(chunks)]))
  shard = str(tmp_path / "teacher-00000-of-00001.tfrecord")
  records.write_shard(recs, shard)
  config = tiny_config(corpus, steps=3)
  config.mstep_data.record_files = (shard,)
  config.mstep_data.thought_rate = 0.5
  summary = train.run(config, str(tmp_path / "w"))
  assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["eval_nll_per_token"])
  config.data.train_files = ()
  config.tokenizer.path = str(tmp_path / "w" / "tokenizer.model")
  summary = train.run(config, str(tmp_path / "w2"))
  assert np.isfinite(summary["final_loss"])
