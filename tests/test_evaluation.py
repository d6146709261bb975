"""Evaluation tests: few-shot prompts on real GSM8K / MATH records, answer scoring with known
generations, greedy decoding vs a plain forward loop, latent-token banning, validation NLL vs
a per-document forward, validation ELBO vs the engine's log-weights, and the eval job."""
import collections
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp

from latent_em import checkpoint, config_defaults, formats, io_utils, model, tokenizer
from latent_em.data import chunking, mathcorpus
from latent_em.estep import core
from latent_em.evaluation import fewshot, intrinsic, job

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA),
                                reason=f"shared data folder {os.path.abspath(DATA)} is missing")
MODEL = dict(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
CORPUS = dict(n_warmstart=10, n_bootstrap=200, n_validation=6, n_eval=6, n_fewshot=4)


def _jsonl(rel: str) -> list[dict]:
  with open(os.path.join(DATA, rel)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """(train workdir with params/ + tokenizer.model, tokenizer, model config, params, splits)."""
  root = str(tmp_path_factory.mktemp("eval"))
  splits = mathcorpus.make_splits(mathcorpus.CorpusConfig(**CORPUS))
  workdir = os.path.join(root, "train")
  tok = tokenizer.load(tokenizer.train([d["text"] for d in splits["bootstrap"]],
                                       os.path.join(workdir, "tokenizer.model"), 360))
  cfg = model.ModelConfig(**MODEL)
  params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
  checkpoint.save_params(params, os.path.join(workdir, "params"))
  # Restored like the eval job restores them (committed arrays), so compiled code is shared.
  params = checkpoint.load_params(os.path.join(workdir, "params"))
  return workdir, tok, cfg, params, splits


def _examples(splits, name):
  return [fewshot.to_example("mathcorpus", r, i) for i, r in enumerate(splits[name])]


# ----------------------------------------------------------------------------- prompts


@needs_data
def test_gsm8k_prompt_on_real_records():
  cfg = fewshot.FewShotConfig(tasks=("gsm8k",), gsm8k_dir=os.path.join(DATA, "gsm8k"),
                              max_examples=3)
  exemplars, examples = fewshot.load_task("gsm8k", cfg)
  train, test = _jsonl("gsm8k/train.jsonl"), _jsonl("gsm8k/test.jsonl")
  assert len(exemplars) == 8 and len(examples) == 3
  assert exemplars[0].solution == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 "
                                   "clips altogether in April and May.\nThe answer is 72.")
  assert examples[0].answer == "18" and examples[0].question == test[0]["question"]
  prompt = fewshot.build_prompt(exemplars, examples[0].question, "gsm8k")
  blocks = prompt.split("\n\n")
  assert len(blocks) == 9 and prompt.count("Question: ") == 9
  for block, record in zip(blocks[:8], train[:8]):
    final = record["answer"].rsplit("####", 1)[1].strip()
    assert block.startswith(f"Question: {record['question']}\nAnswer: ")
    assert block.endswith(f"\nThe answer is {final}.")
  assert "####" not in prompt and "<<" not in prompt
  assert blocks[8] == f"Question: {test[0]['question']}\nAnswer:"
  # A seeded sample draws other exemplars, reproducibly.
  seeded = dataclasses.replace(cfg, exemplar_seed=1)
  a, b = fewshot.load_task("gsm8k", seeded)[0], fewshot.load_task("gsm8k", seeded)[0]
  assert a == b and a != exemplars and len({e.question for e in a}) == 8


@needs_data
def test_math_prompt_on_real_records():
  cfg = fewshot.FewShotConfig(tasks=("math",), math_dir=os.path.join(DATA, "math"),
                              math_split="math500", max_examples=2)
  exemplars, examples = fewshot.load_task("math", cfg)
  train, m500 = _jsonl("math/train.jsonl"), _jsonl("math/math500.jsonl")
  assert len(exemplars) == 4 and len(examples) == 2
  assert examples[0].answer == m500[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
  assert (examples[0].subject, examples[0].level) == ("Precalculus", 2)
  prompt = fewshot.build_prompt(exemplars, examples[1].question, "math")
  expected = "".join(f"Problem:\n{r['problem']}\n\nSolution:\n{r['solution']}\n\n"
                     for r in train[:4]) + f"Problem:\n{m500[1]['problem']}\n\nSolution:"
  assert prompt == expected
  assert prompt.count("Problem:\n") == 5 and prompt.count(r"\boxed") == 4
  from latent_em.evaluation.answers import extract_math_answer
  assert [extract_math_answer(e.solution) for e in exemplars] == [r["answer"] for r in train[:4]]


def test_overlong_prompts_drop_oldest_exemplars(assets):
  _, tok, _, _, splits = assets
  exemplars, ex = _examples(splits, "fewshot"), _examples(splits, "eval")[0]
  full = tok.encode(fewshot.build_prompt(exemplars, ex.question, "mathcorpus"), bos=True)
  two = tok.encode(fewshot.build_prompt(exemplars[2:], ex.question, "mathcorpus"), bos=True)
  p = fewshot.fit_prompt(tok, exemplars, ex.question, "mathcorpus", False, len(two))
  assert (p.ids, p.shots, p.question_cut) == (two, 2, False)
  assert fewshot.fit_prompt(tok, exemplars, ex.question, "mathcorpus", False,
                            len(full)).ids == full
  # Too short even for the question alone: its last tokens are kept after BOS.
  q = tok.encode(ex.question, bos=True)
  p = fewshot.fit_prompt(tok, exemplars, ex.question, "mathcorpus", False, 10)
  assert p.ids == [tok.bos_id] + q[-9:] and p.shots == 0 and p.question_cut
  # The latent variant ends with SoL PRIOR; the raw one holds no latent id.
  ids = tok.latent_ids
  lat = fewshot.fit_prompt(tok, exemplars, ex.question, "mathcorpus", True, 4096).ids
  raw = fewshot.fit_prompt(tok, exemplars, ex.question, "mathcorpus", False, 4096).ids
  assert lat[-2:] == [ids[formats.SOL], ids[formats.PRIOR]] and lat[:-2] == raw
  assert not set(raw) & set(ids.values())


# ----------------------------------------------------------------------------- scoring


def _fake_generate(tok, texts, seen):
  def fake(model_cfg, params, prompts, **kw):
    seen.append((prompts, kw))
    assert len(prompts) == len(texts)
    return [(tok.encode(t), True) for t in texts]
  return fake


@needs_data
def test_known_generations_are_scored_exactly(assets, monkeypatch):
  """A generation equal to the gold solution is correct, a wrong one is not; accuracy is the
  exact fraction; text after the exemplar separator is ignored."""
  _, tok, cfg, params, _ = assets
  gcfg = fewshot.FewShotConfig(tasks=("gsm8k",), gsm8k_dir=os.path.join(DATA, "gsm8k"),
                               max_examples=5)
  exemplars, examples = fewshot.load_task("gsm8k", gcfg)
  gold = [" " + e.solution for e in examples]
  texts = [
      gold[0] + "\n\nQuestion: Tom has 999 apples.\nAnswer: The answer is 999.",   # correct
      gold[1].replace(f"The answer is {examples[1].answer}.",
                      f"The answer is {int(examples[1].answer) + 1}."),          # wrong number
      " The answer is 7.\n\nQuestion: x\nAnswer: The answer is " + examples[2].answer + ".",
      " I do not know.",                                                           # no number
      gold[4],                                                                     # correct
  ]
  seen = []
  monkeypatch.setattr(fewshot, "generate", _fake_generate(tok, texts, seen))
  res = fewshot.evaluate_fewshot(cfg, params, tok, examples, "gsm8k", exemplars=exemplars,
                                 latent=False, max_gen_len=64, batch_size=2, max_seq_len=100000,
                                 keep_samples=5)
  assert [s["correct"] for s in res["samples"]] == [True, False, False, False, True]
  assert res["accuracy"] == 2 / 5 and res["correct"] == 2 and res["n"] == 5
  assert res["no_answer"] == 1 and res["samples"][0]["pred"] == examples[0].answer
  assert res["per_question"] == "10001"  # in the examples' order, for paired comparisons
  assert res["questions_digest"] == fewshot.questions_digest([e.id for e in examples])
  assert res["questions_digest"] != fewshot.questions_digest([e.id for e in examples[::-1]])
  assert set(tok.latent_ids.values()) <= set(seen[0][1]["banned_ids"])

  mcfg = fewshot.FewShotConfig(tasks=("math",), math_dir=os.path.join(DATA, "math"),
                               math_split="math500", max_examples=4)
  exemplars, examples = fewshot.load_task("math", mcfg)
  texts = ["\n" + examples[0].solution,
           "\n" + examples[1].solution + "\n\nProblem:\nWhat is 1+1?\n\nSolution:\n$\\boxed{2}$",
           "\nSo the answer is $\\boxed{15}$.",   # gold is 14/3
           "\nThe final answer is $\\frac{18}{2}$."]  # gold is 9: equivalent
  monkeypatch.setattr(fewshot, "generate", _fake_generate(tok, texts, seen))
  res = fewshot.evaluate_fewshot(cfg, params, tok, examples, "math", exemplars=exemplars,
                                 latent=False, max_gen_len=64, batch_size=2, max_seq_len=100000,
                                 keep_samples=4)
  assert [s["correct"] for s in res["samples"]] == [True, True, False, True]
  assert res["accuracy"] == 3 / 4
  subjects = [e.subject for e in examples]
  assert res["per_subject"] == {
      s: {"accuracy": float(np.mean([c for c, t in zip([1, 1, 0, 1], subjects) if t == s])),
          "n": subjects.count(s)} for s in set(subjects)}


def test_latent_generations_answer_after_eol(assets, monkeypatch):
  _, tok, cfg, params, splits = assets
  exemplars, examples = _examples(splits, "fewshot"), _examples(splits, "eval")[:4]
  eol = formats.EOL
  a = [e.answer for e in examples]
  texts = [
      f" 1 + 1 = 2.{eol} {examples[0].solution}\n\nQuestion: The answer is 0.",        # correct
      f" The answer is {a[1]}. {examples[1].solution}",                                 # no EoL
      f" The answer is {a[2]}.{eol} The answer is {int(a[2]) + 1}.",                    # wrong
      f"\n\nQuestion: thoughts may hold separators{eol} The answer is {a[3]}.\n\njunk",  # correct
  ]
  seen = []
  monkeypatch.setattr(fewshot, "generate", _fake_generate(tok, texts, seen))
  res = fewshot.evaluate_fewshot(cfg, params, tok, examples, "mathcorpus", exemplars=exemplars,
                                 latent=True, max_gen_len=64, batch_size=2, max_seq_len=100000,
                                 keep_samples=4)
  assert [s["correct"] for s in res["samples"]] == [True, False, False, True]
  assert res["accuracy"] == 0.5 and res["no_eol"] == 1
  ids = tok.latent_ids
  assert all(p[-2:] == [ids[formats.SOL], ids[formats.PRIOR]] for p in seen[0][0])
  assert not set(ids.values()) & set(seen[0][1]["banned_ids"])


def test_a_constant_answer_is_flagged_with_its_accuracy(assets, monkeypatch):
  """One answer to every question scores the share of questions with that gold answer: the
  result reports how many different answers were given and the best constant's accuracy."""
  _, tok, cfg, params, splits = assets
  examples = _examples(splits, "eval")[:12]
  golds = collections.Counter(e.answer for e in examples)
  modal = golds.most_common(1)[0][0]
  texts = [f" The answer is {modal}."] * len(examples)
  monkeypatch.setattr(fewshot, "generate", _fake_generate(tok, texts, []))
  res = fewshot.evaluate_fewshot(cfg, params, tok, examples, "mathcorpus", exemplars=[],
                                 latent=False, max_gen_len=8, batch_size=4, max_seq_len=100000)
  assert res["distinct_preds"] == 1
  assert res["accuracy"] == res["constant_answer_accuracy"] == golds[modal] / len(examples)
  texts = [f" The answer is {e.answer}." for e in examples]
  monkeypatch.setattr(fewshot, "generate", _fake_generate(tok, texts, []))
  res = fewshot.evaluate_fewshot(cfg, params, tok, examples, "mathcorpus", exemplars=[],
                                 latent=False, max_gen_len=8, batch_size=4, max_seq_len=100000)
  assert res["accuracy"] == 1.0 and res["distinct_preds"] == len(golds)


# ----------------------------------------------------------------------------- generation


_FORWARD = jax.jit(model.forward, static_argnums=0)


def _manual_greedy(cfg, params, prompt, max_gen, banned, stop, buf_len=128):
  """Greedy decoding by full forward passes (no cache) over a fixed-size causal buffer."""
  fwd = functools.partial(_FORWARD, cfg)
  buf = np.zeros((1, buf_len), np.int32)
  buf[0, :len(prompt)] = prompt
  out = []
  for t in range(max_gen):
    logits = np.array(fwd(params, jnp.asarray(buf))[0, len(prompt) + t - 1])
    logits[list(banned)] = -np.inf
    nxt = int(np.argmax(logits))
    if nxt in stop:
      return out, True
    out.append(nxt)
    buf[0, len(prompt) + t] = nxt
  return out, False


def test_greedy_generation_matches_forward_loop(assets):
  _, tok, cfg, params, splits = assets
  exemplars, examples = _examples(splits, "fewshot"), _examples(splits, "eval")
  gen, budget = 8, 120  # the eval job test's settings: its raw sampler is compiled once
  prompts = [fewshot.fit_prompt(tok, [], e.question, "mathcorpus", False, budget).ids
             for e in examples[:3]]
  assert len({len(p) for p in prompts}) == 3 and len({tuple(p) for p in prompts}) == 3
  banned = fewshot.banned_ids_for(tok, cfg, latent=False)
  kw = dict(max_gen_len=gen, batch_size=2, max_seq_len=budget + gen, pad_id=tok.pad_id,
            banned_ids=banned)
  ref = [_manual_greedy(cfg, params, p, gen, banned, {tok.eos_id}) for p in prompts]
  assert fewshot.generate(cfg, params, prompts, stop_ids=(tok.eos_id,), **kw) == ref
  # Stop on a token the reference produces at step 4 of prompt 0: rows must stop there.
  stop_tok = ref[0][0][3]
  ref = [_manual_greedy(cfg, params, p, gen, banned, {tok.eos_id, stop_tok}) for p in prompts]
  assert ref[0] == (ref[0][0][:3], True)
  assert fewshot.generate(cfg, params, prompts, stop_ids=(tok.eos_id, stop_tok), **kw) == ref
  # evaluate_fewshot builds the same prompt and decodes the same greedy tokens.
  res = fewshot.evaluate_fewshot(cfg, params, tok, examples[2:3], "mathcorpus",
                                 exemplars=[], latent=False, max_gen_len=gen,
                                 batch_size=2, max_seq_len=budget + gen, keep_samples=1)
  stops = {i for i in range(tok.vocab_size)
           if "\n\n" in tok.decode([i]) or "Question:" in tok.decode([i])} | {tok.eos_id}
  free = _manual_greedy(cfg, params, prompts[2], gen, banned, stops)
  assert res["samples"][0]["generation"] == tok.decode(free[0])


def test_latent_tokens_never_generated_when_banned(assets, monkeypatch):
  """With the latent tokens' logits boosted far above the rest, the raw variant still never
  emits them: every step is the argmax over the allowed ids, while the unrestricted argmax
  would have been a latent token."""
  _, tok, cfg, params, splits = assets
  latent_ids = sorted(tok.latent_ids.values())
  boost = np.zeros((cfg.vocab_size,), np.float32)
  boost[latent_ids] = 50.0
  real_decode, real_prefill = model.decode, model.prefill

  def boosted(*args, **kwargs):
    logits, cache = real_decode(*args, **kwargs)
    return logits + boost, cache

  def boosted_prefill(*args, **kwargs):
    logits, cache = real_prefill(*args, **kwargs)
    return logits + boost, cache

  monkeypatch.setattr(model, "decode", boosted)
  monkeypatch.setattr(model, "prefill", boosted_prefill)
  examples = _examples(splits, "eval")[:2]
  prompts = [fewshot.fit_prompt(tok, [], e.question, "mathcorpus", False, 120).ids
             for e in examples]
  banned = fewshot.banned_ids_for(tok, cfg, latent=False)
  assert set(latent_ids) <= set(banned)
  out = fewshot.generate(cfg, params, prompts, max_gen_len=8, batch_size=2, max_seq_len=128,
                         pad_id=tok.pad_id, banned_ids=banned, stop_ids=(tok.eos_id,))
  for prompt, (ids, _) in zip(prompts, out):
    assert len(ids) == 8 and not set(ids) & set(latent_ids)
    buf = np.zeros((1, 128), np.int32)
    buf[0, :len(prompt) + len(ids)] = prompt + ids
    logits = np.asarray(_FORWARD(cfg, params, jnp.asarray(buf))[0]) + boost
    for i, t in enumerate(ids):
      step = logits[len(prompt) - 1 + i].copy()
      assert int(np.argmax(step)) in latent_ids
      step[list(banned)] = -np.inf
      assert int(np.argmax(step)) == t
  res = fewshot.evaluate_fewshot(cfg, params, tok, examples, "mathcorpus", exemplars=[],
                                 latent=False, max_gen_len=8, batch_size=2, max_seq_len=128)
  assert res["samples"][0]["generation"] == tok.decode(out[0][0])
  assert all(formats.contains_latent_token(s["generation"]) is None for s in res["samples"])


# ----------------------------------------------------------------------------- intrinsic


def test_validation_nll_matches_per_document_forward(assets):
  _, tok, cfg, params, splits = assets
  texts = [d["text"] for d in splits["validation"][:3]]
  texts.append(" ".join(d["text"] for d in splits["bootstrap"][:4]))  # several pieces
  seq_len = 64
  res = intrinsic.validation_nll(cfg, params, tok, texts, seq_len=seq_len, batch_size=2)
  pieces = []
  for text in texts:
    ids = tok.encode(text) + [tok.eos_id]
    pieces += [ids[s:s + seq_len] for s in range(0, len(ids), seq_len)]
  total = 0.0
  for piece in pieces:
    inputs = np.zeros((1, 128), np.int32)  # causal: padding after the piece is inert
    inputs[0, :len(piece)] = [tok.bos_id] + piece[:-1]
    logp = np.asarray(jax.nn.log_softmax(_FORWARD(cfg, params, jnp.asarray(inputs))[0], -1))
    total -= float(logp[np.arange(len(piece)), piece].sum())
  count = sum(len(p) for p in pieces)
  assert len(tok.encode(texts[-1])) > 2 * seq_len
  assert res["tokens"] == count and res["docs"] == 4
  assert res["nll_per_token"] == pytest.approx(total / count, rel=1e-5)


def test_validation_elbo_aggregates_engine_log_weights(assets, monkeypatch):
  _, tok, cfg, params, splits = assets
  # One prompt bucket (152 = max_seq_len - max_gen_len): a single sampler compile.
  estep_cfg = core.EStepConfig(max_seq_len=160, batch_chunks=4, prompt_bucket=152,
                               chunking=chunking.ChunkConfig(avg_units=2, prefix_chunks=3),
                               sampling=core.sampler_lib.SamplingConfig(max_gen_len=8))
  texts = [d["text"] for d in splits["validation"][:2]]
  captured = []
  real = core.Engine.process

  def spy(self, pairs, rng, select_rng):
    out = real(self, pairs, rng, select_rng)
    captured.extend(out)
    return out

  monkeypatch.setattr(core.Engine, "process", spy)
  res = intrinsic.validation_elbo(cfg, params, tok, texts, estep_cfg=estep_cfg, ks=(1, 2, 4),
                                  seed=3)
  n_chunks = sum(len(chunking.chunk_document(t, estep_cfg.chunking)) for t in texts)
  assert len(captured) == res["chunks"] == n_chunks > 2
  tokens = 0
  sums = {1: 0.0, 2: 0.0, 4: 0.0}
  for r in captured:
    lw = np.asarray(r.log_joint) - np.asarray(r.log_q)
    assert len(lw) == 4 and np.allclose(lw, r.log_weights)
    for k in sums:
      sums[k] += logsumexp(lw[:k]) - np.log(k)
    tokens += r.suffix_tokens
  assert res["suffix_tokens"] == tokens
  for k, v in sums.items():
    assert res["elbo_per_token"][str(k)] == pytest.approx(v / tokens, rel=1e-6)
  p = np.exp(lw - logsumexp(lw))
  assert 1.0 <= res["mean_ess"] <= 4.0 and captured[-1].ess == pytest.approx(1 / np.sum(p * p))


# ----------------------------------------------------------------------------- job


def test_latent_auto_reads_the_training_workdir(tmp_path):
  work = tmp_path / "w"
  (work / "params").mkdir(parents=True)
  (work / "params" / "_CHECKPOINT_METADATA").write_text("{}")
  assert not job.was_thought_trained(str(work))
  io_utils.write_json(str(work / "train_summary.json"), {"data_format": "random"})
  assert job.was_thought_trained(str(work)) and job.was_thought_trained(str(work / "params"))
  for fmt in ("raw", "pure", "posterior_only"):  # no `SoL PRIOR z EoL x` in training
    io_utils.write_json(str(work / "train_summary.json"), {"data_format": fmt})
    assert job.variants("auto", str(work))[0] == [False]
  job.mark_thought_trained(str(work), iteration=1)
  assert job.variants("auto", str(work / "params"))[0] == [True]
  assert job.variants("both", str(work))[0] == [False, True]
  assert fewshot.FewShotConfig(latent=True).latent == "on"
  with pytest.raises(ValueError, match="config.eval.fewshot.latent"):
    fewshot.FewShotConfig(latent="sometimes")
  with pytest.raises(ValueError, match="config.eval.fewshot.gsm8k_dir"):
    fewshot.FewShotConfig(tasks=("gsm8k",))
  config = config_defaults.base()
  config.eval = ml_collections.ConfigDict({"fewshot": {"mathcorpus_shots": 2}})
  with pytest.raises(ValueError, match="config.eval.init_from is empty"):
    job.run(config, str(tmp_path / "out"))
  config.eval.fewshot.shots = 2
  with pytest.raises(ValueError, match="unknown config key config.eval.fewshot.shots"):
    job.run(config, str(tmp_path / "out"))


@needs_data
def test_eval_job_writes_results(assets, tmp_path):
  workdir, tok, cfg, params, splits = assets
  config = config_defaults.base()
  config.job = "eval"
  config.model.update(MODEL)
  config.corpus.update(CORPUS)
  config.data.seq_len = 128
  config.estep.max_seq_len = 160
  config.estep.batch_chunks = 4
  config.estep.prompt_bucket = 152
  config.estep.sampling.max_gen_len = 8
  config.estep.chunking.avg_units = 3
  if "eval" not in config:
    config.eval = ml_collections.ConfigDict(dataclasses.asdict(job.EvalConfig()))
  config.eval.update(dict(
      init_from=workdir, nll_files=("builtin:mathcorpus/validation",),
      elbo_files=("builtin:mathcorpus/validation",), max_docs=2, seq_len=64, nll_batch_size=2,
      progress_bar=False))
  config.eval.fewshot.update(dict(
      tasks=("mathcorpus", "gsm8k", "math"), latent="both", max_examples=2, max_gen_len=8,
      batch_size=2, max_seq_len=128, gsm8k_dir=os.path.join(DATA, "gsm8k"),
      math_dir=os.path.join(DATA, "math"), math_split="math500"))
  out = str(tmp_path / "out")
  returned = job.run(config, out)
  results = json.load(open(os.path.join(out, "eval", "results.json")))
  assert set(results) >= {"accuracy", "latent_accuracy", "nll_per_token", "elbo_per_token",
                          "per_subject", "samples"}
  assert set(results["accuracy"]) == set(results["latent_accuracy"]) == {"mathcorpus", "gsm8k",
                                                                         "math"}
  assert all(0.0 <= a <= 1.0 for a in results["accuracy"].values())
  # The constant-answer level per task equals the one the few-shot details report.
  assert results["constant_answer_accuracy"] == {
      t: results["details"]["fewshot"][t]["constant_answer_accuracy"]
      for t in ("mathcorpus", "gsm8k", "math")}
  assert set(results["elbo_per_token"]) == {"1", "2", "4"}
  assert all(v < 0 for v in results["elbo_per_token"].values())
  assert results["nll_per_token"] > 0 and set(results["per_subject"]) == {"math", "math:latent"}
  assert len(results["samples"]) == 6 * 2
  details = results["details"]["fewshot"]
  assert details["gsm8k"]["truncated"] == 2 and details["gsm8k"]["n"] == 2  # 8 shots > 120
  assert results["details"]["nll"]["docs"] == 2
  assert returned["accuracy"] == results["accuracy"]


_SHARDED_JOB = """
import dataclasses, json, os, sys
import jax, ml_collections
import test_evaluation as te
from latent_em import checkpoint, config_defaults, model, tokenizer
from latent_em.data import mathcorpus
from latent_em.evaluation import job
root = sys.argv[1]
workdir = os.path.join(root, "train")
if not os.path.exists(os.path.join(workdir, "params")):
  splits = mathcorpus.make_splits(mathcorpus.CorpusConfig(**te.CORPUS))
  tokenizer.train([d["text"] for d in splits["bootstrap"]],
                  os.path.join(workdir, "tokenizer.model"), 360)
  params = jax.jit(model.init_params, static_argnums=0)(model.ModelConfig(**te.MODEL),
                                                        jax.random.key(0))
  checkpoint.save_params(params, os.path.join(workdir, "params"))
config = config_defaults.base()
config.model.update(te.MODEL)
config.corpus.update(te.CORPUS)
config.estep.update(dict(max_seq_len=160, batch_chunks=4, prompt_bucket=152))
config.estep.sampling.max_gen_len = 8
if "eval" not in config:
  config.eval = ml_collections.ConfigDict(dataclasses.asdict(job.EvalConfig()))
config.eval.update(dict(init_from=workdir, nll_files=("builtin:mathcorpus/validation",),
                        elbo_files=("builtin:mathcorpus/validation",), max_docs=2, seq_len=64,
                        nll_batch_size=2, progress_bar=False))
config.eval.fewshot.update(dict(tasks=("mathcorpus",), latent="both", max_examples=3,
                                max_gen_len=8, batch_size=2, max_seq_len=128))
r = job.run(config, os.path.join(root, "out%d" % jax.local_device_count()))
print(json.dumps({"samples": [s["generation"] for s in r["samples"]], "nll": r["nll_per_token"],
                  "elbo": r["elbo_per_token"]}))
"""


@pytest.mark.slow
def test_sharded_eval_job_matches_single_device(tmp_path):
  from conftest import run_python  # pylint: disable=import-outside-toplevel
  code = _SHARDED_JOB.replace("sys.argv[1]", repr(str(tmp_path)))
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {"PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests),
                                        os.environ.get("PYTHONPATH", "")])}
  one = json.loads(run_python(code, devices=1, env=env).strip().splitlines()[-1])
  two = json.loads(run_python(code, devices=2, env=env).strip().splitlines()[-1])
  assert one["samples"] == two["samples"] and len(one["samples"]) == 6
  assert two["nll"] == pytest.approx(one["nll"], rel=1e-5)
  for k in ("1", "2", "4"):
    assert two["elbo"][k] == pytest.approx(one["elbo"][k], rel=1e-5)
