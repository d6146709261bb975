"""The BoLT loop (`config.job = "em"`): teacher -> warm start -> T x (E-step, M-step, eval),
with the raw-data and paraphrase baselines, in one resumable job.

  python -m latent_em.main --config=configs/quickstart.py --workdir=/tmp/bolt

Layout of WORKDIR (each stage directory ends with STAGE_DONE.json when finished; see stages.py):
  corpus/, tokenizer.model     the built-in corpus (if used) and the shared tokenizer
  teacher/                     synthesis job: teacher thoughts for the warm-start split
  runs/base/train/             the base, when config.em.base_files pretrains one
  runs/<NAME>/train/           training workdir of run NAME (checkpoints, params, summary)
  runs/<NAME>/eval/            evaluation job of run NAME (eval/results.json)
  estep/iter_<t>/              E-step with model_{t-1} on the bootstrap split (records)
  synth/<kind>/                paraphrases for the WRAP / WRAP-CoT baselines
  results.json, results.md, plots/*.png

Runs: `warmstart` (teacher-thought data), `em_iter_<t>` (warm-start teacher records + the
bootstrap split with model_{t-1}'s thoughts, trained from the base), and the baselines of
`config.em.baselines`, all trained from the same base: `config.em.base`, a model this job
pretrains on `config.em.base_files` first (run `base`, from random initialisation; reported but
never a baseline: it did not train on the experiment's raw documents), or one random
initialisation seeded by `config.seed`:
  raw_token_matched    the same raw documents as em_iter_t, the same number of epochs
  raw_compute_matched  the same raw documents, repeated to em_iter_1's training tokens
  raw_fresh            the raw documents plus config.em.fresh_files, em_iter_1's tokens
  wrap_cot / wrap      teacher paraphrases of the raw documents (with the working inserted / in
                       four styles), trained as pure text for em_iter_1's tokens
Training budgets are passes over the measured data (config.em.*_epochs), never typed-in step
counts: steps = ceil(epochs x rows one packed pass fills / batch) (pipeline.packed_pass), so every
run sees its data the same number of times however well its documents pack.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
from absl import logging

from latent_em import config_lib, io_utils, jobs, runtime
from latent_em.em import report
from latent_em.em.stages import Stages, derive

BASELINES = ("raw_token_matched", "raw_compute_matched", "teacher_all", "raw_fresh", "wrap_cot",
             "wrap")
WRAP_STYLES = ("wrap_simple", "wrap_scholarly", "wrap_encyclopedic", "wrap_qa")


@dataclasses.dataclass(frozen=True)
class EMConfig:
  """config.em

  Attributes:
    iterations: EM iterations T (each: E-step, M-step, evaluation).
    warmstart_files / bootstrap_files / fresh_files / validation_files: raw corpora (JSONL,
      TFRecord, globs, or builtin:mathcorpus/<split>). fresh_files feed the raw_fresh baseline.
    teacher_records: existing teacher-thought records for the warm-start split (e.g. from a
      separate `job=synthesize` against an API); empty: run config.synthesis on
      warmstart_files (backend "oracle" for the built-in corpus).
    base: checkpoint every run starts from (HF dir, params checkpoint or train workdir); empty:
      random initialisation from config.seed (the same for every run).
    base_files / base_epochs: raw corpora to pretrain the base on, for base_epochs passes, as
      the job's first training run (`base`); every other run starts from it. Exclusive with
      `base`.
    base_seed: the seed of that base's initialisation and data order (-1: config.seed). A
      fixed value makes the base the same for every config.seed, as a published base model is
      for every fine-tuning seed; a run with another seed then links it with `reuse_from`.
    warmstart_epochs / mstep_epochs: passes over each run's data (see the module docstring).
    finetune_lr: the peak learning rate of every run that starts from the base (warm start,
      M-steps, baselines); 0 = config.optim.lr. A pretrained base forgets what it knows at
      the rate that trains it from scratch.
    replay: the share of the training examples of every run that starts from a base this job
      pretrained (config.em.base_files) drawn from the base's own documents, so that training
      on a few hundred exercises keeps what the base knows; 0 = none. Budgets count passes
      over a run's own data, so its steps grow by 1 / (1 - replay).
    mstep_include_warmstart: the M-step also trains on the warm-start teacher records.
    baselines: any of BASELINES, run after em_iter_1.
    evaluate: run the evaluation job after each training run.
    eval_elbo_docs: validation documents for ELBO_k (sampling K thoughts per chunk is slow on
      CPU); 0 = all. NLL always uses all of them.
    plots: write PNG plots next to results.json.
    reuse_from: a finished experiment's workdir; its stages whose setup is identical (e.g. the
      teacher, warm start and raw baselines when only config.estep changes) are linked, not
      recomputed.
  """
  iterations: int = 2
  warmstart_files: tuple[str, ...] = ("builtin:mathcorpus/warmstart",)
  bootstrap_files: tuple[str, ...] = ("builtin:mathcorpus/bootstrap",)
  fresh_files: tuple[str, ...] = ()
  validation_files: tuple[str, ...] = ("builtin:mathcorpus/validation",)
  teacher_records: tuple[str, ...] = ()
  base: str = ""
  base_files: tuple[str, ...] = ()
  base_epochs: float = 0.0
  base_seed: int = -1
  warmstart_epochs: float = 4.0
  mstep_epochs: float = 4.0
  finetune_lr: float = 0.0
  replay: float = 0.0
  mstep_include_warmstart: bool = True
  baselines: tuple[str, ...] = ("raw_token_matched", "raw_compute_matched")
  evaluate: bool = True
  eval_elbo_docs: int = 100
  plots: bool = True
  reuse_from: str = ""

  def __post_init__(self):
    key = "config.em"
    config_lib.check(self.iterations >= 0, f"{key}.iterations", "must be >= 0")
    for b in self.baselines:
      config_lib.check(b in BASELINES, f"{key}.baselines",
                       f"{b!r} is not one of {list(BASELINES)}")
    config_lib.check("raw_fresh" not in self.baselines or bool(self.fresh_files),
                     f"{key}.fresh_files", "the raw_fresh baseline needs fresh raw documents")
    config_lib.check(self.iterations >= 1 or not self.baselines, f"{key}.baselines",
                     "the baselines are matched to em_iter_1: set config.em.iterations >= 1")
    for name in ("warmstart_epochs", "mstep_epochs"):
      config_lib.check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
    config_lib.check(self.finetune_lr >= 0, f"{key}.finetune_lr", "must be >= 0 (0 = optim.lr)")
    config_lib.check(0 <= self.replay < 1, f"{key}.replay", f"{self.replay} must be in [0, 1)")
    config_lib.check(not self.replay or bool(self.base_files), f"{key}.replay",
                     "replays the base's documents: set config.em.base_files too")
    config_lib.check(not (self.base and self.base_files), f"{key}.base_files",
                     "give a base checkpoint (config.em.base) or documents to pretrain one on "
                     "(config.em.base_files), not both")
    config_lib.check((self.base_epochs > 0) == bool(self.base_files), f"{key}.base_epochs",
                     f"must be > 0 exactly when config.em.base_files is set, got "
                     f"{self.base_epochs} with {len(self.base_files)} base files")
    config_lib.check(bool(self.warmstart_files) or bool(self.teacher_records),
                     f"{key}.warmstart_files", "give warm-start documents or teacher_records")
    config_lib.check(bool(self.bootstrap_files) or self.iterations == 0,
                     f"{key}.bootstrap_files", "the E-step needs bootstrap documents")
    config_lib.check(self.eval_elbo_docs >= 0, f"{key}.eval_elbo_docs", "must be >= 0")


class Experiment:
  """One EM experiment in one workdir; `run()` executes (or resumes) every stage."""

  def __init__(self, config, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.cfg: EMConfig = runtime.section(config, "em")
    self.stages = Stages(self.workdir, reuse_from=self.cfg.reuse_from)
    self.runs: dict[str, dict[str, Any]] = {}
    resolve = lambda files, key: runtime.resolve_files(config, files, self.workdir, key)
    self.files = {
        name: resolve(getattr(self.cfg, f"{name}_files"), f"config.em.{name}_files")
        for name in ("warmstart", "bootstrap", "fresh", "validation", "base")}
    tokenizer = runtime.get_tokenizer(
        config, self.workdir,
        self.files["warmstart"] + self.files["bootstrap"] + self.files["base"])
    self.tokenizer = tokenizer
    data = runtime.section(config, "data")
    self.batch_size, self.seq_len = data.batch_size, data.seq_len
    self.tokens_per_step = data.batch_size * data.seq_len
    # Every stage sees resolved files and the shared tokenizer (and the built-in corpus' QA
    # splits, when that corpus is in use, instead of regenerating it per stage).
    # The checkpoint every run starts from: given, pretrained here first, or none.
    self.base = (self.stages.path(f"runs/{report.BASE_RUN}/train") if self.cfg.base_files
                 else self.cfg.base)
    overrides = {"tokenizer.path": tokenizer.path, "train.init_from": self.base}
    builtin = os.path.join(self.workdir, "corpus")
    # Files of the built-in corpus: E-step thoughts are scored for their arithmetic.
    self.builtin_corpus = os.path.exists(os.path.join(builtin, "DONE.json"))
    if (self.builtin_corpus
        and not config.eval.fewshot.get("mathcorpus_dir")):
      overrides["eval.fewshot.mathcorpus_dir"] = builtin
    self.config = derive(config, overrides)

  # ------------------------------------------------------------------------------- helpers

  def _raw_tokens(self, files: tuple[str, ...]) -> int:
    """Tokens of the raw documents (EOS included): the 'raw data' a run is given."""
    from latent_em.data import sources  # pylint: disable=g-import-not-at-top
    data = runtime.section(self.config, "data")
    total = 0
    for path in files:
      for _, text in sources.read_texts(path, data.text_field, "skip", sources.InputStats()):
        total += len(self.tokenizer.encode(text)) + 1
    return total

  def _record_raw_tokens(self, record_globs: tuple[str, ...]) -> int:
    from latent_em.data import records  # pylint: disable=g-import-not-at-top
    return sum(len(self.tokenizer.encode(r.text)) + 1
               for r in records.read_records(list(record_globs)))

  def _thought_quality(self, name: str, record_globs: tuple[str, ...]) -> None:
    """On the built-in corpus: how good the thoughts run `name` was trained on are (reported
    next to its metrics): the share of right equations (mathcorpus.thought_arithmetic) and of
    chunks whose thought computes the derived numbers they state (mathcorpus.thought_explains)."""
    if not self.builtin_corpus:
      return
    from latent_em.data import mathcorpus, records  # pylint: disable=g-import-not-at-top
    docs = [[(c.suffix, c.thought) for c in r.chunks]
            for r in records.read_records(list(record_globs))]
    self.runs[name]["thought_arithmetic"] = mathcorpus.thought_arithmetic(
        t for doc in docs for _, t in doc)
    self.runs[name]["thought_right"] = mathcorpus.thought_explains(docs)

  def _sections(self, *names: str, config=None) -> dict[str, Any]:
    """The config sections a stage depends on (part of its spec: a change re-runs nothing
    silently; see stages.Stages.run), of `config` (default: the job's)."""
    config = self.config if config is None else config
    out = {}
    # The corpus and tokenizer settings decide what every stage's input files hold.
    for name in ("corpus", "tokenizer") + names:
      value = config.get(name)
      out[name] = value.to_dict() if hasattr(value, "to_dict") else value
    for skip in (("train", "steps"), ("train", "init_from"), ("train", "progress_bar"),
                 ("eval", "init_from"), ("eval", "progress_bar"), ("estep", "init_from"),
                 ("estep", "input_files"), ("synthesis", "input_files"), ("synthesis", "kind"),
                 ("data", "train_files"), ("data", "validation_files"),
                 ("mstep_data", "record_files"), ("eval", "nll_files"), ("eval", "elbo_files")):
      if skip[0] in out and isinstance(out[skip[0]], dict):
        out[skip[0]].pop(skip[1], None)
    return out

  def _epoch(self, config, directory: str) -> dict[str, int]:
    """One shuffled, packed pass over a training run's data: {"rows", "tokens" (loss-bearing)}."""
    from latent_em import train as train_lib  # pylint: disable=g-import-not-at-top
    from latent_em.data import pipeline  # pylint: disable=g-import-not-at-top
    data = runtime.section(config, "data")
    files = runtime.resolve_files(config, data.train_files, directory, "config.data.train_files")
    task = train_lib.training_task(config, directory, files, (), self.tokenizer)
    return pipeline.packed_pass(task, "train", data.seq_len, bos_id=self.tokenizer.bos_id,
                                seed=data.seed, pack=data.pack)

  @property
  def replay(self) -> float:
    return self.cfg.replay if self.cfg.base_files else 0.0

  def _raw_records(self, files: tuple[str, ...]) -> tuple[str, ...]:
    """The raw documents of `files` as records without thoughts (stage `raw_records`)."""
    spec = {"files": files}

    def fn(directory: str) -> dict[str, Any]:
      from latent_em.data import records  # pylint: disable=g-import-not-at-top
      recs = [records.DocRecord(doc_id=f"{i:06d}", text=text,
                                chunks=[records.ChunkRecord(prefix="", suffix=text)])
              for i, text in enumerate(t for f in files for t in _text_list(self.config, f))]
      path = os.path.join(directory, "records-00000-of-00001.tfrecord")
      if jax.process_index() == 0:
        records.write_shard(recs, path)
      runtime.sync("raw_records")
      return {"records": path, "docs": len(recs)}

    return (self.stages.run("raw_records", spec, fn)["records"],)

  def _steps(self, epochs: float, rows: float) -> int:
    return max(1, math.ceil(epochs * rows / self.batch_size))

  def _train_run(self, name: str, *, raw_files: tuple[str, ...] = (),
                 record_files: tuple[str, ...] = (), fmt: str = "random",
                 epochs: float | None = None, steps: int | None = None,
                 thought_trained: bool = False, raw_tokens: int,
                 init_from: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """Trains run `name` from `init_from` (default: the base) for `epochs` of its data or a
    fixed `steps`; `seed` replaces config.seed, config.data.seed and config.mstep_data.seed
    for this run."""
    config = self.config if seed is None else derive(
        self.config, {"seed": seed, "data.seed": seed, "mstep_data.seed": seed})
    init_from = self.base if init_from is None else init_from
    lr = self.cfg.finetune_lr if init_from and self.cfg.finetune_lr else None
    replay = self.replay if init_from == self.base else 0.0
    if replay and raw_files:
      # Raw documents as records (format "raw"), so they mix with the base's documents by rate.
      record_files, raw_files, fmt = self._raw_records(raw_files), (), "raw"
    spec = {"raw_files": raw_files, "record_files": record_files, "format": fmt,
            "epochs": epochs, "steps": steps, "base": init_from, "budget": "packed_rows",
            "lr": lr, "replay": replay,
            "config": self._sections("seed", "model", "optim", "data", "mstep_data", "train",
                                     config=config)}

    def fn(directory: str) -> dict[str, Any]:
      # No validation inside training: the eval stage measures NLL on the validation split.
      data = {"job": "train", "data.train_files": raw_files, "data.validation_files": (),
              "mstep_data.record_files": record_files, "mstep_data.format": fmt,
              "train.init_from": init_from}
      if lr:
        data["optim.lr"] = lr
      # One pass over the run's own data (the replayed documents are not its data).
      epoch = self._epoch(derive(config, data), directory)
      rows, tokens = epoch["rows"], epoch["tokens"]
      n_steps = steps if steps is not None else self._steps(epochs, rows / (1 - replay))
      if replay:
        data.update({"data.train_files": self.files["base"],
                     "mstep_data.thought_rate": 1 - replay})
      c = derive(config, {**data, "train.steps": n_steps})
      summary = jobs.run(c, directory)
      if thought_trained:
        from latent_em.evaluation import job as eval_job  # pylint: disable=g-import-not-at-top
        eval_job.mark_thought_trained(directory, data_format=fmt)
      return {"steps": n_steps, "epoch_tokens": tokens, "epoch_rows": rows,
              "fill": tokens / max(rows * self.seq_len, 1),
              "train_tokens": n_steps * self.tokens_per_step, "raw_tokens": raw_tokens,
              "epochs": n_steps * self.batch_size * (1 - replay) / max(rows, 1),
              "replay": replay,
              "final_loss": summary.get("final_loss"),
              "thought_trained": thought_trained, "train_wall_s": summary.get("wall_s"),
              "loss_tokens": summary.get("loss_tokens")}

    out = self.stages.run(f"runs/{name}/train", spec, fn)
    self.runs[name] = {"train": out}
    return out

  def _elbo_files(self) -> tuple[str, ...]:
    """The validation documents ELBO_k is measured on: the first eval_elbo_docs of them."""
    if not self.cfg.eval_elbo_docs:
      return self.files["validation"]
    from latent_em.data import sources  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.workdir, "elbo_docs.jsonl")
    if not os.path.exists(path):
      rows = []
      text_field = runtime.section(self.config, "data").text_field
      for f in self.files["validation"]:
        for _, text in sources.read_texts(f, text_field, "skip", sources.InputStats()):
          if len(rows) < self.cfg.eval_elbo_docs:
            rows.append({"text": text})
      if jax.process_index() == 0:
        io_utils.write_jsonl(path, rows)
      runtime.sync("elbo_docs")
    return (path,)

  def _eval_run(self, name: str) -> None:
    if not self.cfg.evaluate:
      return
    train_dir = self.stages.path(f"runs/{name}/train")
    thought = self.runs[name]["train"]["thought_trained"]
    elbo_files = self._elbo_files() if thought else ()
    config = self._sections("eval", "estep")
    for key in ("num_samples", "selection", "seed", "docs_per_shard", "elbo_ks", "max_docs"):
      config["estep"].pop(key, None)  # ELBO_k uses the E-step's sampler and chunking only
    spec = {"init_from": train_dir, "thought_trained": thought, "elbo_files": elbo_files,
            "config": config}

    def fn(directory: str) -> dict[str, Any]:
      # Thought-trained runs: both answer variants and ELBO_k; raw runs: raw answers (latent
      # tokens banned) and NLL only (they never learned to write thoughts).
      c = derive(self.config, {"job": "eval", "eval.init_from": train_dir,
                               "eval.fewshot.latent": "both" if thought else "off",
                               "eval.nll_files": self.files["validation"],
                               "eval.elbo_files": elbo_files, "eval.max_docs": 0})
      res = jobs.run(c, directory)
      out = {k: res[k] for k in ("accuracy", "latent_accuracy", "constant_answer_accuracy",
                                 "nll_per_token", "elbo_per_token")}
      # Per task and variant ("mathcorpus", "mathcorpus:latent"): questions asked, and the
      # accuracy by equations in the working (built-in corpus).
      fewshot = res["details"]["fewshot"]
      out["questions"] = {name: d["n"] for name, d in fewshot.items()}
      out["per_steps"] = {name: d["per_steps"] for name, d in fewshot.items()
                          if "per_steps" in d}
      # Which questions each variant answered right: paired comparisons between runs.
      out["per_question"] = {name: {"correct": d["per_question"],
                                    "digest": d["questions_digest"]}
                             for name, d in fewshot.items() if "per_question" in d}
      out["samples"] = res.get("samples", [])[:4]
      return out

    self.runs[name]["eval"] = self.stages.run(f"runs/{name}/eval", spec, fn)

  # ------------------------------------------------------------------------------- stages

  def teacher(self, split: str = "warmstart") -> tuple[str, ...]:
    """Teacher thoughts for the warm-start documents (stage `teacher`), or for the bootstrap
    documents (`teacher_bootstrap`, for the teacher_all baseline)."""
    if self.cfg.teacher_records and split == "warmstart":
      return tuple(self.cfg.teacher_records)
    files = self.files[split]
    spec = {"files": files, "kind": "latent_thoughts", "config": self._sections("synthesis")}

    def fn(directory: str) -> dict[str, Any]:
      c = derive(self.config, {"job": "synthesize", "synthesis.kind": "latent_thoughts",
                               "synthesis.input_files": files})
      summary = jobs.run(c, directory)
      return {"records": summary["shard_pattern"], "chunks": summary["chunks"],
              "chunks_with_thought": summary["chunks_with_thought"]}

    name = "teacher" if split == "warmstart" else f"teacher_{split}"
    return (self.stages.run(name, spec, fn)["records"],)

  def pretrain_base(self) -> None:
    """Run `base`: pretrained from random initialisation on config.em.base_files (if set)."""
    if not self.cfg.base_files:
      return
    raw_tokens = self._raw_tokens(self.files["base"])
    if not raw_tokens:
      raise config_lib.ConfigError(
          f"config.em.base_files: no documents in {list(self.files['base'])} (for "
          f"builtin:mathcorpus/pretrain or pretrain_cot set config.corpus.n_pretrain > 0)")
    self._train_run(report.BASE_RUN, raw_files=self.files["base"], epochs=self.cfg.base_epochs,
                    raw_tokens=raw_tokens, init_from="",
                    seed=self.cfg.base_seed if self.cfg.base_seed >= 0 else None)
    self._eval_run(report.BASE_RUN)

  def paraphrases(self, kind: str) -> str:
    files = self.files["warmstart"] + self.files["bootstrap"]
    spec = {"files": files, "kind": kind, "config": self._sections("synthesis")}

    def fn(directory: str) -> dict[str, Any]:
      c = derive(self.config, {"job": "synthesize", "synthesis.kind": kind,
                               "synthesis.input_files": files})
      return {"records": jobs.run(c, directory)["shard_pattern"]}

    return self.stages.run(f"synth/{kind}", spec, fn)["records"]

  def estep(self, t: int, model_dir: str) -> str:
    spec = {"files": self.files["bootstrap"], "init_from": model_dir,
            "config": self._sections("estep")}

    def fn(directory: str) -> dict[str, Any]:
      c = derive(self.config, {"job": "estep", "estep.input_files": self.files["bootstrap"],
                               "estep.init_from": model_dir,
                               "estep.seed": self.config.estep.seed + t})
      summary = jobs.run(c, directory)
      keep = ("chunks", "mean_thought_len", "frac_ended_with_eol", "mean_ess",
              "mean_distinct_samples", "identical_share", "elbo_per_token", "wall_s_this_run",
              "num_samples")
      out = {k: summary[k] for k in keep if k in summary}
      out["records"] = os.path.join(directory, "estep", "records-*.tfrecord")
      return out

    out = self.stages.run(f"estep/iter_{t}", spec, fn)
    return out["records"]

  # ------------------------------------------------------------------------------- the loop

  def _doc_count(self, record_globs: tuple[str, ...]) -> int:
    from latent_em.data import records  # pylint: disable=g-import-not-at-top
    return sum(1 for _ in records.read_records(list(record_globs)))

  def mstep_steps(self, teacher: tuple[str, ...], n_docs: int) -> int:
    """The M-step budget: mstep_epochs passes over `n_docs` documents at the warm start's
    packed rows per document. It grows with the data, does not depend on the thoughts an
    E-step happened to write, and is one step count for every M-step, so raw_compute_matched
    and teacher_all are matched to each EM iteration."""
    rows_per_doc = self.runs["warmstart"]["train"]["epoch_rows"] / self._doc_count(teacher)
    return self._steps(self.cfg.mstep_epochs, rows_per_doc * n_docs / (1 - self.replay))

  def run(self) -> dict[str, Any]:
    cfg = self.cfg
    started = time.perf_counter()
    raw_all = self.files["warmstart"] + self.files["bootstrap"]
    teacher = self.teacher()
    self.pretrain_base()
    self._train_run("warmstart", record_files=teacher, epochs=cfg.warmstart_epochs,
                    thought_trained=True, raw_tokens=self._record_raw_tokens(teacher))
    self._thought_quality("warmstart", teacher)
    self._eval_run("warmstart")
    n_docs = self._doc_count(teacher) * cfg.mstep_include_warmstart + sum(
        1 for f in self.files["bootstrap"] for _ in _texts(self.config, f))
    steps = self.mstep_steps(teacher, n_docs)
    all_raw_tokens = self._raw_tokens(raw_all)
    self._baselines(steps, teacher, raw_all, all_raw_tokens)
    previous = self.stages.path("runs/warmstart/train")
    for t in range(1, cfg.iterations + 1):
      thoughts = self.estep(t, previous)
      record_files = ((*teacher, thoughts) if cfg.mstep_include_warmstart else (thoughts,))
      name = f"em_iter_{t}"
      self._train_run(name, record_files=record_files, steps=steps, thought_trained=True,
                      raw_tokens=self._record_raw_tokens(record_files))
      self._thought_quality(name, (thoughts,))  # the E-step's thoughts, not the teacher's
      self.runs[name]["estep"] = self.stages.done(f"estep/iter_{t}")["outputs"]
      self._eval_run(name)
      previous = self.stages.path(f"runs/{name}/train")
    results = report.collect(self.runs)
    # Each stage's own wall time (a stage done earlier or linked by reuse: when it ran).
    walls = {n: (self.stages.done(n) or {}).get("wall_s") for n in self.stages.timings}
    results["details"] = {"workdir": self.workdir, "stage_wall_s": walls,
                          "reused_or_resumed": sorted(n for n, t in self.stages.timings.items()
                                                      if t == 0.0),
                          "wall_s": time.perf_counter() - started,
                          "tokens_per_step": self.tokens_per_step, "mstep_steps": steps,
                          "num_samples": runtime.section(self.config, "estep").num_samples}
    if jax.process_index() == 0:
      report.write(results, self.workdir, plots=cfg.plots)
    return results

  def _baselines(self, steps: int, teacher: tuple[str, ...], raw_all: tuple[str, ...],
                 raw_tokens: int):
    """The runs without EM, on the same raw documents as the M-steps: raw_token_matched (the
    M-step's passes over the raw text), and, for the M-step budget, raw_compute_matched,
    teacher_all (the teacher's thoughts on every document), raw_fresh and the paraphrases."""
    cfg = self.cfg
    if "raw_token_matched" in cfg.baselines:
      self._train_run("raw_token_matched", raw_files=raw_all, epochs=cfg.mstep_epochs,
                      raw_tokens=raw_tokens)
      self._eval_run("raw_token_matched")
    if "raw_compute_matched" in cfg.baselines:
      self._train_run("raw_compute_matched", raw_files=raw_all, steps=steps,
                      raw_tokens=raw_tokens)
      self._eval_run("raw_compute_matched")
    if "teacher_all" in cfg.baselines:
      records = (*teacher, *self.teacher("bootstrap"))
      self._train_run("teacher_all", record_files=records, steps=steps, thought_trained=True,
                      raw_tokens=self._record_raw_tokens(records))
      self._thought_quality("teacher_all", records)
      self._eval_run("teacher_all")
    if "raw_fresh" in cfg.baselines:
      files = raw_all + self.files["fresh"]
      self._train_run("raw_fresh", raw_files=files, steps=steps,
                      raw_tokens=self._raw_tokens(files))
      self._eval_run("raw_fresh")
    for baseline, kinds in (("wrap_cot", ("wrap_cot",)), ("wrap", WRAP_STYLES)):
      if baseline in cfg.baselines:
        recs = tuple(self.paraphrases(kind) for kind in kinds)
        self._train_run(baseline, record_files=recs, fmt="pure", steps=steps,
                        raw_tokens=raw_tokens)
        self._eval_run(baseline)


def _text_list(config, path: str) -> list[str]:
  return [t for _, t in _texts(config, path)]


def _texts(config, path: str):
  from latent_em.data import sources  # pylint: disable=g-import-not-at-top
  data = runtime.section(config, "data")
  return sources.read_texts(path, data.text_field, "skip", sources.InputStats())


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole experiment; returns results (also WORKDIR/results.json)."""
  logging.info("EM experiment in %s", workdir)
  return Experiment(config, workdir).run()
