"""The headroom analysis: sentence-by-sentence scoring that adds up to the whole story's."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from latent_em import formats, model, tokenizer
from latent_em.data import mathcorpus
from latent_em.em import headroom
from latent_em.sampling import scoring

from conftest import REPO

MODEL = dict(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  splits = mathcorpus.make_splits(mathcorpus.CorpusConfig(
      n_warmstart=0, n_bootstrap=150, n_validation=8, n_eval=0, n_fewshot=0))
  path = str(tmp_path_factory.mktemp("headroom") / "tok.model")
  tok = tokenizer.load(tokenizer.train([d["text"] for d in splits["bootstrap"]], path, 360))
  return tok, [d["text"] for d in splits["validation"]]


@pytest.mark.parametrize("split_digits", [True, False])
def test_sentences_tile_the_story_and_find_the_derived_tokens(split_digits, tmp_path):
  # Numbers up to 20, frequent enough for the whole-number tokenizer to give each a piece.
  splits = mathcorpus.make_splits(mathcorpus.CorpusConfig(
      n_warmstart=0, n_bootstrap=150, n_validation=8, n_eval=0, n_fewshot=0, max_operand=10,
      max_value=20, max_steps=2, plain=True, n_names=4, n_objects=4))
  texts = [d["text"] for d in splits["validation"]]
  tok = tokenizer.load(tokenizer.train([d["text"] for d in splits["bootstrap"]],
                                       str(tmp_path / "t.model"), 512,
                                       split_digits=split_digits))
  n_tokens = n_numbers = 0
  for text in texts:
    sentences, skipped = headroom.story_sentences(tok, text)
    assert skipped == 0
    assert [t for s in sentences for t in s.target] == tok.encode(text)
    assert "".join(s.text for s in sentences) == text
    values = mathcorpus.derived_numbers(mathcorpus.split_sentences(text))
    for s, v in zip(sentences, values):
      spelled = "".join(tok.id_to_piece(s.target[j]).lstrip("\u2581") for j in s.numbers)
      assert spelled == (str(v) if s.thought else ""), (s.text, s.thought)
      n_tokens += len(s.numbers)
      n_numbers += v is not None
  assert n_numbers > 0
  # Digit pieces: one token per digit; whole-number pieces: (mostly) one per number.
  if split_digits:
    assert n_tokens > 1.5 * n_numbers
  else:
    assert n_tokens < 1.2 * n_numbers


def test_measure_adds_up_to_one_forward_over_each_story(assets):
  """The sum over sentences equals scoring each whole story at once (an independent pass)."""
  tok, texts = assets
  cfg = model.ModelConfig(**MODEL)
  params = model.init_params(cfg, jax.random.key(0))
  fn = scoring.make_token_logprobs(cfg)
  res = headroom.measure(fn, params, tok, texts, row_len=512, rows=4)
  whole = scoring.score(fn, params, [([tok.bos_id], tok.encode(t)) for t in texts], 512,
                        rows_per_batch=4)
  assert res["docs"] == len(texts) and res["docs_too_long"] == 0
  assert res["tokens"] == sum(len(tok.encode(t)) for t in texts)
  np.testing.assert_allclose(res["nll_per_token"] * res["tokens"], -whole.sum(), rtol=1e-4)
  d = res["derived_tokens"]
  expected = sum(len(str(v)) for t in texts
                 for v, th in zip(mathcorpus.derived_numbers(mathcorpus.split_sentences(t)),
                                  mathcorpus.sentence_thoughts(mathcorpus.split_sentences(t)))
                 if th)
  assert d["count"] == expected > 0
  # A random model: about log(vocab) nats per digit, a share of all nats in (0, 1).
  assert abs(d["nll_per_number_token"] - np.log(MODEL["vocab_size"])) < 1.0
  assert 0.0 < d["share_of_nats"] < 1.0
  assert res["derived_tokens_given_thought"]["count"] == d["count"]
  # The oracle layout adds up to one forward over each laid-out story (working included).
  o = res["oracle_layout"]
  laid_out = []
  for t in texts:
    sentences = mathcorpus.split_sentences(t)
    laid_out.append("".join(
        (formats.prior_chunk(z, "") if z else "") + s
        for s, z in zip(sentences, mathcorpus.sentence_thoughts(sentences))))
  whole_laid = scoring.score(fn, params, [([tok.bos_id], tok.encode(t)) for t in laid_out], 512,
                             rows_per_batch=4)
  assert o["docs"] == len(texts) and o["tokens"] == res["tokens"]
  assert o["thought_tokens"] == sum(len(tok.encode(t)) for t in laid_out) - o["tokens"] > 0
  np.testing.assert_allclose(o["joint_per_token"] * o["tokens"], -whole_laid.sum(), rtol=1e-4)
  np.testing.assert_allclose(o["nll_per_token"] + o["thought_nats_per_token"],
                             o["joint_per_token"], rtol=1e-6)
  # The markers: an independent pass scores `SoL PRIOR` and `EoL` of every working alone.
  ids = tok.latent_ids
  markers = []
  for t in laid_out:
    row = [tok.bos_id] + tok.encode(t)
    for i in range(1, len(row)):
      if row[i] in (ids[formats.SOL], ids[formats.PRIOR], ids[formats.EOL]):
        markers.append((row[:i], [row[i]]))
  assert len(markers) == 3 * sum(t.count(formats.SOL) for t in laid_out) > 0
  marker_lp = scoring.score(fn, params, markers, 512, rows_per_batch=4)
  np.testing.assert_allclose(o["format_nats_per_token"] * o["tokens"], -marker_lp.sum(),
                             rtol=1e-4)
  assert 0 < o["format_nats_per_token"] < o["thought_nats_per_token"]
  np.testing.assert_allclose(o["nll_per_token_without"], res["nll_per_token"], rtol=1e-6)
  # The whole-story layout adds up to one forward over `SoL PRIOR z* EoL x` per story.
  st = res["story_layout"]
  story = [formats.prior_chunk(mathcorpus.oracle_thought("", t), t) for t in texts]
  whole_story = scoring.score(fn, params, [([tok.bos_id], tok.encode(t)) for t in story], 512,
                              rows_per_batch=4)
  assert st["docs"] == len(texts) and st["tokens"] == res["tokens"]
  assert st["thought_tokens"] == sum(len(tok.encode(t)) for t in story) - st["tokens"]
  np.testing.assert_allclose(st["joint_per_token"] * st["tokens"], -whole_story.sum(),
                             rtol=1e-4)
  np.testing.assert_allclose(st["nll_per_token"] + st["thought_nats_per_token"],
                             st["joint_per_token"], rtol=1e-6)
  # Stories longer than a row are left out and counted, not cut.
  longest = max(len(tok.encode(t)) for t in texts)
  short = headroom.measure(fn, params, tok, texts, row_len=longest, rows=4)
  assert short["docs_too_long"] >= 1 and short["docs"] + short["docs_too_long"] == len(texts)


def test_cli_on_the_smoke_experiment(em_smoke, tmp_path):
  workdir, _ = em_smoke
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  cmd = [sys.executable, "-m", "latent_em.em.headroom", "--config=configs/quickstart.py:smoke",
         "--docs=4"]
  proc = subprocess.run(cmd + [f"--workdir={workdir}"], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| em_iter_2 |" in proc.stdout
  with open(os.path.join(workdir, headroom.OUTPUT)) as f:
    out = json.load(f)
  assert out["docs"] == 4
  assert sorted(out["runs"]) == sorted(["base", "warmstart", "raw_token_matched", "em_iter_1",
                                        "raw_compute_matched", "teacher_all", "em_iter_2"])
  bad = subprocess.run(cmd + [f"--workdir={tmp_path}"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
  assert bad.returncode != 0 and "validation.jsonl not found" in bad.stderr
