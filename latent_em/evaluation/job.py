"""The evaluation job (`config.job = "eval"`): few-shot accuracy, validation NLL and ELBO_k.

  python -m latent_em.main --config=configs/X.py --workdir=W --config.job=eval \
      --config.eval.init_from=W_TRAINED

Writes WORKDIR/eval/results.json (atomically):
  accuracy         {task: accuracy} of the raw variant (latent tokens banned)
  latent_accuracy  {task: accuracy} of the latent variant (prompt ends with SoL PRIOR)
  constant_answer_accuracy
                   {task: accuracy of always giving the most common gold answer}: the level
                   below which accuracy carries no evidence
  per_subject      {"math": {subject: {"accuracy", "n"}}, "math:latent": ...}
  nll_per_token    on config.eval.nll_files (null when none)
  elbo_per_token   {"1": ..., "2": ..., "4": ...} on config.eval.elbo_files ({} when none)
  samples          a few generations per task and variant
  details          everything else: per-task counts (truncated prompts, missing answers, ...),
                   the full NLL / ELBO summaries, which variants ran and why.
Which variants run is config.eval.fewshot.latent: "auto" picks the latent variant iff the
checkpoint's workdir says it was thought-trained (see `was_thought_trained`), else the raw one.

Every process runs the whole evaluation on its local devices (the model is replicated per host,
as in the E-step); process 0 writes the results.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
from absl import logging

from latent_em import checkpoint, config_lib, formats, io_utils, model as model_lib, runtime
from latent_em import sharding
from latent_em.data import sources
from latent_em.evaluation import fewshot, intrinsic

OUT_DIR = "eval"
RESULTS = "results.json"
# Written into a training workdir whose data carried thoughts: {"thought_trained": true, ...}.
THOUGHT_MARKER = "thought_trained.json"
# Training layouts with the prior form `SoL PRIOR z EoL x`, which the latent answer prompt uses.
LATENT_FORMATS = (formats.DocFormat.RANDOM.value, formats.DocFormat.PRIOR_ONLY.value)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """config.eval"""
  init_from: str = ""               # finished train workdir, params checkpoint or HF dir
  fewshot: fewshot.FewShotConfig = fewshot.FewShotConfig()
  nll_files: tuple[str, ...] = ()   # held-out raw documents (JSONL / TFRecord / builtin:)
  elbo_files: tuple[str, ...] = ()
  text_field: str = "text"
  max_docs: int = 0                 # per metric; 0 = all documents of the files
  seq_len: int = 0                  # NLL piece length; 0 = config.data.seq_len
  nll_batch_size: int = 8           # rows per NLL forward
  elbo_ks: tuple[int, ...] = (1, 2, 4)  # K = max; sampling / chunking are config.estep's
  seed: int = 0
  progress_bar: bool = True

  def __post_init__(self):
    config_lib.check(self.max_docs >= 0, "config.eval.max_docs", "must be >= 0 (0 = all)")
    config_lib.check(self.seq_len >= 0, "config.eval.seq_len", "must be >= 0")
    config_lib.check(self.nll_batch_size >= 1, "config.eval.nll_batch_size", "must be >= 1")
    config_lib.check(bool(self.elbo_ks) and all(k >= 1 for k in self.elbo_ks),
                     "config.eval.elbo_ks", f"{self.elbo_ks} must be a non-empty list of k >= 1")


def _source_dir(init_from: str) -> str:
  """The directory that describes a checkpoint: the workdir of WORKDIR/params, else itself."""
  path = os.path.abspath(init_from)
  if checkpoint.is_params_checkpoint(path) and not os.path.exists(
      os.path.join(path, THOUGHT_MARKER)):
    return os.path.dirname(path)
  return path


def was_thought_trained(init_from: str) -> bool:
  """Whether the checkpoint was trained on thought-augmented text.

  Looks beside the checkpoint (in the workdir of WORKDIR/params): THOUGHT_MARKER decides
  ({"thought_trained": bool}, true when the key is absent); else train_summary.json's
  "thought_trained" or, failing that, its "data_format" (a formats.DocFormat value; only the
  layouts in LATENT_FORMATS teach the prior form the latent prompt relies on). A checkpoint
  with neither (e.g. an imported HF model) is raw.
  """
  directory = _source_dir(init_from)
  marker = os.path.join(directory, THOUGHT_MARKER)
  if os.path.exists(marker):
    return bool(io_utils.read_json(marker).get("thought_trained", True))
  summary = os.path.join(directory, "train_summary.json")
  if os.path.exists(summary):
    info = io_utils.read_json(summary)
    if "thought_trained" in info:
      return bool(info["thought_trained"])
    if info.get("data_format"):
      return info["data_format"] in LATENT_FORMATS
  return False


def mark_thought_trained(workdir: str, **info: Any) -> None:
  """Records in a training workdir that its data carried thoughts (read by latent="auto")."""
  io_utils.write_json(os.path.join(workdir, THOUGHT_MARKER), {"thought_trained": True, **info})


def variants(mode: str, init_from: str) -> tuple[list[bool], str]:
  """(latent flags to run, why) for config.eval.fewshot.latent = auto | on | off | both."""
  if mode == "auto":
    trained = was_thought_trained(init_from)
    return ([True] if trained else [False]), (
        f"auto: {'thought' if trained else 'raw'}-trained checkpoint")
  return {"on": [True], "off": [False], "both": [False, True]}[mode], mode


def read_docs(config, files: tuple[str, ...], cfg: EvalConfig, workdir: str, key: str
              ) -> tuple[list[str], dict[str, int]]:
  """Texts of `files` (globs and builtin: corpora resolved), at most cfg.max_docs."""
  texts: list[str] = []
  stats = sources.InputStats()
  for path in runtime.resolve_files(config, files, workdir, key):
    if sources.file_kind(path) == "tfds":
      raise config_lib.ConfigError(f"{key}: {path!r} is a TFDS spec; give JSONL or TFRecord "
                                   "files (or builtin:mathcorpus/validation)")
    for _, text in sources.read_texts(path, cfg.text_field, "skip", stats):
      texts.append(text)
      if cfg.max_docs and len(texts) >= cfg.max_docs:
        return texts, stats.summary()
  return texts, stats.summary()


class _Bar:
  """One tqdm bar per phase (disabled off process 0 or by config.eval.progress_bar)."""

  def __init__(self, enabled: bool):
    self.enabled = enabled and jax.process_index() == 0

  def __call__(self, total: int, desc: str, unit: str):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not self.enabled)


def eval_mesh(config, model_cfg: model_lib.ModelConfig, devices: list
              ) -> tuple[jax.sharding.Mesh | None, list | None, Any]:
  """(mesh, rules, parameter shardings) of the evaluation over `devices` (one host's, real or
  compile-only); all None on a single device (plain arrays, no sharding constraints)."""
  if len(devices) <= 1:
    return None, None, None
  mesh_cfg = runtime.section(config, "mesh")
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = mesh_cfg.rules_list
  return mesh, rules, sharding.logical_to_sharding(model_lib.logical_axes(model_cfg), mesh, rules)


def run(config, workdir: str) -> dict[str, Any]:
  """Evaluates config.eval.init_from; returns (and writes WORKDIR/eval/results.json) the results."""
  from latent_em import train  # pylint: disable=g-import-not-at-top  (train imports runtime)
  from latent_em.estep import job as estep_job  # pylint: disable=g-import-not-at-top
  cfg = config_lib.from_config(EvalConfig, config.get("eval", {}), "config.eval")
  if not cfg.init_from:
    raise config_lib.ConfigError("config.eval.init_from is empty: give the model to evaluate (a "
                                 "finished train workdir, a params checkpoint or a HF model dir)")
  checkpoint.find_params_source(cfg.init_from, "config.eval.init_from")
  started = time.perf_counter()
  tokenizer = estep_job.tokenizer_for(config, cfg.init_from, "config.eval.init_from")
  model_cfg = runtime.model_config(config, tokenizer)
  params = train.load_init_params(cfg.init_from, model_cfg, key="config.eval.init_from")
  mesh, rules, param_shardings = eval_mesh(config, model_cfg, jax.local_devices())
  if mesh is not None:
    params = jax.device_put(params, param_shardings)
  data_seq_len = runtime.section(config, "data").seq_len
  bar = _Bar(cfg.progress_bar)

  fs = cfg.fewshot
  flags, why = variants(fs.latent, cfg.init_from)
  max_seq_len = fs.max_seq_len or data_seq_len
  corpus_dir = ""
  if "mathcorpus" in fs.tasks and not fs.mathcorpus_dir:
    corpus_dir = os.path.dirname(runtime.builtin_corpus(config, workdir)["eval"])
  results: dict[str, Any] = {"accuracy": {}, "latent_accuracy": {},
                             "constant_answer_accuracy": {}, "per_subject": {},
                             "nll_per_token": None, "elbo_per_token": {}, "samples": [],
                             "details": {"init_from": cfg.init_from, "latent_mode": fs.latent,
                                         "variants": why, "fewshot": {}}}
  for task in fs.tasks:
    exemplars, examples = fewshot.load_task(task, fs, corpus_dir)
    for latent in flags:
      name = f"{task}:latent" if latent else task
      with bar(len(examples), f"eval {name}", "ex") as pbar:
        res = fewshot.evaluate_fewshot(
            model_cfg, params, tokenizer, examples, task, exemplars=exemplars, latent=latent,
            max_gen_len=fs.max_gen_len, batch_size=fs.batch_size, max_seq_len=max_seq_len,
            keep_samples=fs.keep_samples, mesh=mesh, rules=rules, progress=pbar.update)
      results["latent_accuracy" if latent else "accuracy"][task] = res["accuracy"]
      results["constant_answer_accuracy"][task] = res["constant_answer_accuracy"]
      if "per_subject" in res:
        results["per_subject"][name] = res["per_subject"]
      results["samples"].extend(res.pop("samples"))
      results["details"]["fewshot"][name] = res
      logging.info("eval %s: accuracy %.4f (%d / %d; %d different answers; always giving the "
                   "most common gold answer scores %.4f)", name, res["accuracy"], res["correct"],
                   res["n"], res["distinct_preds"], res["constant_answer_accuracy"])

  if cfg.nll_files:
    texts, stats = read_docs(config, cfg.nll_files, cfg, workdir, "config.eval.nll_files")
    nll = intrinsic.validation_nll(model_cfg, params, tokenizer, texts,
                                   seq_len=cfg.seq_len or data_seq_len,
                                   batch_size=cfg.nll_batch_size, mesh=mesh)
    nll["input"] = stats
    results["nll_per_token"] = nll["nll_per_token"]
    results["details"]["nll"] = nll
    logging.info("eval nll_per_token %.4f on %d tokens", nll["nll_per_token"], nll["tokens"])

  if cfg.elbo_files:
    from latent_em.data import chunking  # pylint: disable=g-import-not-at-top
    estep_cfg = runtime.section(config, "estep")
    texts, stats = read_docs(config, cfg.elbo_files, cfg, workdir, "config.eval.elbo_files")
    n_chunks = sum(len(chunking.chunk_document(t, estep_cfg.chunking))
                   - chunking.context_chunks(t, estep_cfg.chunking) for t in texts)
    with bar(n_chunks, "eval elbo", "chunk") as pbar:
      elbo = intrinsic.validation_elbo(model_cfg, params, tokenizer, texts, estep_cfg=estep_cfg,
                                       ks=cfg.elbo_ks, seed=cfg.seed, mesh=mesh, rules=rules,
                                       progress=pbar.update)
    elbo["input"] = stats
    results["elbo_per_token"] = elbo["elbo_per_token"]
    results["details"]["elbo"] = elbo
    logging.info("eval elbo_per_token %s (mean ESS %.2f)", elbo["elbo_per_token"],
                 elbo["mean_ess"])

  results["details"]["wall_s"] = time.perf_counter() - started
  runtime.sync("eval_done")
  if jax.process_index() == 0:
    io_utils.write_json(os.path.join(workdir, OUT_DIR, RESULTS), results)
  return results
