"""E-step tests: job records + resume, overflow policy, joint scores vs full forward, sharding."""
import glob
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from latent_em import checkpoint, config_defaults, formats, io_utils, model, tokenizer
from latent_em.data import mathcorpus, records
from latent_em.estep import core, job

MODEL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


def make_assets(root):
  """A trained tokenizer, random params checkpoint and a small corpus file under `root`."""
  splits = mathcorpus.make_splits(mathcorpus.CorpusConfig(n_warmstart=10, n_bootstrap=200,
                                                          n_validation=10, n_eval=10))
  corpus = os.path.join(root, "corpus.jsonl")
  io_utils.write_jsonl(corpus, splits["bootstrap"][:6])
  tok_path = tokenizer.train([d["text"] for d in splits["bootstrap"]],
                             os.path.join(root, "tokenizer.model"), 360)
  tok = tokenizer.load(tok_path)
  cfg = model.ModelConfig(vocab_size=384, **MODEL)
  params = model.init_params(cfg, jax.random.key(0))
  checkpoint.save_params(params, os.path.join(root, "params"))
  return corpus, tok, cfg, params


def estep_config(root, corpus, **estep):
  config = config_defaults.base()
  config.job = "estep"
  config.model.update(dict(vocab_size=384, **MODEL))
  config.tokenizer.path = os.path.join(root, "tokenizer.model")
  config.estep.input_files = (corpus,)
  config.estep.init_from = os.path.join(root, "params")
  config.estep.docs_per_shard = 2
  config.estep.num_samples = 3
  config.estep.batch_chunks = 4
  config.estep.max_seq_len = 160
  config.estep.sampling.max_gen_len = 12
  config.estep.chunking.avg_units = 2
  config.estep.elbo_ks = (1, 2)
  for k, v in estep.items():
    config.estep[k] = v
  return config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("estep"))
  return (root,) + make_assets(root)


def test_estep_job_writes_records_and_resumes(assets, tmp_path):
  root, corpus, tok, cfg, params = assets
  config = estep_config(root, corpus)
  summary = job.run(config, str(tmp_path))
  paths = sorted(glob.glob(str(tmp_path / "estep" / "records-*.tfrecord")))
  assert len(paths) == 3 and summary["missing_shards"] == 0
  docs = [json.loads(l) for l in open(corpus)]
  recs = list(records.read_records(paths))
  assert [r.text for r in recs] == [d["text"] for d in docs]
  n_chunks = 0
  for rec in recs:
    assert "".join(c.suffix for c in rec.chunks) == rec.text
    for c in rec.chunks:
      n_chunks += 1
      assert len(c.log_weights) == 3 and set(c.elbo) == {"1", "2"}
      assert 0 <= c.thought_len <= 12
      assert c.suffix_tokens + c.cut_tokens == len(tok.encode(c.suffix))
      assert formats.EOL not in c.thought and c.source == "estep"
      assert c.elbo["1"] == pytest.approx(c.log_weights[0], abs=1e-3)
  assert summary["chunks"] == n_chunks and 1.0 <= summary["mean_ess"] <= 3.0
  assert set(summary["elbo_per_token"]) == {"1", "2"}
  assert json.load(open(tmp_path / "estep" / "summary.json"))["chunks"] == n_chunks

  # Kill simulation: drop one finished shard; the rerun redoes only it, identically.
  before = open(paths[1], "rb").read()
  mtimes = {p: os.path.getmtime(p) for p in paths}
  os.remove(paths[1])
  job.run(config, str(tmp_path))
  assert open(paths[1], "rb").read() == before
  assert os.path.getmtime(paths[0]) == mtimes[paths[0]]
  assert os.path.getmtime(paths[2]) == mtimes[paths[2]]


def test_joint_scores_match_full_forward(assets):
  """log p(SoL PRIOR z EoL X | BOS P) from the packed scorer == a plain forward pass."""
  root, corpus, tok, cfg, params = assets
  ecfg = estep_config(root, corpus)
  from latent_em import runtime
  engine = core.Engine(runtime.section(ecfg, "estep"), cfg, params, tok)
  doc = json.loads(open(corpus).readline())["text"]
  prefix, suffix = doc[:40], doc[40:90]
  res = engine.process([(prefix, suffix)], jax.random.key(0), np.random.default_rng(0))[0]
  ids = tok.latent_ids
  ctx = [tok.bos_id] + tok.encode(prefix)
  target = ([ids[formats.SOL], ids[formats.PRIOR]] + res.thought_ids + [ids[formats.EOL]]
            + tok.encode(suffix))
  seq = jnp.asarray([ctx + target])
  logp = jax.nn.log_softmax(model.forward(cfg, params, seq[:, :-1]), -1)[0]
  ref = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(target))
  assert res.log_joint[res.kept] == pytest.approx(ref, abs=2e-3)
  assert res.log_weights[res.kept] == pytest.approx(res.log_joint[res.kept] - res.log_q[res.kept],
                                                    abs=1e-6)


def test_overflow_cuts_prefix_then_suffix():
  p, x, pc, xc = core.fit_to_budget(list(range(10)), list(range(100, 105)), 12)
  assert p == list(range(3, 10)) and x == list(range(100, 105)) and (pc, xc) == (3, 0)
  p, x, pc, xc = core.fit_to_budget(list(range(10)), list(range(100, 120)), 12)
  assert p == [] and x == list(range(100, 112)) and (pc, xc) == (10, 8)


def test_overflow_is_counted_in_records(assets, tmp_path):
  root, corpus, tok, cfg, params = assets
  config = estep_config(root, corpus, max_seq_len=40)
  config.estep.chunking.avg_units = 6
  summary = job.run(config, str(tmp_path))
  assert summary["cut_suffix_tokens"] > 0
  for rec in records.read_records(sorted(glob.glob(str(tmp_path / "estep" / "*.tfrecord")))):
    for c in rec.chunks:
      assert c.suffix_tokens + c.cut_tokens == len(tok.encode(c.suffix))
      assert c.suffix_tokens <= 40 - 12 - 5


def test_sharded_estep_matches_single_device(assets):
  root = assets[0]
  code = textwrap.dedent(f"""
    import jax, numpy as np, json
    from latent_em import runtime, sharding
    from latent_em.estep import core
    from test_estep import make_assets, estep_config
    corpus, tok, cfg, params = make_assets({root!r} + "/sharded")
    ecfg = runtime.section(estep_config({root!r}, corpus), "estep")
    docs = [json.loads(l)["text"] for l in open(corpus)][:2]
    pairs = [(d[:30], d[30:80]) for d in docs] * 2
    out = {{}}
    for name, devices, shape in (("one", jax.devices()[:1], (1, 1, 1)),
                                 ("eight", jax.devices(), (4, 1, 2))):
      mcfg = sharding.MeshConfig(shape=shape)
      mesh = sharding.make_mesh(mcfg, devices)
      engine = core.Engine(ecfg, cfg, params, tok, mesh, mcfg.rules_list)
      out[name] = engine.process(pairs, jax.random.key(0), np.random.default_rng(0))
    for a, b in zip(out["one"], out["eight"]):
      assert a.thought_ids == b.thought_ids, (a.thought_ids, b.thought_ids)
      np.testing.assert_allclose(a.log_weights, b.log_weights, atol=2e-3)
      assert a.kept == b.kept
    print("OK")
  """)
  os.makedirs(os.path.join(root, "sharded"), exist_ok=True)
  assert "OK" in run_python(code, devices=8, env={"PYTHONPATH": "tests"})
