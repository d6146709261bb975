"""Run setup shared by every job: config validation, tokenizer, built-in corpus, model config.

Jobs call these instead of reading raw config sections, so every key is validated once and
every user mistake stops with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from latent_em import checkpoint, config_lib, model as model_lib, optim, sharding
from latent_em.data import sources

# Top-level config sections and the typed view each is checked against.
SECTIONS: dict[str, Any] = {}


def _sections() -> dict[str, Any]:
  if not SECTIONS:
    from latent_em import train  # late import: train imports runtime
    from latent_em.data import mathcorpus
    from latent_em.em import job as em_job
    from latent_em.data import thought_tasks
    from latent_em.estep import core as estep_core
    from latent_em.evaluation import job as eval_job
    from latent_em.synthesis import job as synthesis_job
    SECTIONS.update({
        "model": model_lib.ModelConfig,
        "mesh": sharding.MeshConfig,
        "optim": optim.OptimConfig,
        "checkpoint": checkpoint.CheckpointConfig,
        "data": sources.InputConfig,
        "tokenizer": TokenizerConfig,
        "train": train.TrainConfig,
        "corpus": mathcorpus.CorpusConfig,
        "estep": estep_core.EStepConfig,
        "mstep_data": thought_tasks.ThoughtDataConfig,
        "eval": eval_job.EvalConfig,
        "synthesis": synthesis_job.SynthesisConfig,
        "em": em_job.EMConfig,
    })
  return SECTIONS


SCALARS = {"job": str, "seed": int, "distributed": str}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """config.tokenizer: an existing SentencePiece model, or train one on the training files."""
  path: str = ""                 # existing .model (must contain the 4 latent tokens)
  vocab_size: int = 512          # when training one into WORKDIR/tokenizer.model
  train_docs: int = 20000        # documents read to train it
  # False: frequent numbers ("13", "20") become single pieces instead of one piece per digit.
  split_digits: bool = True

  def __post_init__(self):
    # 256 byte pieces + specials + the corpus' characters must fit.
    config_lib.check(self.vocab_size >= 300, "config.tokenizer.vocab_size",
                     f"{self.vocab_size} is too small: byte fallback alone needs 264 pieces "
                     "plus one per distinct character; use >= 300")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every section and top-level key; raises ConfigError naming the first bad key."""
  sections = _sections()
  known = set(sections) | set(SCALARS)
  for key in config.keys():
    if key not in known:
      import difflib
      close = difflib.get_close_matches(key, sorted(known), n=1)
      hint = f"; did you mean config.{close[0]}?" if close else ""
      raise config_lib.ConfigError(f"unknown config key config.{key}{hint}")
  from latent_em import jobs
  job = config.get("job", "train")
  if job not in jobs.JOBS:
    raise config_lib.ConfigError(f"config.job={job!r} is not one of {sorted(jobs.JOBS)}")
  for key, typ in SCALARS.items():
    if key in config and not isinstance(config[key], typ):
      raise config_lib.ConfigError(f"config.{key}={config[key]!r} should be {typ.__name__}")
  if config.get("distributed", "auto") not in ("auto", "on", "off"):
    raise config_lib.ConfigError("config.distributed must be 'auto', 'on' or 'off'")
  for name, cls in sections.items():
    if name in config:
      section = config[name].to_dict()
      if name == "model" and section.get("vocab_size", 1) == 0:
        section["vocab_size"] = 1  # resolved from the tokenizer later
      config_lib.from_config(cls, section, f"config.{name}")


def section(config: ml_collections.ConfigDict, name: str):
  return config_lib.from_config(_sections()[name], config.get(name, {}), f"config.{name}")


# ----------------------------------------------------------------------------- data files


BUILTIN_PREFIX = "builtin:mathcorpus/"


def resolve_files(config, files: tuple[str, ...], workdir: str, key: str) -> tuple[str, ...]:
  """Expands globs and materialises `builtin:mathcorpus/<split>` into WORKDIR/corpus/."""
  out = []
  for spec in files:
    if spec.startswith(BUILTIN_PREFIX):
      paths = builtin_corpus(config, workdir)
      split = spec[len(BUILTIN_PREFIX):]
      if split not in paths:
        raise config_lib.ConfigError(
            f"{key}: the built-in corpus has no split {split!r}; its splits are {sorted(paths)}")
      out.append(paths[split])
    elif spec.startswith("tfds:"):
      out.append(spec)
    else:
      matches = sorted(glob.glob(spec))
      if not matches:
        raise FileNotFoundError(f"{key}: no file matches {spec!r}")
      out.extend(matches)
  return tuple(out)


def builtin_corpus(config, workdir: str) -> dict[str, str]:
  """Generates the embedded math corpus once per workdir; returns split -> JSONL path."""
  from latent_em.data import mathcorpus
  cfg = section(config, "corpus")
  out_dir = os.path.join(workdir, "corpus")
  marker = os.path.join(out_dir, "DONE.json")
  expected = dataclasses.asdict(cfg)
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if done.get("config") == expected:
      return done["paths"]
  if jax.process_index() == 0:
    logging.info("generating the built-in math corpus into %s", out_dir)
  paths = mathcorpus.write_jsonl(mathcorpus.make_splits(cfg), out_dir)
  from latent_em import io_utils
  io_utils.write_json(marker, {"config": expected, "paths": paths})
  return paths


# ----------------------------------------------------------------------------- tokenizer


def get_tokenizer(config, workdir: str, train_files: tuple[str, ...] = ()):
  """Loads config.tokenizer.path, or trains WORKDIR/tokenizer.model on the training texts."""
  from latent_em import tokenizer as tok_lib
  cfg = section(config, "tokenizer")
  if cfg.path:
    if not os.path.exists(cfg.path):
      raise FileNotFoundError(f"config.tokenizer.path={cfg.path!r} does not exist")
    return tok_lib.load(cfg.path)
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    if not train_files:
      raise config_lib.ConfigError(
          "config.tokenizer.path is empty and there are no training files to train one on; "
          "set config.tokenizer.path or config.data.train_files")
    data_cfg = section(config, "data")
    texts = []
    stats = sources.InputStats()
    for f in train_files:
      for _, text in sources.read_jsonl_texts(f, data_cfg.text_field, "skip", stats):
        texts.append(text)
        if len(texts) >= cfg.train_docs:
          break
      if len(texts) >= cfg.train_docs:
        break
    if jax.process_index() == 0:
      logging.info("training a %d-piece tokenizer on %d documents -> %s", cfg.vocab_size,
                   len(texts), path)
      tok_lib.train(texts, path, cfg.vocab_size, split_digits=cfg.split_digits)
    sync("tokenizer")
  return tok_lib.load(path)


def model_config(config, tokenizer=None) -> model_lib.ModelConfig:
  """config.model with vocab_size 0 resolved to the tokenizer size (rounded up to 128)."""
  section_dict = config.model.to_dict()
  if section_dict.get("vocab_size", 0) == 0:
    if tokenizer is None:
      raise config_lib.ConfigError("config.model.vocab_size=0 needs a tokenizer to size it")
    section_dict["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
  cfg = config_lib.from_config(model_lib.ModelConfig, section_dict, "config.model")
  if tokenizer is not None and cfg.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
        f"{tokenizer.vocab_size} pieces; set it to 0 to size it from the tokenizer")
  return cfg


def sync(name: str) -> None:
  """Barrier across hosts (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
