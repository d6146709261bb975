"""The E-step job (`config.job = "estep"`): thoughts for every chunk of a corpus, in shards.

Documents are numbered in file order and grouped into shards of `docs_per_shard`; process p of
N takes shards s with s % N == p and runs on its own local devices (the model is replicated per
host, so hosts never wait on each other). Each finished shard is committed atomically as
WORKDIR/estep/records-SSSSS-of-NNNNN.tfrecord; a rerun skips finished shards, so a killed job
loses at most the shard in flight. When every shard exists, WORKDIR/estep/summary.json
aggregates them (read back from the records, so it is the same after any number of restarts).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging

from latent_em import checkpoint, io_utils, runtime, sharding
from latent_em.data import chunking, records, sources
from latent_em.estep import core
from latent_em.sampling import weights

OUT_DIR = "estep"
RECORD_PREFIX = "records"


def iter_documents(files, cfg: core.EStepConfig, stats: sources.InputStats
                   ) -> Iterator[tuple[str, str]]:
  docs = sources.read_docs(files, cfg.text_field, cfg.on_bad_input, stats)
  yield from (itertools.islice(docs, cfg.max_docs) if cfg.max_docs else docs)


def shard_docs(docs: Iterator[tuple[str, str]], per_shard: int
               ) -> Iterator[tuple[int, list[tuple[str, str]]]]:
  shard, buf = 0, []
  for doc in docs:
    buf.append(doc)
    if len(buf) == per_shard:
      yield shard, buf
      shard, buf = shard + 1, []
  if buf:
    yield shard, buf


def tokenizer_for(config, init_from: str, key: str):
  """config.tokenizer.path, else the tokenizer saved in the checkpoint's workdir."""
  from latent_em import tokenizer as tok_lib
  path = runtime.section(config, "tokenizer").path
  if not path:
    for candidate in (os.path.join(init_from, "tokenizer.model"),
                      os.path.join(os.path.dirname(os.path.abspath(init_from)), "tokenizer.model")):
      if os.path.exists(candidate):
        path = candidate
        break
  if not path:
    raise FileNotFoundError(f"no tokenizer: set config.tokenizer.path (none found beside {key}="
                            f"{init_from!r})")
  return tok_lib.load(path)


def process_shard(engine: core.Engine, docs: list[tuple[str, str]], cfg: core.EStepConfig,
                  shard: int, progress=None) -> list[records.DocRecord]:
  rng = jax.random.fold_in(jax.random.key(cfg.seed), shard)
  select_rng = np.random.default_rng([cfg.seed, shard])
  pairs, owners = [], []
  out = [records.DocRecord(doc_id=doc_id, text=text, meta={"estep_shard": shard})
         for doc_id, text in docs]
  for d, (_, text) in enumerate(docs):
    for pair in chunking.chunk_pairs(text, cfg.chunking):
      if pair.context:  # chunking.context_until: no thought; trained as raw text
        out[d].chunks.append(records.ChunkRecord(prefix=pair.prefix, suffix=pair.suffix,
                                                 source="context"))
        continue
      pairs.append((pair.prefix, pair.suffix))
      owners.append(d)
  results: list[core.ChunkResult] = []
  b = cfg.batch_chunks
  for i in range(0, len(pairs), b):
    batch = engine.process(pairs[i:i + b], jax.random.fold_in(rng, i // b), select_rng)
    results.extend(batch)
    if progress is not None:
      progress.update(len(batch))
      progress.generated += sum(len(r.thought_ids) for r in batch) * cfg.num_samples
  for (prefix, suffix), d, r in zip(pairs, owners, results):
    out[d].chunks.append(records.ChunkRecord(
        prefix=prefix, suffix=suffix, thought=r.thought, log_weights=r.log_weights,
        thought_len=r.thought_len, ended=r.ended, elbo={str(k): v for k, v in r.elbo.items()},
        suffix_tokens=r.suffix_tokens, cut_tokens=r.cut_tokens, source="estep"))
  return out


def summarize(paths: list[str], ks) -> dict[str, Any]:
  """Aggregate statistics of finished shards (read back from the records)."""
  n_docs = n_chunks = ended = cut = identical = 0
  thought_len, ess, distinct, suffix_tokens = [], [], [], 0
  elbo_sum = {str(k): 0.0 for k in ks}
  for rec in records.read_records(paths):
    n_docs += 1
    for c in rec.chunks:
      if c.source == "context":
        continue
      n_chunks += 1
      ended += c.ended
      cut += c.cut_tokens
      thought_len.append(c.thought_len)
      ess.append(weights.effective_sample_size(np.asarray(c.log_weights)))
      # Samples with equal log-weights (equal log p and log q) are, in practice, one thought.
      n_distinct = len(set(c.log_weights))
      distinct.append(n_distinct)
      identical += len(c.log_weights) > 1 and n_distinct == 1
      suffix_tokens += c.suffix_tokens
      for k in elbo_sum:
        elbo_sum[k] += c.elbo.get(k, float("nan"))
  per_token = {k: v / max(suffix_tokens, 1) for k, v in elbo_sum.items()}
  return {
      "docs": n_docs, "chunks": n_chunks, "suffix_tokens": suffix_tokens,
      "mean_thought_len": float(np.mean(thought_len)) if thought_len else 0.0,
      "frac_ended_with_eol": ended / max(n_chunks, 1),
      "mean_ess": float(np.mean(ess)) if ess else 0.0,
      "mean_distinct_samples": float(np.mean(distinct)) if distinct else 0.0,
      "identical_share": identical / max(n_chunks, 1),
      "elbo_per_token": per_token, "cut_suffix_tokens": cut,
  }


class _Progress:
  def __init__(self, total: int, enabled: bool):
    from tqdm import tqdm
    self.bar = tqdm(total=total, desc="estep", unit="chunk", dynamic_ncols=True,
                    disable=not enabled)
    self.start = time.perf_counter()
    self.generated = 0

  def update(self, n: int):
    self.bar.update(n)
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    self.bar.set_postfix(gen_tok_s=f"{self.generated / elapsed:.0f}")

  def close(self):
    self.bar.close()


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the E-step over config.estep.input_files; returns the summary."""
  from latent_em import train
  cfg: core.EStepConfig = runtime.section(config, "estep")
  mesh_cfg = runtime.section(config, "mesh")
  if not cfg.init_from:
    raise FileNotFoundError("config.estep.init_from is empty: give the model to infer thoughts "
                            "with (a finished train workdir or a params checkpoint)")
  checkpoint.find_params_source(cfg.init_from, "config.estep.init_from")
  files = runtime.resolve_files(config, cfg.input_files, workdir, "config.estep.input_files")
  if not files:
    raise FileNotFoundError("config.estep.input_files is empty")
  tokenizer = tokenizer_for(config, cfg.init_from, "config.estep.init_from")
  model_cfg = runtime.model_config(config, tokenizer)
  params = train.load_init_params(cfg.init_from, model_cfg, key="config.estep.init_from")
  out_dir = os.path.join(workdir, OUT_DIR)
  os.makedirs(out_dir, exist_ok=True)

  stats = sources.InputStats()
  n_docs = sum(1 for _ in iter_documents(files, cfg, sources.InputStats()))
  if n_docs == 0:
    raise ValueError(f"config.estep.input_files {files} hold no usable document")
  n_shards = -(-n_docs // cfg.docs_per_shard)
  paths = records.shard_paths(os.path.join(out_dir, RECORD_PREFIX), n_shards)
  mine = [s for s in range(n_shards) if s % jax.process_count() == jax.process_index()]
  todo = [s for s in mine if not os.path.exists(paths[s])]
  if len(todo) < len(mine):
    logging.info("estep: %d of %d shards already done; resuming", len(mine) - len(todo), len(mine))

  engine = None
  if todo:
    mesh = sharding.make_mesh(mesh_cfg, jax.local_devices())
    engine = core.Engine(cfg, model_cfg, params, tokenizer, mesh, mesh_cfg.rules_list)
  started = time.perf_counter()
  progress = None
  for shard, docs in shard_docs(iter_documents(files, cfg, stats), cfg.docs_per_shard):
    if shard not in todo:
      continue
    if progress is None:
      total = sum(len(chunking.chunk_document(t, cfg.chunking))
                  - chunking.context_chunks(t, cfg.chunking) for s, ds in
                  shard_docs(iter_documents(files, cfg, sources.InputStats()),
                             cfg.docs_per_shard) if s in todo for _, t in ds)
      progress = _Progress(total, jax.process_index() == 0)
    recs = process_shard(engine, docs, cfg, shard, progress)
    records.write_shard(recs, paths[shard])
  if progress is not None:
    progress.close()
  wall = time.perf_counter() - started
  runtime.sync("estep_done")
  missing = [p for p in paths if not os.path.exists(p)]
  summary = {"shards": n_shards, "missing_shards": len(missing), "wall_s_this_run": wall,
             "input": stats.summary(), "num_samples": cfg.num_samples,
             "selection": cfg.selection}
  if not missing:
    summary.update(summarize(paths, cfg.elbo_ks))
    summary["records"] = os.path.join(out_dir, RECORD_PREFIX + "-*-of-*.tfrecord")
    if jax.process_index() == 0:
      io_utils.write_json(os.path.join(out_dir, "summary.json"), summary)
      logging.info("estep summary: %s", summary)
  return summary
