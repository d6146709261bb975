r"""Probes of an EM workdir on the built-in exercises: measurements that can falsify a design
in minutes, before full runs.

  python -m latent_em.em.probe --config=configs/quickstart.py --workdir=W --what=accuracy \
      --model=runs/base/train
  python -m latent_em.em.probe --config=configs/quickstart.py --workdir=W --what=estep \
      --model=runs/warmstart/train --n=200
  python -m latent_em.em.probe --config=configs/quickstart.py --workdir=W --what=churn

--what=accuracy   greedy accuracy by equations in the working, on the `dev` questions (2 or
                  more steps) and on --n one-step questions made for the probe (none of them
                  in a corpus split): answered directly (latent tokens banned) and, for a
                  thought-trained model, after thinking (`<question> SoL PRIOR`)
--what=estep      the E-step of config.estep (K, temperature, ...) with the model on the first
                  --n exercises of --split (default bootstrap), per answer chunk:
                    sample_right   the share of the K sampled thoughts that are the answer's
                                   right working (mathcorpus.explains: right arithmetic, every
                                   oracle equation, last result the stated answer)
                    kept_right     the probability that the resampled thought (softmax of the
                                   log-weights) is right: what selection keeps
                    any_right      the share of chunks with at least one right sample
                    identical_share
                                   chunks whose K samples are one thought; mean_distinct
                    mean_ess       effective sample size of the weights, in [1, K]
                  Selection works when kept_right is well above sample_right.
--what=churn      no model: the kept thoughts of the workdir's E-step iterations
                  (estep/iter_N), per answer chunk, right or wrong working
                  (mathcorpus.explains); per iteration the share right, and between
                  consecutive iterations the transitions right->right, right->wrong,
                  wrong->right, wrong->wrong and the share of chunks that kept the very same
                  thought. EM climbs when wrong->right outweighs right->wrong; the share right
                  settles where right * P(right->wrong) = wrong * P(wrong->right).
Writes WORKDIR/probes/<what>-<model name>.json and prints it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from typing import Any, Sequence

import jax
import numpy as np

from latent_em import io_utils
from latent_em.data import chunking, mathcorpus, sources
from latent_em.sampling import weights


def _load(config, workdir: str, model: str):
  from latent_em import runtime, train  # pylint: disable=g-import-not-at-top
  from latent_em import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tok_lib.load(os.path.join(workdir, "tokenizer.model"))
  model_cfg = runtime.model_config(config, tokenizer)
  path = model if os.path.isabs(model) else os.path.join(workdir, model)
  return tokenizer, model_cfg, train.load_init_params(path, model_cfg), path


def one_step_questions(cfg: mathcorpus.CorpusConfig, n: int, taken: set[str]
                       ) -> list[dict[str, Any]]:
  """n one-step questions (the pretraining exercises' kind of problem, starting values over
  the whole range) that are not in `taken`."""
  rng = random.Random(f"latent_em.probe/{cfg.seed}/one_step")
  one = dataclasses.replace(cfg, max_operand=cfg.max_value, max_change=cfg.change_cap)
  out, seen = [], set(taken)
  while len(out) < n:
    record = mathcorpus.generate_question(rng, one, steps=1)
    if record["question"] not in seen:
      seen.add(record["question"])
      out.append({"id": f"one_step-{len(out)}", **record})
  return out


def accuracy(config, workdir: str, model: str, n: int = 200) -> dict[str, Any]:
  """Greedy accuracy by steps, both variants for a thought-trained model."""
  from latent_em import runtime  # pylint: disable=g-import-not-at-top
  from latent_em.evaluation import fewshot, job as eval_job  # pylint: disable=g-import-not-at-top
  tokenizer, model_cfg, params, path = _load(config, workdir, model)
  corpus = os.path.join(workdir, "corpus")
  cfg = runtime.section(config, "corpus")
  taken = set()
  for name in ("pretrain", "warmstart", "bootstrap", "validation"):
    for row in fewshot._read_jsonl(os.path.join(corpus, f"{name}.jsonl")):  # pylint: disable=protected-access
      taken.add(mathcorpus.question_of(row["text"]))
  rows = fewshot._read_jsonl(os.path.join(corpus, "dev.jsonl"))  # pylint: disable=protected-access
  rows += one_step_questions(cfg, n, taken)
  examples = [fewshot.to_example("mathcorpus", r, i) for i, r in enumerate(rows)]
  fs = runtime.section(config, "eval").fewshot
  out = {"model": path, "questions": len(examples)}
  for latent in ([False, True] if eval_job.was_thought_trained(path) else [False]):
    res = fewshot.evaluate_fewshot(
        model_cfg, params, tokenizer, examples, "mathcorpus", exemplars=[], latent=latent,
        max_gen_len=fs.max_gen_len, batch_size=fs.batch_size,
        max_seq_len=fs.max_seq_len or runtime.section(config, "data").seq_len)
    out["latent" if latent else "direct"] = {
        "per_steps": res["per_steps"], "no_eol": res["no_eol"], "samples": res["samples"]}
  return out


def estep(config, workdir: str, model: str, n: int = 200, split: str = "bootstrap"
          ) -> dict[str, Any]:
  """Per-sample, kept and any-of-K right working of the E-step's thoughts (module docstring)."""
  from latent_em import runtime  # pylint: disable=g-import-not-at-top
  from latent_em.estep import core  # pylint: disable=g-import-not-at-top
  tokenizer, model_cfg, params, path = _load(config, workdir, model)
  cfg: core.EStepConfig = runtime.section(config, "estep")
  engine = core.Engine(cfg, model_cfg, params, tokenizer)
  texts = [t for _, t in sources.read_texts(os.path.join(workdir, "corpus", f"{split}.jsonl"),
                                            "text", "skip", sources.InputStats())][:n]
  chunks = []  # (sentences, start, stop, prefix, suffix)
  for text in texts:
    sentences = mathcorpus.split_sentences(text)
    pos = 0
    for pair in chunking.chunk_pairs(text, cfg.chunking):
      m = len(mathcorpus.split_sentences(pair.suffix))
      if not pair.context:
        chunks.append((sentences, pos, pos + m, pair.prefix, pair.suffix))
      pos += m
  k = cfg.num_samples
  rng = jax.random.key(cfg.seed)
  stats = {"sample_right": [], "kept_right": [], "any_right": [], "identical": [],
           "distinct": [], "ess": [], "thought_len": [], "ended": []}
  examples = []
  sampled = [engine.chunk(prefix, suffix, jax.random.fold_in(rng, i), tag=i)
             for i, (_, _, _, prefix, suffix) in enumerate(chunks)]
  for _ in engine.sample(sampled):
    pass
  results = engine.score(sampled, np.random.default_rng(cfg.seed))
  for (sentences, start, stop, _, suffix), c, res in zip(chunks, sampled, results):
    bodies = [s.tokens[:-1] if s.finished else s.tokens for s in c.samples]
    lw = np.asarray(res.log_weights)
    thoughts = [tokenizer.decode(z) for z in bodies]
    right = np.array([bool(mathcorpus.explains(sentences, start, stop, t)) for t in thoughts])
    p = weights.normalized(lw)
    stats["sample_right"].append(right.mean())
    stats["kept_right"].append(float(p @ right))
    stats["any_right"].append(right.any())
    stats["identical"].append(len(set(thoughts)) == 1 and k > 1)
    stats["distinct"].append(len(set(thoughts)))
    stats["ess"].append(res.ess)
    stats["thought_len"].extend(len(z) for z in bodies)
    stats["ended"].extend(s.finished and bool(s.tokens) and s.tokens[-1] == engine.eol
                          for s in c.samples)
    if len(examples) < 3:
      examples.append({"question": "".join(sentences[:start]), "answer": suffix,
                       "thoughts": thoughts, "log_weights": lw.round(2).tolist(),
                       "right": right.tolist()})
  out = {name: float(np.mean(v)) if v else None for name, v in stats.items()}
  out = {"model": path, "chunks": len(chunks), "num_samples": k,
         "temperature": cfg.sampling.temperature, "sample_right": out["sample_right"],
         "kept_right": out["kept_right"], "any_right": out["any_right"],
         "identical_share": out["identical"], "mean_distinct": out["distinct"],
         "mean_ess": out["ess"], "mean_thought_len": out["thought_len"],
         "frac_ended_with_eol": out["ended"], "examples": examples}
  return out


def kept_thoughts(records_glob: str
                  ) -> tuple[dict[tuple[str, int], tuple[str | None, bool]], int]:
  """(doc_id, chunk index) -> (kept thought, whether it is the right working) for every chunk
  of the records that states a derived number, and the number of records left out because
  their chunks do not end at sentence ends."""
  from latent_em.data import records  # pylint: disable=g-import-not-at-top
  out, unaligned = {}, 0
  for rec in records.read_records(records_glob):
    verdicts = mathcorpus.chunk_verdicts([(c.suffix, c.thought) for c in rec.chunks])
    if verdicts is None:
      unaligned += 1
      continue
    for i, (c, ok) in enumerate(zip(rec.chunks, verdicts)):
      if ok is not None:
        out[(rec.doc_id, i)] = (c.thought, ok)
  return out, unaligned


def churn(workdir: str) -> dict[str, Any]:
  """Right/wrong transitions of the kept thoughts between E-step iterations (docstring)."""
  iters, unaligned = [], []
  i = 1
  while os.path.isdir(os.path.join(workdir, "estep", f"iter_{i}", "estep")):
    kept, skipped = kept_thoughts(os.path.join(workdir, "estep", f"iter_{i}", "estep",
                                               "records-*-of-*.tfrecord"))
    iters.append(kept)
    unaligned.append(skipped)
    i += 1
  if not iters:
    raise FileNotFoundError(f"no E-step records under {workdir}/estep/iter_1/estep; run the "
                            "EM job (config.em.iterations >= 1) first")
  out = {"iterations": [{"iteration": t + 1, "chunks": len(k), "unaligned_records": u,
                         "right": float(np.mean([ok for _, ok in k.values()])) if k else None}
                        for t, (k, u) in enumerate(zip(iters, unaligned))],
         "transitions": []}
  for t in range(1, len(iters)):
    a, b = iters[t - 1], iters[t]
    keys = [key for key in a if key in b]
    counts = {"right->right": 0, "right->wrong": 0, "wrong->right": 0, "wrong->wrong": 0}
    same = 0
    for key in keys:
      (ta, ra), (tb, rb) = a[key], b[key]
      counts[f"{'right' if ra else 'wrong'}->{'right' if rb else 'wrong'}"] += 1
      same += ta == tb
    n = max(len(keys), 1)
    right_before = counts["right->right"] + counts["right->wrong"]
    wrong_before = counts["wrong->right"] + counts["wrong->wrong"]
    out["transitions"].append({
        "from": t, "to": t + 1, "chunks": len(keys),
        **{name: v / n for name, v in counts.items()},
        "same_thought": same / n,
        "p_right_lost": counts["right->wrong"] / right_before if right_before else None,
        "p_wrong_fixed": counts["wrong->right"] / wrong_before if wrong_before else None})
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from latent_em import config_lib  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    if f.what == "churn":
      res = churn(f.workdir)
    elif not f.model:
      sys.exit(f"error: --what={f.what} needs --model=<a train workdir>, e.g. runs/warmstart/train")
    elif f.what == "accuracy":
      res = accuracy(_CONFIG.value, f.workdir, f.model, f.n)
    else:
      res = estep(_CONFIG.value, f.workdir, f.model, f.n, f.split)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  name = (f.model.rstrip("/").replace("/train", "").rsplit("/", 1)[-1] if f.model
          else "estep")
  io_utils.write_json(os.path.join(f.workdir, "probes", f"{f.what}-{name}{f.tag}.json"), res)
  print(json.dumps({k: v for k, v in res.items() if k not in ("examples",)}, indent=1,
                   default=str))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The EM run's config file[:variant].")
  flags.DEFINE_string("workdir", None, "The EM job's workdir.")
  flags.DEFINE_string("model", None, "A train workdir (relative to --workdir or absolute); "
                      "not for --what=churn.")
  flags.DEFINE_enum("what", "estep", ["estep", "accuracy", "churn"], "What to measure.")
  flags.DEFINE_integer("n", 200, "Exercises (estep) or one-step questions (accuracy).")
  flags.DEFINE_string("split", "bootstrap", "The corpus split the E-step probe reads.")
  flags.DEFINE_string("tag", "", "Appended to the output file's name.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
