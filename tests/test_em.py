"""EM orchestration: resumable stages, the oracle teacher backend, the report, and the whole loop."""
import json
import os

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


def _fake_results(acc):
  runs = {}
  for name, a in acc.items():
    thought = not name.startswith("raw")
    runs[name] = {
        "train": {"train_tokens": 100, "raw_tokens": 50, "steps": 2, "thought_trained": thought,
                  "epochs": 3.0, "fill": 0.5},
        "eval": {"accuracy": {"mathcorpus": a / 2}, "latent_accuracy":
                 ({"mathcorpus": a} if thought else {}), "nll_per_token": 1.0 + a,
                 "elbo_per_token": {"1": -2.0, "2": -1.9, "4": -1.8} if thought else {},
                 "constant_answer_accuracy": {"mathcorpus": 0.15}}}
  return report.collect(runs)


def test_report_schema_table_plots_and_aggregate(tmp_path):
  res = _fake_results({"warmstart": 0.2, "raw_token_matched": 0.1, "em_iter_1": 0.4})
  r = res["runs"]["em_iter_1"]
  assert set(r) >= {"accuracy", "latent_accuracy", "nll_per_token", "elbo_per_token",
                    "train_tokens", "raw_tokens"}
  assert (r["accuracy"], r["latent_accuracy"]) == (0.2, 0.4)
  assert res["runs"]["raw_token_matched"]["latent_accuracy"] is None
  report.write(res, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["runs"]["em_iter_1"]["elbo_per_token"]["4"] == -1.8
  table = (tmp_path / "results.md").read_text()
  assert "| em_iter_1 | 20.0 | 40.0 | 1.400 | -2.000 | -1.900 | -1.800 | 100 | 50 | 3.0 |" in table
  assert "Always giving the most common gold answer scores 15.0% accuracy." in table
  # em_iter_1: NLL 1.4 and -ELBO_4 = 1.8 -> 1.4; raw_token_matched NLL 1.1; warm start 1.2.
  assert "- warmstart 1.200: behind raw_token_matched (1.100) by 0.100" in table
  assert "- em_iter_1 1.400: behind raw_token_matched (1.100) by 0.300" in table
  # Accuracy: a thought-trained run's latent answers against the others' direct answers.
  assert "- em_iter_1 40.0%: ahead of raw_token_matched (5.0%) by 35.0 points" in table
  assert table.index(report.ACCURACY_HEAD) < table.index(report.COMPARISON_HEAD)
  assert report.best_bound({"nll_per_token": 1.4, "elbo_per_token": {"1": -1.5, "4": -1.3}}) == 1.3
  two = _fake_results({"em_iter_1": 0.4, "em_iter_2": 0.3, "raw_compute_matched": 0.5})
  assert report.comparisons(two) == [
      "em_iter_2 1.300: ahead of raw_compute_matched (1.500) by 0.200"]
  worse = _fake_results({"em_iter_1": 0.4, "em_iter_2": 0.6, "raw_compute_matched": 0.5})
  assert report.aggregate_comparisons([two, worse]) == [
      "em_iter_2 1.450: ahead of raw_compute_matched (1.500) by 0.050 (ahead in 1 of 2)"]
  assert report.aggregate_comparisons([two, worse], "accuracy") == [
      "em_iter_2 45.0%: ahead of raw_compute_matched (25.0%) by 20.0 points (ahead in 2 of 2)"]
  with pytest.raises(ValueError, match="metric"):
    report.margins(two, "bleu")
  for png in ("accuracy.png", "iterations.png"):
    assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
  agg = report.aggregate([res, _fake_results({"warmstart": 0.4, "raw_token_matched": 0.3,
                                              "em_iter_1": 0.6})])
  a = agg["em_iter_1"]["latent_accuracy"]
  assert a["n"] == 2 and np.isclose(a["mean"], 0.5) and (a["min"], a["max"]) == (0.4, 0.6)
  assert "| em_iter_1 | 2 | 25.0 [20.0, 30.0] | 50.0 [40.0, 60.0] |" in report.aggregate_table(agg)


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
  names = ["base", "warmstart", "raw_token_matched", "em_iter_1", "raw_compute_matched",
           "em_iter_2"]
  assert sorted(res["runs"]) == sorted(names)
  for name, r in res["runs"].items():
    assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["nll_per_token"])
    thought = not name.startswith(("raw", "base"))
    assert (r["latent_accuracy"] is not None) == thought
    assert (sorted(r["elbo_per_token"]) == ["1", "2", "4"]) == thought
  runs = res["runs"]
  # Budgets: token-matched sees the same raw tokens as the M-step, compute-matched the same
  # training tokens; both from the same raw documents.
  assert runs["raw_token_matched"]["raw_tokens"] == runs["em_iter_1"]["raw_tokens"]
  assert runs["raw_compute_matched"]["train_tokens"] == runs["em_iter_1"]["train_tokens"]
  assert runs["raw_compute_matched"]["train_tokens"] > runs["raw_token_matched"]["train_tokens"]
  # Budgets are real passes (one in the smoke config): the loss-bearing tokens each training
  # loop saw are that many times its data, although thought-augmented documents pack worse.
  for name in ("warmstart", "raw_token_matched", "em_iter_1", "em_iter_2"):
    with open(os.path.join(workdir, "runs", name, "train", "STAGE_DONE.json")) as f:
      stage = json.load(f)["outputs"]
    passes = runs[name]["epochs"]
    assert 1.0 <= passes < 1.0 + 8 / stage["epoch_rows"], name  # whole batches of 8 rows
    assert stage["loss_tokens"] / stage["epoch_tokens"] == pytest.approx(passes, rel=0.1), name
    assert 0 < runs[name]["fill"] <= 1
  assert "| em_iter_2 |" in out
  for png in ("accuracy.png", "iterations.png"):
    assert os.path.getsize(os.path.join(workdir, "plots", png)) > 1000
  # E-step records carry K = 4 weights per chunk and a resampled thought.
  recs = list(records.read_records(os.path.join(workdir, "estep", "iter_1", "estep",
                                                "records-*.tfrecord")))
  assert recs and all(len(c.log_weights) == 4 for r in recs for c in r.chunks)
  # Each exercise is two chunks, cut after its answer cue: the thought sits before the answer.
  assert all(len(r.chunks) == 2 and r.chunks[0].suffix.endswith("\nAnswer:")
             and r.chunks[1].suffix.startswith(" The answer is ") for r in recs)
  # Thought arithmetic: the teacher's working is right; an E-step's share is recomputed here.
  assert runs["warmstart"]["thought_arithmetic"] == 1.0
  want = mathcorpus.thought_arithmetic(c.thought for r in recs for c in r.chunks)["fraction"]
  assert runs["em_iter_1"]["thought_arithmetic"] == want
  want = mathcorpus.thought_explains([(c.suffix, c.thought) for c in r.chunks] for r in recs)
  assert runs["em_iter_1"]["thought_explains"] == want["fraction"]
  assert runs["warmstart"]["thought_explains"] > 0.5
  assert "thought_arithmetic" not in runs["raw_token_matched"]
  assert "thought_explains" not in runs["raw_token_matched"]
  proc = run_main(args, timeout=600)
  again = proc.stdout + proc.stderr
  assert again.count("skipping") >= 14 and "] starting" not in again
  # A changed setup is refused, naming the stage, instead of mixing two experiments.
  proc = run_main(args + ["--config.estep.num_samples=2"], timeout=600, check=False)
  assert proc.returncode != 0
  assert "stage 'estep/iter_1'" in proc.stderr and "changed: config" in proc.stderr


@pytest.mark.parametrize("variant", [None, "ablate_k", "smoke", "seed=2,k=8", "stories",
                                     "stories,smoke", "large_warmstart,ablate_k",
                                     "data_constrained", "tally,large_warmstart", "tally",
                                     "pretrained_base"])
def test_quickstart_variants_validate(variant):
  import importlib.util
  from conftest import REPO
  from latent_em import runtime
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant)
  runtime.validate(config)
  assert config.job == "em" and config.em.iterations >= 2
  k = {"ablate_k": 1, "seed=2,k=8": 8, "large_warmstart,ablate_k": 1}.get(variant, 4)
  assert config.estep.num_samples == k
  # The default is the exercise corpus with its worked base; `stories` and every story
  # variant the story corpus.
  stories = variant not in (None, "ablate_k", "smoke", "seed=2,k=8")
  assert config.corpus.exercises == (not stories)
  # (warm-start documents, bootstrap documents, warm-start passes, M-step passes)
  sizes = {"large_warmstart,ablate_k": (1200, 320, 8.0, 2.0),
           "tally,large_warmstart": (1200, 320, 8.0, 2.0), "smoke": (40, 40, 1.0, 1.0),
           "stories,smoke": (40, 40, 1.0, 1.0),
           "data_constrained": (100, 100, 30.0, 20.0)}.get(
               variant, (300, 320, 7.0, 2.0) if stories else (600, 640, 7.0, 2.0))
  assert (config.corpus.n_warmstart, config.corpus.n_bootstrap, config.em.warmstart_epochs,
          config.em.mstep_epochs) == sizes
  # Teacher and E-step cut documents the same way.
  for key in ("unit", "min_units", "avg_units", "max_units", "break_after"):
    assert config.synthesis.chunking[key] == config.estep.chunking[key]
  assert config.corpus.tally == bool(variant and variant.startswith("tally"))
  assert bool(config.em.base_files) == (variant == "pretrained_base" or not stories)
  if config.em.base_files:
    assert config.corpus.n_pretrain > 0 and config.em.base_epochs > 0 and not config.em.base
  if config.corpus.tally:  # one chunk per story: every tally story has at most 12 sentences
    assert config.estep.chunking.min_units == 12 and config.estep.chunking.prefix_chunks == 0
  if config.corpus.exercises:  # a chunk ends after each answer cue; questions zero-shot
    assert config.estep.chunking.break_after == mathcorpus.ANSWER_BREAK
    assert config.eval.fewshot.mathcorpus_shots == 0 and config.mstep_data.empty_thoughts


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
  run_main(["--config=configs/quickstart.py:stories,smoke", f"--workdir={workdir}",
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
  pretraining stories; every other run starts from its parameters; it is reported, but is no
  baseline in the comparison lines."""
  workdir = str(tmp_path / "em")
  args = ["--config=configs/quickstart.py:smoke,pretrained_base", f"--workdir={workdir}",
          "--config.em.iterations=1", "--config.em.baselines=('raw_token_matched',)",
          "--config.corpus.n_pretrain=30", "--config.em.eval_elbo_docs=2"]
  proc = run_main(args, timeout=1500)
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  runs = res["runs"]
  assert sorted(runs) == ["base", "em_iter_1", "raw_token_matched", "warmstart"]
  base = runs["base"]
  assert not base["thought_trained"] and np.isfinite(base["nll_per_token"])
  assert base["epochs"] >= 3.0 and base["latent_accuracy"] is None
  # The base trained on the pretraining split (its raw tokens are those stories', with their
  # working written in), from no checkpoint; every other run from the base's workdir.
  with open(os.path.join(workdir, "corpus", "pretrain_cot.jsonl")) as f:
    texts = [json.loads(line)["text"] for line in f]
  assert len(texts) == 30 and all(" = " in t for t in texts)
  stage = lambda name: json.load(open(os.path.join(workdir, "runs", name, "train",
                                                   "STAGE_DONE.json")))["spec"]
  assert stage("base")["base"] == "" and stage("base")["raw_files"] == [
      os.path.join(workdir, "corpus", "pretrain_cot.jsonl")]
  base_dir = os.path.join(workdir, "runs", "base", "train")
  for name in ("warmstart", "raw_token_matched", "em_iter_1"):
    assert stage(name)["base"] == base_dir, name
  # The training loops themselves loaded the base's parameters, once for each of those runs.
  assert proc.stderr.count(f"starting from the parameters of {base_dir}") == 3
  assert proc.stderr.count("starting from the parameters of") == 3
  lines = [l for l in proc.stdout.splitlines() if l.startswith("- ")]
  assert lines and not any("behind base" in l or "ahead of base" in l for l in lines)
  assert "| base |" in proc.stdout
