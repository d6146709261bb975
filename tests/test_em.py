"""EM orchestration: resumable stages, the oracle teacher backend, the report, and the whole loop."""
import json
import os
import re

import ml_collections
import numpy as np
import pytest

from latent_em import config_lib
from latent_em.data import chunking, mathcorpus, records
from latent_em.em import report
from latent_em.em.stages import Stages, derive
from latent_em.synthesis import job as synthesis_job
from latent_em.synthesis.backend import Request
from latent_em.synthesis.oracle_backend import OracleBackend

from conftest import run_main


def test_derive_sets_nested_keys_without_touching_the_original():
  base = ml_collections.ConfigDict({"a": {"b": 1, "c": (1,)}, "job": "train"})
  out = derive(base, {"a.b": 2, "a.c": [3, 4], "job": "em"})
  assert (out.a.b, out.a.c, out.job) == (2, (3, 4), "em")
  assert (base.a.b, base.a.c, base.job) == (1, (1,), "train")


def test_stages_run_once_and_refuse_a_changed_spec(tmp_path):
  calls = []

  def fn(directory):
    calls.append(directory)
    with open(os.path.join(directory, "out.txt"), "w") as f:
      f.write("x")
    return {"value": 7}

  stages = Stages(str(tmp_path))
  assert stages.run("a/b", {"k": 1}, fn) == {"value": 7}
  assert stages.run("a/b", {"k": 1}, fn) == {"value": 7}
  assert len(calls) == 1
  assert stages.done("a/b")["outputs"] == {"value": 7}
  with pytest.raises(config_lib.ConfigError, match=r"stage 'a/b'.*changed: k"):
    stages.run("a/b", {"k": 2}, fn)


def test_stage_that_fails_leaves_no_marker_and_reruns(tmp_path):
  stages = Stages(str(tmp_path))

  def boom(directory):
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError):
    stages.run("s", {}, boom)
  assert stages.done("s") is None
  assert stages.run("s", {}, lambda d: {"ok": True}) == {"ok": True}


def _story_requests(doc, kind):
  chunks = chunking.chunk_document(doc["text"], chunking.ChunkConfig(avg_units=2, max_units=4))
  reqs = [Request(({"role": "user", "content": "unused"},), tag=str(i),
                  context={"kind": kind, "document_prefix": "".join(chunks[:i]),
                           "suffix": c})
          for i, c in enumerate(chunks)]
  return chunks, reqs


def test_oracle_backend_thoughts_and_wrap_cot():
  docs = mathcorpus.make_splits(mathcorpus.CorpusConfig(
      n_warmstart=20, n_bootstrap=0, n_validation=0, n_eval=0, n_fewshot=0))["warmstart"]
  n_thoughts = 0
  for doc in docs:
    chunks, reqs = _story_requests(doc, "latent_thoughts")
    results = OracleBackend("latent_thoughts").generate(reqs)
    for i, (chunk, res) in enumerate(zip(chunks, results)):
      assert res.ok
      assert res.text == mathcorpus.oracle_thought("".join(chunks[:i]), chunk)
      n_thoughts += res.text is not None
    _, reqs = _story_requests(doc, "wrap_cot")
    cot = OracleBackend("wrap_cot").generate(reqs)
    rewritten = "".join(r.text for r in cot)
    # The rewrite keeps every original sentence, in order, and adds the working.
    pos = 0
    for sentence in mathcorpus.split_sentences(doc["text"]):
      pos = rewritten.index(sentence.strip(), pos)
    assert len(rewritten) > len(doc["text"])
  assert n_thoughts >= len(docs)  # every story derives something
  with pytest.raises(config_lib.ConfigError, match="wrap_simple"):
    OracleBackend("wrap_simple")


def test_synthesis_job_with_the_oracle_backend(tmp_path):
  config = ml_collections.ConfigDict({
      "corpus": {"n_warmstart": 12, "n_bootstrap": 0, "n_validation": 0, "n_eval": 0,
                 "n_fewshot": 0},
      "synthesis": {"backend": "oracle", "input_files": ("builtin:mathcorpus/warmstart",),
                    "docs_per_shard": 5,
                    "chunking": {"avg_units": 2, "max_units": 4, "prefix_chunks": 1}}})
  summary = synthesis_job.run(config, str(tmp_path))
  recs = list(records.read_records(summary["shard_pattern"]))
  assert summary["num_shards"] == 3 and len(recs) == 12
  assert summary["chunks_failed"] == 0
  assert not os.path.exists(tmp_path / "synthesis" / "cache")  # nothing cached
  with_thought = 0
  for rec in recs:
    assert "".join(c.suffix for c in rec.chunks) == rec.text
    before = ""
    for c in rec.chunks:
      assert c.thought == mathcorpus.oracle_thought(before, c.suffix)
      assert c.source == "teacher"
      with_thought += c.thought is not None
      before += c.suffix
  assert summary["chunks_with_thought"] == with_thought > 0


def _fake_results(acc, n=1000):
  """results.json of one experiment; acc: run -> (direct accuracy, latent accuracy or None)."""
  runs = {}
  for name, (direct, latent) in acc.items():
    thought = latent is not None
    steps = {"mathcorpus": {"2": {"accuracy": direct, "n": n // 2},
                            "3": {"accuracy": direct, "n": n - n // 2}}}
    runs[name] = {
        "train": {"train_tokens": 100, "raw_tokens": 50, "steps": 2, "thought_trained": thought,
                  "epochs": 3.0, "fill": 0.5},
        "eval": {"accuracy": {"mathcorpus": direct},
                 "latent_accuracy": {"mathcorpus": latent} if thought else {},
                 "nll_per_token": 1.0 + direct,
                 "elbo_per_token": {"1": -2.0, "2": -1.9, "4": -1.8} if thought else {},
                 "constant_answer_accuracy": {"mathcorpus": 0.08},
                 "questions": {"mathcorpus": n, **({"mathcorpus:latent": n} if thought else {})},
                 "per_steps": steps}}
    if name.startswith("em_iter"):
      runs[name]["estep"] = {"num_samples": 8, "mean_ess": 2.5, "identical_share": 0.25,
                             "mean_distinct_samples": 5.0, "chunks": 100}
  return report.collect(runs)


def _with_answers(res, name, protocol, correct, digest="q"):
  res["runs"][name].setdefault("per_question", {})[protocol] = {"correct": correct,
                                                                "digest": digest}


def test_paired_noise_from_per_question_results():
  """The paired noise is twice the standard error of the mean per-question difference, computed
  here by hand; runs without per-question results, or asked other questions, fall back to the
  binomial noise of two independent accuracies."""
  res = _fake_results({"em_iter_1": (0.2, 0.5), "warmstart": (0.1, 0.4)}, n=10)
  _with_answers(res, "em_iter_1", "latent", "1111100000")
  _with_answers(res, "warmstart", "latent", "1110000001")
  # Differences 0 0 0 1 1 0 0 0 0 -1: mean 0.1, variance 0.3 - 0.01 = 0.29.
  want = 2 * np.sqrt(0.29 / 10)
  a, b = res["runs"]["em_iter_1"], res["runs"]["warmstart"]
  assert np.isclose(report.paired_noise([(a, b)], "best_accuracy"), want)
  lines = [l[2:] for l in report.comparison_lines([res]) if l.startswith("- ")]
  assert (f"em_iter_1 50.0% ahead of warmstart 40.0% by 10.0 points (paired noise: "
          f"{100 * want:.1f})") in lines
  assert report.paired_noise([(a, b)], "accuracy") is None  # direct answers not recorded
  # Two workdirs: the mean difference's variance is the sum of theirs over 2 squared.
  other = _fake_results({"em_iter_1": (0.2, 0.5), "warmstart": (0.1, 0.4)}, n=10)
  _with_answers(other, "em_iter_1", "latent", "1111111111")
  _with_answers(other, "warmstart", "latent", "1111111111")
  c, d = other["runs"]["em_iter_1"], other["runs"]["warmstart"]
  assert np.isclose(report.paired_noise([(a, b), (c, d)], "best_accuracy"), want / 2)
  _with_answers(other, "warmstart", "latent", "1111111111", digest="other questions")
  assert report.paired_noise([(a, b), (c, d)], "best_accuracy") is None
  # The binomial noise instead: 2 sqrt((.5 .5 + .4 .6) / (10 questions x 2 workdirs)).
  lines = [l[2:] for l in report.comparison_lines([res, other]) if l.startswith("- ")]
  assert ("em_iter_1 50.0% ahead of warmstart 40.0% by 10.0 points (noise: 31.3), ahead in 2 "
          "of 2") in lines


def test_report_schema_table_plots_and_aggregate(tmp_path):
  res = _fake_results({"em_iter_1": (0.2, 0.4), "warmstart": (0.05, 0.3),
                       "raw_token_matched": (0.1, None), "base": (0.08, None)})
  runs = res["runs"]
  # The base first, then the runs without EM, then the warm start and the iterations.
  assert list(runs) == ["base", "raw_token_matched", "warmstart", "em_iter_1"]
  r = runs["em_iter_1"]
  assert (r["accuracy"], r["latent_accuracy"], r["best_accuracy"]) == (0.2, 0.4, 0.4)
  assert r["questions"] == 1000 and r["accuracy_by_steps"] == {"2": 0.2, "3": 0.2}
  assert runs["raw_token_matched"]["latent_accuracy"] is None
  assert runs["raw_token_matched"]["best_accuracy"] == 0.1
  report.write(res, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["runs"]["em_iter_1"]["elbo_per_token"]["4"] == -1.8
  table = (tmp_path / "results.md").read_text()
  assert ("| em_iter_1 | 20.0 | 40.0 | 1.200 | -2.000 | -1.900 | -1.800 | 100 | 50 | 3.0 | "
          "8 / 2.50 / 25.0 |") in table
  assert "| base | 8.0 | - | 1.080 |" in table
  assert "1000 held-out questions" in table and "1.6 points" in table
  assert "Always giving the most common gold answer scores 8.0%." in table
  lines = [l[2:] for l in table.splitlines() if l.startswith("- ")]
  # Every run against the base, under the same protocol and each run's best.
  assert "em_iter_1 20.0% ahead of base 8.0% by 12.0 points (noise: 3.1)" in lines
  assert "em_iter_1 40.0% ahead of base 8.0% by 32.0 points (noise: 3.5)" in lines
  assert "raw_token_matched 10.0% ahead of base 8.0% by 2.0 points (noise: 2.6)" in lines
  # Thoughts against raw training: directly (20% against 10%) and at best (40% against 10%).
  assert "em_iter_1 20.0% ahead of raw_token_matched 10.0% by 10.0 points (noise: 3.2)" in lines
  assert "em_iter_1 40.0% ahead of raw_token_matched 10.0% by 30.0 points (noise: 3.6)" in lines
  assert "warmstart 5.0% behind raw_token_matched 10.0% by 5.0 points (noise: 2.3)" in lines
  # EM against the warm start (best protocol), nats against raw training.
  assert "em_iter_1 40.0% ahead of warmstart 30.0% by 10.0 points (noise: 4.2)" in lines
  assert "em_iter_1 1.200 behind raw_token_matched 1.100 by 0.100" in lines
  assert "warmstart 1.050 ahead of raw_token_matched 1.100 by 0.050" in lines
  assert report.best_bound({"nll_per_token": 1.4, "elbo_per_token": {"1": -1.5, "4": -1.3}}) == 1.3
  # Over several workdirs: means, how many are ahead, and the noise of the means.
  other = _fake_results({"em_iter_1": (0.2, 0.2), "warmstart": (0.05, 0.3),
                         "raw_token_matched": (0.1, None), "base": (0.08, None)})
  many = [l[2:] for l in report.comparison_lines([res, other]) if l.startswith("- ")]
  assert ("em_iter_1 30.0% level with warmstart 30.0% by 0.0 points (noise: 2.9), ahead in 1 "
          "of 2") in many
  for png in ("accuracy.png", "iterations.png"):
    assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
  agg = report.aggregate([res, other])
  a = agg["em_iter_1"]["latent_accuracy"]
  assert a["n"] == 2 and np.isclose(a["mean"], 0.3) and (a["min"], a["max"]) == (0.2, 0.4)
  assert "| em_iter_1 | 2 | 20.0 [20.0, 20.0] | 30.0 [20.0, 40.0] |" in report.aggregate_table(agg)
  assert report.main([str(tmp_path), str(tmp_path), f"--out={tmp_path}/agg"]) == 0
  # Equal values whose float mean rounds above them (the base of every seed): bars still plot.
  same = _fake_results({"base": (0.045, None), "warmstart": (0.05, 0.3)})
  assert np.mean([0.045] * 3) > 0.045
  assert report.aggregate([same] * 3)["base"]["accuracy"]["mean"] == 0.045
  assert report.plot([same] * 3, str(tmp_path / "same"))
  assert (tmp_path / "agg" / "iterations.png").read_bytes()[:4] == b"\x89PNG"
  assert "| base | 2 |" in (tmp_path / "agg" / "results.md").read_text()


def test_em_config_errors_name_the_key():
  from latent_em.em.job import EMConfig
  with pytest.raises(config_lib.ConfigError, match="config.em.baselines"):
    config_lib.from_config(EMConfig, {"baselines": ("raw_tokn_matched",)}, "config.em")
  with pytest.raises(config_lib.ConfigError, match="config.em.fresh_files"):
    config_lib.from_config(EMConfig, {"baselines": ("raw_fresh",)}, "config.em")
  with pytest.raises(config_lib.ConfigError, match="config.em.base_files.*not both"):
    config_lib.from_config(EMConfig, {"base": "/ckpt", "base_files": ("a.jsonl",),
                                      "base_epochs": 1.0}, "config.em")
  with pytest.raises(config_lib.ConfigError, match="config.em.base_epochs"):
    config_lib.from_config(EMConfig, {"base_files": ("a.jsonl",)}, "config.em")
  with pytest.raises(config_lib.ConfigError, match="config.em.base_epochs"):
    config_lib.from_config(EMConfig, {"base_epochs": 2.0}, "config.em")


def test_em_quickstart_smoke_end_to_end_and_resume(em_smoke):
  """The whole loop through the CLI on a few dozen exercises; a rerun redoes nothing."""
  workdir, out = em_smoke
  args = ["--config=configs/quickstart.py:smoke", f"--workdir={workdir}"]
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  names = ["base", "raw_token_matched", "raw_compute_matched", "teacher_all", "warmstart",
           "em_iter_1", "em_iter_2"]
  assert sorted(res["runs"]) == sorted(names)
  # The table's order: the base, the runs without EM, then EM.
  rows = [line.split("|")[1].strip() for line in out.splitlines()
          if line.startswith("| ") and line.split("|")[1].strip() in names]
  assert rows[:len(names)] == names
  for name, r in res["runs"].items():
    assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["nll_per_token"])
    thought = not name.startswith(("raw", "base"))
    assert (r["latent_accuracy"] is not None) == thought
    assert r["best_accuracy"] == max(r["accuracy"], r["latent_accuracy"] or 0.0)
    assert (sorted(r["elbo_per_token"]) == ["1", "2", "4"]) == thought
    assert r["questions"] == 12
    # Per-question results of every protocol the run was asked in, matching its accuracy.
    assert sorted(r["per_question"]) == (["direct", "latent"] if thought else ["direct"])
    for protocol, key in (("direct", "accuracy"), ("latent", "latent_accuracy")):
      if protocol in r["per_question"]:
        correct = r["per_question"][protocol]["correct"]
        assert len(correct) == 12 and correct.count("1") / 12 == pytest.approx(r[key])
  assert len({p["digest"] for r in res["runs"].values() for p in r["per_question"].values()}) == 1
  runs = res["runs"]
  # Budgets: token-matched sees the same raw documents for the M-step's passes; every M-step,
  # compute-matched and teacher_all train the same steps (the M-step budget).
  assert runs["raw_token_matched"]["raw_tokens"] == runs["em_iter_1"]["raw_tokens"]
  for name in ("raw_compute_matched", "teacher_all", "em_iter_2"):
    assert runs[name]["train_tokens"] == runs["em_iter_1"]["train_tokens"], name
  assert runs["em_iter_1"]["train_tokens"] >= runs["warmstart"]["train_tokens"]
  assert runs["teacher_all"]["thought_right"] == 1.0 == runs["warmstart"]["thought_right"]
  # Budgets are real passes over a run's own data (one in the smoke config).
  for name in ("warmstart", "raw_token_matched"):
    with open(os.path.join(workdir, "runs", name, "train", "STAGE_DONE.json")) as f:
      stage = json.load(f)["outputs"]
    assert 1.0 <= runs[name]["epochs"] < 1.0 + 8 / stage["epoch_rows"], name
  assert "| em_iter_2 |" in out and "| base |" in out
  for png in ("accuracy.png", "iterations.png"):
    assert os.path.getsize(os.path.join(workdir, "plots", png)) > 1000
  # E-step records: the question is context (no thought, no samples); the answer has K = 4
  # weights and a resampled thought; the E-step's share of identical samples is reported.
  recs = list(records.read_records(os.path.join(workdir, "estep", "iter_1", "estep",
                                                "records-*.tfrecord")))
  assert recs and all(len(r.chunks) == 2 for r in recs)
  for r in recs:
    question, answer = r.chunks
    assert question.suffix.endswith("\nAnswer:") and question.source == "context"
    assert question.thought is None and question.log_weights == []
    assert answer.suffix.startswith(" The answer is ") and len(answer.log_weights) == 4
  e = runs["em_iter_1"]["estep"]
  assert e["num_samples"] == 4 and 1.0 <= e["mean_ess"] <= 4.0
  assert 0.0 <= e["identical_share"] <= 1.0
  # Thought quality of an E-step's thoughts, recomputed here.
  want = mathcorpus.thought_explains([(c.suffix, c.thought) for c in r.chunks] for r in recs)
  assert runs["em_iter_1"]["thought_right"] == want["fraction"]
  assert "thought_right" not in runs["raw_token_matched"]
  # The comparison lines: every run against the base, thoughts against raw training under
  # the same protocol and each run's best, EM's iterations, with the noise.
  for head in ("Against the base, answering directly", "each run's best protocol",
               "Thoughts against raw training on the same exercises, answering directly",
               "EM: the first iteration against the warm start"):
    assert head in out, head
  assert "- em_iter_1 " in out and "warmstart" in out and "(paired noise: " in out
  proc = run_main(args, timeout=600)
  again = proc.stdout + proc.stderr
  assert again.count("skipping") >= 18 and "] starting" not in again
  # A changed setup is refused, naming the stage, instead of mixing two experiments.
  proc = run_main(args + ["--config.estep.num_samples=2"], timeout=600, check=False)
  assert proc.returncode != 0
  assert "stage 'estep/iter_1'" in proc.stderr and "changed: config" in proc.stderr


@pytest.mark.parametrize("variant", [None, "ablate_k", "smoke", "seed=2,k=4", "k=8",
                                     "smoke,ablate_k"])
def test_quickstart_variants_validate(variant):
  import importlib.util
  from conftest import REPO
  from latent_em import runtime
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant)
  runtime.validate(config)
  assert config.job == "em" and config.corpus.exercises
  given = re.search(r"k=(\d+)", variant or "")
  k = (1 if variant and "ablate_k" in variant else 4 if variant == "smoke"
       else int(given.group(1)) if given else 16)
  assert config.estep.num_samples == k
  assert config.seed == (2 if variant == "seed=2,k=4" else 0) and config.corpus.seed == 0
  smoke = bool(variant and "smoke" in variant)
  assert config.em.iterations == (2 if smoke else 3)
  # The regime: a base on one-step problems, a small warm start, a bootstrap split several
  # times larger, an M-step budget of at least the warm start's, temperature 1.
  if not smoke:
    c = config.corpus
    assert c.pretrain_steps == 1 and c.min_steps >= 2 and c.n_pretrain > 0
    assert c.n_bootstrap >= 4 * c.n_warmstart and c.n_dev > 0 and c.n_eval > 0
    assert config.estep.sampling.temperature == 1.0
    assert set(config.em.baselines) == {"raw_token_matched", "raw_compute_matched",
                                        "teacher_all"}
  assert config.em.base_files and config.em.base_epochs > 0
  assert config.em.base_seed == 0  # one base for every seed
  # Teacher and E-step cut documents the same way; the question is context.
  for key in ("unit", "min_units", "avg_units", "max_units", "break_after", "context_until"):
    assert config.synthesis.chunking[key] == config.estep.chunking[key]
  assert config.estep.chunking.context_until == mathcorpus.ANSWER_BREAK
  assert not config.mstep_data.empty_thoughts
  assert config.eval.fewshot.mathcorpus_shots == 0
  assert config.eval.fewshot.mathcorpus_split == "eval"


@pytest.mark.parametrize("variant", [None, "data_constrained", "smoke,ablate_k", "seed=1,k=2"])
def test_stories_variants_validate(variant):
  import importlib.util
  from conftest import REPO
  from latent_em import runtime
  spec = importlib.util.spec_from_file_location("st", os.path.join(REPO, "configs", "stories.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant)
  runtime.validate(config)
  assert not config.corpus.exercises and not config.em.base_files
  sizes = {"data_constrained": (100, 100, 30.0, 20.0),
           "smoke,ablate_k": (40, 40, 1.0, 1.0)}.get(variant, (300, 320, 7.0, 2.0))
  assert (config.corpus.n_warmstart, config.corpus.n_bootstrap, config.em.warmstart_epochs,
          config.em.mstep_epochs) == sizes
  assert config.estep.num_samples == {"smoke,ablate_k": 1, "seed=1,k=2": 2}.get(variant, 4)


@pytest.mark.parametrize("variant", [None, "teacher", "warmstart", "estep", "mstep", "raw", "wrap",
                                     "wrap_cot", "eval", "k=8", "smoke"])
def test_paper_config_variants_validate(variant):
  import importlib.util
  from conftest import REPO
  from latent_em import runtime
  spec = importlib.util.spec_from_file_location("bt", os.path.join(REPO, "configs",
                                                                   "bolt_tinyllama.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant)
  config.em.teacher_records = ("teacher/*.tfrecord",)
  config.em.bootstrap_files = ("bootstrap.jsonl",)
  runtime.validate(config)
  if variant != "smoke":
    assert (config.model.dim, config.model.n_layers, config.model.n_heads,
            config.model.n_kv_heads, config.model.mlp_dim) == (2048, 22, 32, 4, 5632)
    assert (config.optim.lr, config.optim.warmup_steps, config.data.seq_len) == (1e-4, 1000, 2048)
    assert config.data.batch_size == (96 if variant == "warmstart" else 192)


def test_stages_reuse_identical_stages_from_another_workdir(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  first = Stages(a)
  first.run("teacher", {"files": [f"{a}/corpus/x.jsonl"]},
            lambda d: {"records": os.path.join(d, "r-*.tfrecord")})
  first.run("estep", {"k": 4}, lambda d: {"n": 4})
  calls = []
  second = Stages(b, reuse_from=a)
  out = second.run("teacher", {"files": [f"{b}/corpus/x.jsonl"]},
                   lambda d: calls.append(d) or {})
  assert not calls and out == {"records": f"{b}/teacher/r-*.tfrecord"}
  assert os.path.islink(os.path.join(b, "teacher"))
  assert second.run("estep", {"k": 1}, lambda d: calls.append(d) or {"n": 1}) == {"n": 1}
  assert calls == [os.path.join(b, "estep")] and not os.path.islink(calls[0])
  # A stage that reads the second experiment's own E-step output is recomputed, even though
  # its spec (with paths mapped) equals the first experiment's.
  first.run("train", {"records": f"{a}/estep/r.tfrecord"}, lambda d: {"m": 4})
  out_train = second.run("train", {"records": f"{b}/estep/r.tfrecord"},
                         lambda d: calls.append(d) or {"m": 1})
  assert out_train == {"m": 1} and not os.path.islink(os.path.join(b, "train"))
  # A rerun of the second experiment accepts the linked stage as its own.
  again = Stages(b, reuse_from=a)
  assert again.run("teacher", {"files": [f"{b}/corpus/x.jsonl"]}, lambda d: 1 / 0) == out
  # A third experiment reusing the second takes the teacher the second reused from the first
  # (its marker holds the first's paths), and the E-step the second ran itself.
  c = str(tmp_path / "c")
  third = Stages(c, reuse_from=b)
  assert third.run("teacher", {"files": [f"{c}/corpus/x.jsonl"]}, lambda d: 1 / 0) == {
      "records": f"{c}/teacher/r-*.tfrecord"}
  assert os.readlink(os.path.join(c, "teacher")) == os.path.join(a, "teacher")
  assert third.done("teacher")["spec"] == {"files": [f"{c}/corpus/x.jsonl"]}
  assert third.run("estep", {"k": 1}, lambda d: 1 / 0) == {"n": 1}
  assert os.readlink(os.path.join(c, "estep")) == os.path.join(b, "estep")


def test_em_raw_fresh_and_wrap_cot_baselines(tmp_path):
  """The other baselines, matched to em_iter_1's training tokens (smoke size, 1 iteration)."""
  workdir = str(tmp_path / "em")
  run_main(["--config=configs/stories.py:smoke", f"--workdir={workdir}",
            "--config.em.iterations=1", "--config.em.evaluate=False",
            "--config.em.baselines=('raw_fresh','wrap_cot')", "--config.corpus.n_fresh=20",
            "--config.em.fresh_files=('builtin:mathcorpus/fresh',)"], timeout=1500)
  with open(os.path.join(workdir, "results.json")) as f:
    runs = json.load(f)["runs"]
  assert sorted(runs) == ["em_iter_1", "raw_fresh", "warmstart", "wrap_cot"]
  for name in ("raw_fresh", "wrap_cot"):
    assert runs[name]["train_tokens"] == runs["em_iter_1"]["train_tokens"]
    assert runs[name]["accuracy"] is None  # evaluation was switched off
  assert runs["raw_fresh"]["raw_tokens"] > runs["em_iter_1"]["raw_tokens"]
  # WRAP-CoT text: the stories with the oracle's working written in.
  recs = list(records.read_records(os.path.join(workdir, "synth", "wrap_cot", "synthesis",
                                                "shard-*.tfrecord")))
  chunk = next(c for r in recs for c in r.chunks if c.thought and c.thought != c.suffix)
  assert " = " in chunk.thought and chunk.source == "wrap:cot"


def test_em_pretrains_the_base_every_run_starts_from(tmp_path):
  """config.em.base_files: run `base` trains first, from random initialisation, on the
  pretraining documents; every other run starts from its parameters and, with
  config.em.replay, keeps training on them for that share of its examples."""
  workdir = str(tmp_path / "em")
  args = ["--config=configs/quickstart.py:smoke", f"--workdir={workdir}",
          "--config.em.iterations=1", "--config.em.baselines=('raw_token_matched',)",
          "--config.em.eval_elbo_docs=2"]
  proc = run_main(args, timeout=1500)
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  runs = res["runs"]
  assert report.ordered(runs) == ["base", "raw_token_matched", "warmstart", "em_iter_1"]
  base = runs["base"]
  assert not base["thought_trained"] and np.isfinite(base["nll_per_token"])
  assert base["epochs"] >= 1.0 and base["latent_accuracy"] is None
  # The base trained on the worked one-step problems and the question text, from no
  # checkpoint; every other run from the base's workdir.
  with open(os.path.join(workdir, "corpus", "pretrain_cot.jsonl")) as f:
    texts = [json.loads(line)["text"] for line in f]
  assert len(texts) == 60 and all(" = " in t for t in texts)
  stage = lambda name: json.load(open(os.path.join(workdir, "runs", name, "train",
                                                   "STAGE_DONE.json")))["spec"]
  corpus = os.path.join(workdir, "corpus")
  assert stage("base")["base"] == "" and stage("base")["raw_files"] == [
      os.path.join(corpus, "pretrain_cot.jsonl"), os.path.join(corpus, "pretrain_questions.jsonl")]
  assert stage("base")["replay"] == 0.0
  base_dir = os.path.join(workdir, "runs", "base", "train")
  for name in ("warmstart", "raw_token_matched", "em_iter_1"):
    assert stage(name)["base"] == base_dir and stage(name)["replay"] == 0.5, name
  # A raw run reads its documents as records laid out raw, so they mix with the base's.
  assert stage("raw_token_matched")["format"] == "raw"
  assert stage("raw_token_matched")["record_files"] == [
      os.path.join(workdir, "raw_records", "records-00000-of-00001.tfrecord")]
  assert runs["raw_token_matched"]["latent_accuracy"] is None
  # The training loops themselves loaded the base's parameters, once for each of those runs.
  assert proc.stderr.count(f"starting from the parameters of {base_dir}") == 3
  assert proc.stderr.count("starting from the parameters of") == 3
  # config.em.base_seed: another seed has the same base (linked from this workdir) and its own
  # warm start.
  other = str(tmp_path / "seed1")
  run_main(["--config=configs/quickstart.py:smoke,seed=1", f"--workdir={other}",
            "--config.em.iterations=0", "--config.em.baselines=()", "--config.em.evaluate=False",
            f"--config.em.reuse_from={workdir}"], timeout=1500)
  assert os.readlink(os.path.join(other, "runs", "base", "train")) == base_dir
  assert stage("base")["config"]["seed"] == 0
  spec = json.load(open(os.path.join(other, "runs", "warmstart", "train", "STAGE_DONE.json")))
  assert spec["spec"]["config"]["seed"] == 1 and spec["spec"]["base"] == os.path.join(
      other, "runs", "base", "train")
  assert not os.path.islink(os.path.join(other, "runs", "warmstart", "train"))
  # The base is in the table and in the comparison lines (every run against it).
  assert "| base |" in proc.stdout
  assert any(re.match(r"- warmstart \S+% (ahead of|behind|level with) base ", l)
             for l in proc.stdout.splitlines())
