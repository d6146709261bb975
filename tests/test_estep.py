"""E-step tests: job records + resume, overflow policy, joint scores vs full forward, sharding."""
import dataclasses
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
  # Every sampled token is a useful row-step: K x (thought + EoL) per chunk, at most.
  steps = summary["decode_row_steps"]
  assert 0 < summary["slot_utilization"] == steps["useful"] / steps["computed"] <= 1
  assert steps["useful"] <= n_chunks * 3 * 13

  # Kill simulation: drop one finished shard; the rerun redoes only it. It decodes beside no
  # other shard (other rows, other ring slots), so floats may differ in the last bits; the
  # thoughts and the records' fields are the same.
  before = list(records.read_records([paths[1]]))
  mtimes = {p: os.path.getmtime(p) for p in paths}
  os.remove(paths[1])
  again = job.run(config, str(tmp_path))
  after = list(records.read_records([paths[1]]))
  assert [r.text for r in after] == [r.text for r in before]
  for a, b in zip(after, before):
    for ca, cb in zip(a.chunks, b.chunks, strict=True):
      assert (ca.prefix, ca.suffix, ca.thought, ca.ended, ca.thought_len) == (
          cb.prefix, cb.suffix, cb.thought, cb.ended, cb.thought_len)
      np.testing.assert_allclose(ca.log_weights, cb.log_weights, atol=1e-4)
  assert os.path.getmtime(paths[0]) == mtimes[paths[0]]
  assert os.path.getmtime(paths[2]) == mtimes[paths[2]]
  # The rerun's decoding is added to the first run's.
  assert again["decode_row_steps"]["useful"] > steps["useful"]


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


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_samples_what_static_batches_do(assets, temperature):
  """Engine.process (rows refilled as chunks finish) draws the same K thoughts per chunk as one
  static Sampler call with the same keys, and its log q are the thoughts' log-probabilities
  under the processed (temperature, banned ids) distribution."""
  root, corpus, tok, cfg, params = assets
  from latent_em import runtime
  from latent_em.sampling import sampler as S, scoring
  ecfg = runtime.section(estep_config(root, corpus), "estep")
  ecfg = dataclasses.replace(ecfg, batch_chunks=2, prefill_chunks=1,
                             sampling=dataclasses.replace(ecfg.sampling, temperature=temperature))
  engine = core.Engine(ecfg, cfg, params, tok)
  docs = [json.loads(l)["text"] for l in open(corpus)]
  pairs = [(d[:i * 7], d[i * 7:i * 7 + 40 + 9 * i]) for i, d in enumerate(docs[:5])]
  res = engine.process(pairs, jax.random.key(3), np.random.default_rng(0))
  assert engine.sampler.stats.refill_calls >= 3   # 2 chunks' rows at a time: refilled

  chunks = [engine.chunk(p, x, None) for p, x in pairs]
  width = max(len(c.prompt) for c in chunks)
  prompts = np.zeros((len(chunks), width), np.int32)
  for i, c in enumerate(chunks):
    prompts[i, :len(c.prompt)] = c.prompt
  static = S.Sampler(engine.decode_model, engine.sampling, stop_ids=(engine.eol, tok.eos_id))
  out = jax.device_get(static(params, jnp.asarray(prompts),
                              jnp.asarray([len(c.prompt) for c in chunks]), jax.random.key(3),
                              num_samples=3))
  logp_fn = scoring.make_token_logprobs(cfg, temperature, 0, 1.0, engine.sampling.banned_ids)
  for i, (r, c) in enumerate(zip(res, chunks)):
    n = int(out.lengths[i * 3 + r.kept])
    ids = out.tokens[i * 3 + r.kept, :n].tolist()
    assert r.thought_ids == (ids[:-1] if out.finished[i * 3 + r.kept] else ids)
    np.testing.assert_allclose(r.log_q, out.logprobs[i * 3:(i + 1) * 3].sum(1), atol=1e-4)
    if temperature:
      ref = scoring.score(logp_fn, params, [(c.prompt, ids)], row_len=160)
      assert r.log_q[r.kept] == pytest.approx(ref[0], abs=1e-3)
    else:
      assert r.log_q == [0.0, 0.0, 0.0]


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
