"""The E-step job (`config.job = "estep"`): thoughts for every chunk of a corpus, in shards.

Documents are numbered in file order and grouped into shards of `docs_per_shard`; process p of
N takes shards s with s % N == p and runs on its own local devices (the model is replicated per
host, so hosts never wait on each other). A process streams its shards through one
continuously batched decode (`core.Engine`), so rows never idle at a shard boundary; each
finished shard is committed atomically as WORKDIR/estep/records-SSSSS-of-NNNNN.tfrecord. A
rerun skips finished shards, so a killed job loses only the shards in flight, and rewrites
them identically. When every shard exists, WORKDIR/estep/summary.json aggregates them (read
back from the records, so it is the same after any number of restarts) with the decoding's
`slot_utilization` (useful / computed row-steps, summed over the runs that decoded).
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import time
from typing import Any, Iterable, Iterator

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


def process_shards(engine: core.Engine, shards: Iterable[tuple[int, list[tuple[str, str]]]],
                   cfg: core.EStepConfig, progress=None
                   ) -> Iterator[tuple[int, list[records.DocRecord]]]:
  """E-step for shards of documents through one continuous batch: yields (shard, records) as
  each shard's chunks all finish (roughly in shard order; decoding rows never wait for a shard
  boundary).

  Chunk i of shard s draws its thoughts with fold_in(fold_in(key(seed), s), i) and the kept
  ones are selected with default_rng([seed, s]) in chunk order, so a shard's records do not
  depend on which other shards ran beside it (a resumed job rewrites a lost shard identically).
  """
  open_shards: dict[int, dict[str, Any]] = {}
  ready: list[int] = []

  def chunks() -> Iterator[core.Chunk]:
    for shard, docs in shards:
      base = jax.random.fold_in(jax.random.key(cfg.seed), shard)
      # pairs: every chunk in document order (doc, pair); chunks: the sampled ones, in order.
      entry = {"docs": docs, "pairs": [], "chunks": [], "left": 0}
      for d, (_, text) in enumerate(docs):
        for pair in chunking.chunk_pairs(text, cfg.chunking):
          entry["pairs"].append((d, pair))
      sampled = [pair for _, pair in entry["pairs"] if not pair.context]
      entry["left"] = len(sampled)
      open_shards[shard] = entry
      if not entry["left"]:
        ready.append(shard)
      for i, pair in enumerate(sampled):
        chunk = engine.chunk(pair.prefix, pair.suffix, jax.random.fold_in(base, i), tag=shard)
        entry["chunks"].append(chunk)
        yield chunk

  def finish(shard: int) -> tuple[int, list[records.DocRecord]]:
    entry = open_shards.pop(shard)
    results = engine.score(entry["chunks"], np.random.default_rng([cfg.seed, shard]))
    out = [records.DocRecord(doc_id=doc_id, text=text, meta={"estep_shard": shard})
           for doc_id, text in entry["docs"]]
    results = iter(results)
    for d, pair in entry["pairs"]:
      if pair.context:  # chunking.context_until: no thought; trained as raw text
        out[d].chunks.append(records.ChunkRecord(prefix=pair.prefix, suffix=pair.suffix,
                                                 source="context"))
        continue
      r = next(results)
      out[d].chunks.append(records.ChunkRecord(
          prefix=pair.prefix, suffix=pair.suffix, thought=r.thought, log_weights=r.log_weights,
          thought_len=r.thought_len, ended=r.ended, elbo={str(k): v for k, v in r.elbo.items()},
          suffix_tokens=r.suffix_tokens, cut_tokens=r.cut_tokens, source="estep"))
    return shard, out

  for chunk in engine.sample(chunks()):
    entry = open_shards[chunk.tag]
    entry["left"] -= 1
    if progress is not None:
      progress.generated += sum(len(s.tokens) for s in chunk.samples)
      progress.update(1)
    if not entry["left"]:
      ready.append(chunk.tag)
    while ready:
      yield finish(ready.pop(0))
  while ready:
    yield finish(ready.pop(0))


def decode_stats_path(out_dir: str, process: int) -> str:
  return os.path.join(out_dir, f"decode_stats-{process:05d}.json")


def add_decode_stats(path: str, stats: dict[str, Any]) -> None:
  """Adds this run's decoding counts to the process' running totals (over all runs)."""
  total = json.load(open(path)) if os.path.exists(path) else {}
  for key in ("useful", "computed", "drain_useful", "drain_computed", "decode_steps",
              "decode_calls", "refill_calls", "samples"):
    total[key] = total.get(key, 0) + int(stats[key])
  io_utils.write_json(path, total)


def slot_utilization(out_dir: str) -> dict[str, Any]:
  """Useful / computed decoding row-steps over every run and process of this E-step; "steady"
  leaves out each run's tail (rows left idle once no chunk was waiting)."""
  keys = ("useful", "computed", "drain_useful", "drain_computed")
  total = dict.fromkeys(keys, 0)
  for path in glob.glob(os.path.join(out_dir, "decode_stats-*.json")):
    stats = json.load(open(path))
    for key in keys:
      total[key] += stats.get(key, 0)
  steady = total["computed"] - total["drain_computed"]
  return {"slot_utilization": total["useful"] / total["computed"] if total["computed"] else None,
          "steady_slot_utilization": ((total["useful"] - total["drain_useful"]) / steady
                                      if steady else None),
          "decode_row_steps": total}


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

  started = time.perf_counter()
  if todo:
    mesh = sharding.make_mesh(mesh_cfg, jax.local_devices())
    # The engine keeps its own compute-dtype copy; the loaded params are not kept alive.
    engine = core.Engine(cfg, model_cfg, train.load_init_params(
        cfg.init_from, model_cfg, key="config.estep.init_from"), tokenizer, mesh,
        mesh_cfg.rules_list)
    total = sum(len(chunking.chunk_document(t, cfg.chunking))
                - chunking.context_chunks(t, cfg.chunking) for s, ds in
                shard_docs(iter_documents(files, cfg, sources.InputStats()), cfg.docs_per_shard)
                if s in todo for _, t in ds)
    progress = _Progress(total, jax.process_index() == 0)
    shards = ((s, docs) for s, docs in shard_docs(iter_documents(files, cfg, stats),
                                                   cfg.docs_per_shard) if s in todo)
    for shard, recs in process_shards(engine, shards, cfg, progress):
      records.write_shard(recs, paths[shard])
    progress.close()
    add_decode_stats(decode_stats_path(out_dir, jax.process_index()), engine.sampler.stats.as_dict())
    logging.info("estep decoding: %s", engine.sampler.stats.as_dict())
  wall = time.perf_counter() - started
  runtime.sync("estep_done")
  missing = [p for p in paths if not os.path.exists(p)]
  summary = {"shards": n_shards, "missing_shards": len(missing), "wall_s_this_run": wall,
             "input": stats.summary(), "num_samples": cfg.num_samples,
             "selection": cfg.selection}
  if not missing:
    summary.update(summarize(paths, cfg.elbo_ks))
    summary.update(slot_utilization(out_dir))
    summary["records"] = os.path.join(out_dir, RECORD_PREFIX + "-*-of-*.tfrecord")
    if jax.process_index() == 0:
      io_utils.write_json(os.path.join(out_dir, "summary.json"), summary)
      logging.info("estep summary: %s", summary)
  return summary
