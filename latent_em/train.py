"""The training job (`config.job = "train"`): sharded steps, metrics, eval, resumable checkpoints.

Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints, including
the input-pipeline position, so the resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from latent_em import checkpoint, config_lib, io_utils, model as model_lib, optim, runtime
from latent_em import sharding, train_step as ts


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """config.train"""
  steps: int = 1000
  grad_accum: int = 1
  log_every: int = 20
  eval_every: int = 0              # 0: only at the end (if there is a validation split)
  eval_batches: int = 20           # 0: the whole validation split
  init_from: str = ""              # HF dir, params checkpoint, or finished workdir
  peak_flops_per_device: float = 0.0  # 0: look up by device kind (MFU left out if unknown)
  progress_bar: bool = True

  def __post_init__(self):
    config_lib.check(self.steps > 0, "config.train.steps", "must be positive")
    config_lib.check(self.grad_accum >= 1, "config.train.grad_accum", "must be >= 1")
    config_lib.check(self.log_every >= 1, "config.train.log_every", "must be >= 1")


class NonFiniteLossError(FloatingPointError):
  pass


# bf16 dense peak FLOP/s per device (for the MFU estimate).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "L4": 121e12}


def peak_flops(override: float) -> float | None:
  if override > 0:
    return override
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def load_init_params(path: str, cfg: model_lib.ModelConfig, key: str = "config.train.init_from"):
  """Params from a HF checkpoint or one of ours, checked against the model config."""
  kind = checkpoint.find_params_source(path, key)
  if kind == "hf":
    from latent_em import hf
    base_cfg = hf.config_from_hf(hf.read_hf_config(path), path=os.path.join(path, "config.json"))
    # Rows beyond the checkpoint's vocabulary (the 4 latent tokens, padding) are new.
    extra = max(cfg.vocab_size - base_cfg.vocab_size, 0)
    hf_cfg, params = hf.load_llama(path, extra_vocab=extra, scan_layers=cfg.scan_layers)
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "hd", "mlp_dim", "vocab_size",
                  "tie_embeddings", "rope_theta"):
      if getattr(hf_cfg, field) != getattr(cfg, field):
        raise config_lib.ConfigError(
            f"config.model.{field}={getattr(cfg, field)} does not match {path}/config.json "
            f"({getattr(hf_cfg, field)}); use the model variant that matches the checkpoint")
    return params
  directory = path if kind == "params" else os.path.join(path, "params")
  expected = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  params = checkpoint.load_params(directory)
  got = jax.tree.map(lambda x: x.shape, params)
  want = jax.tree.map(lambda x: x.shape, expected)
  if got != want:
    raise config_lib.ConfigError(
        f"{key}={path!r}: parameter shapes do not match config.model ({got} vs {want})")
  return params


def _task_base(workdir: str) -> str:
  """A seqio registry name unique to this workdir (tasks are registered per run)."""
  import hashlib
  return "latent_em_" + hashlib.blake2b(os.path.abspath(workdir).encode(), digest_size=6).hexdigest()


def training_task(config, workdir: str, train_files, val_files, tokenizer) -> str:
  """Registers the seqio task (or mixture) this run trains on; returns its name.

  Raw text (config.data.train_files), thought-augmented records (config.mstep_data.record_files)
  or a mixture of both; validation is always raw text (NLL on held-out documents).
  """
  from latent_em.data import tasks, thought_tasks
  cfg_data = runtime.section(config, "data")
  cfg_thought = runtime.section(config, "mstep_data")
  base = _task_base(workdir)
  raw_splits = {}
  if train_files:
    raw_splits["train"] = train_files
  if val_files:
    raw_splits["validation"] = val_files
  if raw_splits:
    tasks.register_raw_task(base + "_raw", raw_splits, tokenizer.vocabulary,
                            text_field=cfg_data.text_field, policy=cfg_data.on_bad_input,
                            max_doc_chars=cfg_data.max_doc_chars,
                            shuffle_buffer_size=cfg_data.shuffle_buffer)
  if not cfg_thought.record_files:
    if not train_files:
      raise config_lib.ConfigError("nothing to train on: set config.data.train_files and/or "
                                   "config.mstep_data.record_files")
    return base + "_raw"
  splits = {"train": list(cfg_thought.record_files)}
  thought_tasks.register_from_config(base + "_thought", cfg_thought, splits, tokenizer.vocabulary,
                                     config_keys={"train": "config.mstep_data.record_files"},
                                     shuffle_buffer_size=cfg_data.shuffle_buffer)
  if not train_files or cfg_thought.thought_rate >= 1.0:
    return base + "_thought"
  thought_tasks.register_mixture(base, [(base + "_thought", cfg_thought.thought_rate),
                                        (base + "_raw", 1.0 - cfg_thought.thought_rate)])
  return base


def input_stats(task_name: str) -> dict[str, int]:
  """Bad-input counts (read, kept, skipped per kind) of the raw text this run has read."""
  import seqio
  provider = seqio.get_mixture_or_task(task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  total: dict[str, int] = {}
  for task in tasks:
    stats = getattr(task.source, "stats", None)
    if stats is not None:
      stats.log()
      for k, v in stats.summary().items():
        total[k] = total.get(k, 0) + v
  return total


def run(config, workdir: str) -> dict[str, Any]:
  """Trains per `config`; returns (and writes WORKDIR/train_summary.json) the final metrics."""
  from clu import metric_writers

  from latent_em.data import pipeline

  cfg_train: TrainConfig = runtime.section(config, "train")
  cfg_data = runtime.section(config, "data")
  cfg_optim = runtime.section(config, "optim")
  cfg_ckpt = runtime.section(config, "checkpoint")
  cfg_mesh = runtime.section(config, "mesh")
  os.makedirs(workdir, exist_ok=True)

  train_files = runtime.resolve_files(config, cfg_data.train_files, workdir,
                                      "config.data.train_files")
  val_files = runtime.resolve_files(config, cfg_data.validation_files, workdir,
                                    "config.data.validation_files")
  tokenizer = runtime.get_tokenizer(config, workdir, train_files)
  cfg_model = runtime.model_config(config, tokenizer)

  mesh = sharding.make_mesh(cfg_mesh)
  rules = cfg_mesh.rules_list
  if cfg_data.batch_size % (cfg_train.grad_accum * sharding.data_parallel_size(mesh)):
    raise config_lib.ConfigError(
        f"config.data.batch_size={cfg_data.batch_size} must be divisible by grad_accum "
        f"({cfg_train.grad_accum}) x data-parallel devices ({sharding.data_parallel_size(mesh)})")

  task_name = training_task(config, workdir, train_files, val_files, tokenizer)

  val_task = _task_base(workdir) + "_raw"

  def train_dataset():
    return pipeline.get_dataset(task_name, "train", cfg_data.seq_len, cfg_data.batch_size,
                                bos_id=tokenizer.bos_id, seed=cfg_data.seed, pack=cfg_data.pack)

  tx, schedule = optim.make_optimizer(cfg_optim, cfg_train.steps)
  abstract, state_sharding = ts.state_shardings(cfg_model, tx, mesh, rules)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cfg_ckpt)
  start = ckpt.latest_step()
  if start is not None:
    checkpoint.log_restore(start, ckpt.directory)
    state, data_state = ckpt.restore(abstract, start)
    batches = pipeline.BatchIterator(train_dataset, start_batch=data_state["batches_consumed"])
  else:
    init_params = None
    if cfg_train.init_from:
      init_params = load_init_params(cfg_train.init_from, cfg_model)
      logging.info("starting from the parameters of %s", cfg_train.init_from)
    state = ts.create_sharded_state(cfg_model, tx, mesh, rules,
                                    jax.random.key(config.get("seed", 0)), params=init_params)
    batches = pipeline.BatchIterator(train_dataset, start_batch=0)
    start = 0

  step_fn = ts.jit_train_step(
      ts.make_train_step(cfg_model, tx, schedule, cfg_train.grad_accum, mesh, rules), mesh,
      state_sharding)
  eval_fn = (ts.make_eval_step(cfg_model, mesh, state_sharding.params, rules) if val_files
             else None)

  def evaluate(params) -> float:
    total, weight = 0.0, 0.0
    for i, batch in enumerate(pipeline.iterate_eval(
        val_task, "validation", cfg_data.seq_len, cfg_data.batch_size,
        bos_id=tokenizer.bos_id, pack=cfg_data.pack)):
      if cfg_train.eval_batches and i >= cfg_train.eval_batches:
        break
      s, w = eval_fn(params, sharding.host_to_global(batch, mesh))
      total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)

  writer = metric_writers.create_default_writer(
      os.path.join(workdir, "tb"), just_logging=jax.process_index() > 0)
  flops_per_token = model_lib.train_flops_per_token(cfg_model, cfg_data.seq_len)
  peak = peak_flops(cfg_train.peak_flops_per_device)
  n_params = model_lib.param_count(cfg_model)
  if jax.process_index() == 0:
    logging.info("model: %.2fM params; mesh %s; global batch %d x %d tokens",
                 n_params / 1e6, dict(mesh.shape), cfg_data.batch_size, cfg_data.seq_len)

  from tqdm import tqdm
  bar = tqdm(total=cfg_train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=not cfg_train.progress_bar or jax.process_index() > 0)
  pending: list[dict] = []
  last = {"loss": float("nan")}
  eval_nll = None
  t_log, tokens_since = time.perf_counter(), 0.0  # loss-bearing tokens trained since this start
  train_start = time.perf_counter()
  try:
    for step in range(start, cfg_train.steps):
      batch = sharding.host_to_global(next(batches), mesh)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      if done % cfg_train.log_every == 0 or done == cfg_train.steps:
        fetched = jax.device_get(pending)
        for i, m in enumerate(fetched):
          if not m["finite"]:
            raise NonFiniteLossError(
                f"loss or gradients became NaN/Inf at step {done - len(fetched) + i + 1} "
                f"(loss={m['loss']}); lower config.optim.lr or check the data")
        now = time.perf_counter()
        tokens = sum(float(m["tokens"]) for m in fetched)
        tokens_padded = len(fetched) * cfg_data.batch_size * cfg_data.seq_len
        tokens_since += tokens
        elapsed = now - t_log
        scalars = {
            "train/loss": float(np.mean([m["loss"] for m in fetched])),
            "train/grad_norm": float(fetched[-1]["grad_norm"]),
            "train/lr": float(fetched[-1]["lr"]),
            "perf/tokens_per_s": tokens_padded / elapsed,
            "perf/real_tokens_per_s": tokens / elapsed,
        }
        if peak:
          scalars["perf/mfu"] = (tokens_padded * flops_per_token / elapsed
                                 / (peak * jax.device_count()))
        writer.write_scalars(done, scalars)
        last = {k.split("/")[-1]: v for k, v in scalars.items()}
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", tok_s=f"{scalars['perf/tokens_per_s']:.0f}")
        pending, t_log = [], now
      bar.update(1)
      if eval_fn and cfg_train.eval_every and done % cfg_train.eval_every == 0 and done != cfg_train.steps:
        eval_nll = evaluate(state.params)
        writer.write_scalars(done, {"eval/nll_per_token": eval_nll})
        t_log = time.perf_counter()  # keep eval time out of the throughput numbers
      ckpt.save(done, state, batches.get_state(), force=done == cfg_train.steps)
  except BaseException:
    ckpt.close()  # let an in-flight async save commit before unwinding
    raise
  bar.close()
  if eval_fn:
    eval_nll = evaluate(state.params)
    writer.write_scalars(cfg_train.steps, {"eval/nll_per_token": eval_nll})
  ckpt.close()
  writer.flush()
  params_dir = os.path.join(workdir, "params")
  checkpoint.save_params(state.params, params_dir)
  summary = {
      "steps": cfg_train.steps, "final_loss": last.get("loss"), "eval_nll_per_token": eval_nll,
      "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
      "params": n_params, "wall_s": time.perf_counter() - train_start, "params_dir": params_dir,
      "loss_tokens": tokens_since,
      "tokenizer": tokenizer.path, "input": input_stats(task_name),
      "data_format": (runtime.section(config, "mstep_data").format
                      if runtime.section(config, "mstep_data").record_files else "raw"),
  }
  if jax.process_index() == 0:
    io_utils.write_json(os.path.join(workdir, "train_summary.json"), summary)
    logging.info("train summary: %s", summary)
  return summary
