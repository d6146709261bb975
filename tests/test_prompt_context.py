"""The contexts the evaluation and the E-step give a model occur, token for token, in the layout it
was trained on (the quickstart's exercises): a prompt the model never saw in training would
measure something else than what training taught."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from conftest import REPO
from latent_em import formats, model, runtime, tokenizer
from latent_em.data import chunking, mathcorpus, records, thought_tasks
from latent_em.estep import core
from latent_em.sampling import continuous
from latent_em.evaluation import fewshot


def _quickstart(arg=None):
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs",
                                                                   "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = _quickstart("smoke")
  splits = mathcorpus.make_splits(config.corpus)
  texts = [r["text"] for name in ("warmstart", "bootstrap", "pretrain_cot")
           for r in splits[name]]
  root = str(tmp_path_factory.mktemp("context"))
  tok = tokenizer.load(tokenizer.train(texts, os.path.join(root, "tok.model"), 400,
                                       split_digits=False))
  return config, splits, tok


def _record(text, config):
  """A teacher record of `text` as the quickstart's teacher stage writes it."""
  rec = records.DocRecord(doc_id="d0", text=text)
  chunks = chunking.chunk_document(text, config.synthesis.chunking)
  for pair in chunking.chunk_pairs(chunks, prefix_chunks=1):
    thought = mathcorpus.oracle_thought("".join(chunks[:pair.index]), pair.suffix)
    rec.chunks.append(records.ChunkRecord(pair.prefix, pair.suffix, thought, source="teacher"))
  return rec


def _trained(rec, tok, config, prior):
  """Token ids of the document as training lays it out, every chunk in the prior form (prior)
  or in the posterior form."""
  text = thought_tasks.layout_document(
      rec, "random", epoch=0, seed=0, prior_rate=1.0 if prior else 0.0,
      empty_thoughts=config.mstep_data.empty_thoughts)
  return tok.encode(text, bos=True, eos=True)


def _starts(ids, prefix):
  return list(ids[:len(prefix)]) == list(prefix)


def _engine_calls(tok, config, pairs, thought_ids):
  """The posterior prompts and (context, target) pairs core.Engine builds for `pairs`, with a
  continuous sampler that returns `thought_ids` + EoL for every sample and a scorer that
  records."""
  cfg = runtime.section(config, "estep")
  mcfg = model.ModelConfig(vocab_size=-(-tok.vocab_size // 128) * 128, dim=32, n_layers=1,
                           n_heads=2, n_kv_heads=1, mlp_dim=64)
  engine = core.Engine(cfg, mcfg, model.init_params(mcfg, jax.random.key(0)), tok)
  seen = {"prompts": [], "pairs": []}
  body = list(thought_ids) + [engine.eol]

  class Sampler:
    """Records each request's prompt; every sample is `thought_ids` + EoL."""
    def run(self, params, requests):
      del params
      for req in requests:
        seen["prompts"].append(list(req.prompt))
        yield req, [continuous.Sample(body, np.zeros(len(body), np.float32), True)
                    for _ in range(cfg.num_samples)]

  def score(fn, params, joint, *args, **kwargs):
    seen["pairs"] += joint
    return np.zeros(len(joint))

  engine.sampler = Sampler()
  original, core.scoring.score = core.scoring.score, score
  try:
    engine.process(pairs, jax.random.key(0), np.random.default_rng(0))
  finally:
    core.scoring.score = original
  return seen


def test_every_prompt_context_occurs_in_the_trained_layout(setup):
  config, splits, tok = setup
  fs = config.eval.fewshot
  budget = fs.max_seq_len - fs.max_gen_len
  for row in splits["bootstrap"][:12]:
    text = row["text"]
    rec = _record(text, config)
    prior, posterior = (_trained(rec, tok, config, p) for p in (True, False))
    question = mathcorpus.question_of(text)
    # The question is context: no thought of its own; the answer's thought is its working.
    assert [c.thought is None for c in rec.chunks] == [True, False]
    assert rec.chunks[0].suffix == question
    # Evaluation: the question prompt (every run) and the latent prompt (thought-trained runs).
    direct = fewshot.fit_prompt(tok, [], question, "mathcorpus", False, budget).ids
    latent = fewshot.fit_prompt(tok, [], question, "mathcorpus", True, budget).ids
    assert _starts(prior, direct) and _starts(posterior, direct)
    assert _starts(prior, latent)
    assert prior[len(latent) - 2:len(latent)] == [tok.latent_ids[formats.SOL],
                                                   tok.latent_ids[formats.PRIOR]]
    # The E-step's prompt and joint target, as core.Engine builds them, for every chunk it
    # samples (the answer; the question is context and gets no call).
    pairs = [(p.prefix, p.suffix)
             for p in chunking.chunk_pairs(text, config.estep.chunking) if not p.context]
    assert pairs == [(question, text[len(question):])]
    thought = tok.encode(rec.chunks[1].thought)
    seen = _engine_calls(tok, config, pairs, thought)
    k = config.estep.num_samples
    assert len(seen["prompts"]) == 1 and len(seen["pairs"]) == k
    assert _starts(posterior, seen["prompts"][0])
    assert seen["prompts"][0][-2:] == [tok.latent_ids[formats.SOL], tok.latent_ids[formats.POST]]
    context, target = seen["pairs"][0]
    assert prior[:-1] == context + target  # the trained document up to its EOS


def test_the_check_fails_for_a_layout_that_opens_with_an_empty_thought(setup):
  """With the question trained in the prior form with an empty thought (`SoL PRIOR EoL
  <question>`), neither the question prompt nor the E-step's raw prefix occurs in training."""
  config, splits, tok = setup
  with config.unlocked():
    config.mstep_data.empty_thoughts = True
  text = splits["bootstrap"][0]["text"]
  rec = _record(text, config)
  prior = _trained(rec, tok, config, True)
  question = mathcorpus.question_of(text)
  budget = config.eval.fewshot.max_seq_len - config.eval.fewshot.max_gen_len
  latent = fewshot.fit_prompt(tok, [], question, "mathcorpus", True, budget).ids
  assert not _starts(prior, latent)
  seen = _engine_calls(tok, config, [(question, text[len(question):])],
                       tok.encode(rec.chunks[1].thought))
  context, target = seen["pairs"][0]
  assert prior[:-1] != context + target
