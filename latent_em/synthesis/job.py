"""`config.job = "synthesize"`: teacher thoughts (or WRAP paraphrases) for every chunk of a corpus.

Reads the raw documents of `config.synthesis.input_files`, cuts each into chunks (DESIGN.md §3,
prefix = the one previous chunk for teacher prompts), asks the backend for one text per chunk and
writes one DocRecord per document to

  WORKDIR/synthesis/shard-XXXXX-of-YYYYY.tfrecord   (records.write_shard, atomic)
  WORKDIR/synthesis/stats/shard-XXXXX-of-YYYYY.json (that shard's counts)
  WORKDIR/synthesis/plan.json                       (what produced the shards)
  WORKDIR/synthesis/summary.json                    (this run's summary, atomic)
  WORKDIR/synthesis/cache/                          (request cache, unless cache_dir is set)

Documents go to shards in input order, `docs_per_shard` each (the last ones may hold fewer). A
shard is finished when it and its stats file exist; a rerun skips finished shards and redoes the
others, paying only for requests the cache does not hold. For kind "latent_thoughts" each chunk's
`thought` is the teacher thought and `source` is "teacher"; for the WRAP kinds `thought` is the
paraphrase of the chunk and `source` is "wrap:<style>" (train them with DocFormat.PURE). A chunk
whose request failed has thought=None; a document with such chunks is kept (on_failure="keep")
or left out (on_failure="drop_doc"). To retry failed chunks, delete their shards and rerun.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import sys
import time
from typing import Any, Iterator

from absl import logging

from latent_em import config_lib, io_utils
from latent_em.data import chunking, records, sources
from latent_em.data.chunking import ChunkConfig
from latent_em.synthesis import prompts as prompts_lib
from latent_em.synthesis.backend import Backend, Request, Result
from latent_em.synthesis.cache import CachingBackend, RequestCache

BACKENDS = ("api", "local", "oracle")
ON_FAILURE = ("keep", "drop_doc")


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
  """`config.synthesis`: the teacher, the corpus and the output layout.

  Attributes:
    backend: "api" (an OpenAI-compatible endpoint), "local" (one of our checkpoints through
      latent_em.sampling) or "oracle" (the built-in corpus' rule-based teacher; kinds
      latent_thoughts and wrap_cot only; see oracle_backend.py).
    kind: "latent_thoughts" or a WRAP style (prompts_lib.KINDS).
    base_url / model / api_key_env / transport: the endpoint (see api_backend.ApiBackend).
    max_concurrency / max_retries / timeout_s / backoff_base_s / backoff_max_s: request policy.
    temperature / max_tokens / extra_body: sampling settings, all part of the cache key.
    length_is_failure: a reply cut by max_tokens counts as a failed chunk.
    price_prompt_per_m / price_completion_per_m: USD per million tokens, for the cost report.
    input_files: JSONL / TFRecord paths or globs, or builtin:mathcorpus/<split>.
    text_field / on_bad_input / max_doc_chars: as in config.data (sources.py).
    max_docs: stop after this many good documents (0 = all).
    num_shards: number of output shards; 0 = ceil(documents / docs_per_shard).
    docs_per_shard: documents per shard when num_shards is 0.
    on_failure: "keep" (failed chunks get thought=None) or "drop_doc".
    cache_dir: request cache directory ("" = WORKDIR/synthesis/cache); share it between
      workdirs to reuse paid requests.
    prompts: the prompt templates.
    chunking: how documents are cut (prefix_chunks = 1 for teacher prompts). A section given as
      a partial dict takes ChunkConfig's own defaults for the keys it leaves out, so set
      prefix_chunks explicitly there.
  """
  backend: str = "api"
  kind: str = "latent_thoughts"
  base_url: str = "https://api.openai.com/v1"
  model: str = ""
  api_key_env: str = "OPENAI_API_KEY"
  transport: str = "auto"
  max_concurrency: int = 8
  max_retries: int = 6
  timeout_s: float = 60.0
  backoff_base_s: float = 1.0
  backoff_max_s: float = 60.0
  temperature: float = 0.7
  max_tokens: int = 1024
  extra_body: dict = dataclasses.field(default_factory=dict)
  length_is_failure: bool = True
  price_prompt_per_m: float = 0.0
  price_completion_per_m: float = 0.0
  input_files: tuple[str, ...] = ()
  text_field: str = "text"
  on_bad_input: str = "skip"
  max_doc_chars: int = 0
  max_docs: int = 0
  num_shards: int = 0
  docs_per_shard: int = 1000
  on_failure: str = "keep"
  cache_dir: str = ""
  prompts: prompts_lib.PromptConfig = dataclasses.field(default_factory=prompts_lib.PromptConfig)
  chunking: ChunkConfig = dataclasses.field(
      default_factory=lambda: ChunkConfig(prefix_chunks=1))

  def __post_init__(self):
    key = "config.synthesis"
    config_lib.check(self.backend in BACKENDS, f"{key}.backend",
                     f"{self.backend!r} is not one of {list(BACKENDS)}")
    config_lib.check(self.kind in prompts_lib.KINDS, f"{key}.kind",
                     f"{self.kind!r} is not one of {list(prompts_lib.KINDS)}")
    config_lib.check(self.on_bad_input in sources.POLICIES, f"{key}.on_bad_input",
                     f"{self.on_bad_input!r} is not one of {list(sources.POLICIES)}")
    config_lib.check(self.on_failure in ON_FAILURE, f"{key}.on_failure",
                     f"{self.on_failure!r} is not one of {list(ON_FAILURE)}")
    for name in ("max_concurrency", "docs_per_shard", "max_tokens"):
      config_lib.check(getattr(self, name) >= 1, f"{key}.{name}",
                       f"must be >= 1, got {getattr(self, name)}")
    for name in ("max_retries", "num_shards", "max_docs", "max_doc_chars"):
      config_lib.check(getattr(self, name) >= 0, f"{key}.{name}",
                       f"must be >= 0, got {getattr(self, name)}")
    for name in ("timeout_s", "backoff_base_s", "backoff_max_s", "temperature",
                 "price_prompt_per_m", "price_completion_per_m"):
      config_lib.check(getattr(self, name) >= 0, f"{key}.{name}",
                       f"must be >= 0, got {getattr(self, name)}")
    config_lib.check(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
    config_lib.check(bool(self.text_field), f"{key}.text_field", "must not be empty")


def synthesis_config(config: Any) -> SynthesisConfig:
  """config.synthesis as a SynthesisConfig (accepts the whole config or the dataclass)."""
  if isinstance(config, SynthesisConfig):
    return config
  return config_lib.from_config(SynthesisConfig, config.get("synthesis", {}), "config.synthesis")


def make_backend(cfg: SynthesisConfig, config: Any = None) -> Backend:
  """The uncached backend named by config.synthesis.backend.

  For "local", config.synthesis.model is the checkpoint (a finished train workdir or a params
  dir) and config.model / config.tokenizer describe it.
  """
  if cfg.backend == "oracle":
    from latent_em.synthesis.oracle_backend import OracleBackend  # pylint: disable=g-import-not-at-top
    return OracleBackend(cfg.kind)
  if cfg.backend == "local":
    from latent_em import runtime, train  # pylint: disable=g-import-not-at-top
    from latent_em.estep.job import tokenizer_for  # pylint: disable=g-import-not-at-top
    from latent_em.synthesis.local_backend import LocalBackend  # pylint: disable=g-import-not-at-top
    if config is None or not cfg.model:
      raise config_lib.ConfigError("config.synthesis.backend='local' needs config.synthesis.model "
                                   "= a finished train workdir or params checkpoint")
    tok = tokenizer_for(config, cfg.model, "config.synthesis.model")
    model_cfg = runtime.model_config(config, tok)
    params = train.load_init_params(cfg.model, model_cfg, key="config.synthesis.model")
    return LocalBackend(model_cfg, params, tok, checkpoint=cfg.model,
                        temperature=cfg.temperature, max_tokens=cfg.max_tokens)
  from latent_em.synthesis import api_backend  # pylint: disable=g-import-not-at-top
  return api_backend.ApiBackend(
      cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
      max_concurrency=cfg.max_concurrency, max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
      temperature=cfg.temperature, max_tokens=cfg.max_tokens,
      length_is_failure=cfg.length_is_failure, backoff_base_s=cfg.backoff_base_s,
      backoff_max_s=cfg.backoff_max_s, extra_body=cfg.extra_body, transport=cfg.transport)


# --------------------------------------------------------------------------------- input


def _input_files(config: Any, cfg: SynthesisConfig, workdir: str) -> list[str]:
  key = "config.synthesis.input_files"
  if not cfg.input_files:
    raise config_lib.ConfigError(f"{key} is empty; list the JSONL/TFRecord files to synthesize "
                                 f"for (paths or globs, or builtin:mathcorpus/<split>)")
  out = []
  for i, spec in enumerate(cfg.input_files):
    if spec.startswith("tfds:"):
      raise config_lib.ConfigError(f"{key}[{i}]={spec!r}: TFDS input is not supported here; "
                                   f"export the split to JSONL and list that file")
    if spec.startswith("builtin:"):
      from latent_em import runtime  # pylint: disable=g-import-not-at-top  (imports jax)
      if isinstance(config, SynthesisConfig):
        raise config_lib.ConfigError(f"{key}[{i}]={spec!r} needs the whole config (pass "
                                     f"`config`, not config.synthesis, to run())")
      out.extend(runtime.resolve_files(config, (spec,), workdir, f"{key}[{i}]"))
    else:
      out.extend(sources.expand_files([spec], key))
  return out


def _read_docs(files: list[str], cfg: SynthesisConfig,
               stats: sources.InputStats) -> Iterator[tuple[str, str]]:
  docs = sources.read_docs(files, cfg.text_field, cfg.on_bad_input, stats,
                           max_doc_chars=cfg.max_doc_chars)
  return itertools.islice(docs, cfg.max_docs) if cfg.max_docs else docs


# --------------------------------------------------------------------------------- plan


def _fingerprint(cfg: SynthesisConfig, identity: dict, files: list[str], num_docs: int,
                 num_shards: int, docs_per_shard: int) -> dict[str, Any]:
  """Everything that decides the content of the shards (not concurrency, retries or prices)."""
  return {
      "kind": cfg.kind, "backend": identity, "prompts": dataclasses.asdict(cfg.prompts),
      "chunking": dataclasses.asdict(cfg.chunking),
      "inputs": [[f, os.path.getsize(f) if os.path.exists(f) else -1] for f in files],
      "text_field": cfg.text_field, "on_bad_input": cfg.on_bad_input,
      "max_doc_chars": cfg.max_doc_chars, "max_docs": cfg.max_docs,
      "length_is_failure": cfg.length_is_failure, "on_failure": cfg.on_failure,
      "num_docs": num_docs, "num_shards": num_shards, "docs_per_shard": docs_per_shard,
  }


def _check_plan(out_dir: str, plan: dict[str, Any]) -> None:
  """Refuses to mix shards made with other settings; records the plan otherwise."""
  path = os.path.join(out_dir, "plan.json")
  have_shards = any(name.startswith("shard-") for name in os.listdir(out_dir))
  if have_shards and os.path.exists(path):
    old = io_utils.read_json(path)
    changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    if changed:
      raise config_lib.ConfigError(
          f"{out_dir} holds shards made with other settings (changed: {', '.join(changed)}); "
          f"use a fresh workdir, or delete {out_dir}/shard-* to regenerate them (the request "
          f"cache keeps every paid reply)")
  io_utils.write_json(path, plan)


# --------------------------------------------------------------------------------- shards


def _shard_requests(docs: list[tuple[str, str]], cfg: SynthesisConfig):
  """(per-document chunk pairs, flat request list) for one shard."""
  pairs_per_doc, requests = [], []
  for doc_id, text in docs:
    chunks = chunking.chunk_document(text, cfg.chunking)
    pairs = chunking.chunk_pairs(chunks, prefix_chunks=cfg.chunking.prefix_chunks)
    pairs_per_doc.append(pairs)
    for pair in pairs:
      messages = prompts_lib.build_messages(cfg.kind, pair.prefix, pair.suffix, cfg.prompts)
      context = {"kind": cfg.kind, "document_prefix": "".join(chunks[:pair.index]),
                 "suffix": pair.suffix}
      requests.append(Request(tuple(messages), tag=f"{doc_id}#chunk{pair.index}",
                              context=context))
  return pairs_per_doc, requests


def _shard_records(docs, pairs_per_doc, results: list[Result], cfg: SynthesisConfig,
                   model: str) -> tuple[list[records.DocRecord], dict[str, Any]]:
  source = prompts_lib.source_tag(cfg.kind)
  counts = collections.Counter()
  failed_kinds = collections.Counter()
  out = []
  pos = 0
  for (doc_id, text), pairs in zip(docs, pairs_per_doc):
    chunk_records = []
    failed = 0
    for pair, result in zip(pairs, results[pos:pos + len(pairs)]):
      if not result.ok:
        failed += 1
        failed_kinds[result.error] += 1
      chunk_records.append(records.ChunkRecord(
          prefix=pair.prefix, suffix=pair.suffix, thought=result.text if result.ok else None,
          ended=result.ok and result.finish_reason != "length", source=source))
    pos += len(pairs)
    counts["docs"] += 1
    counts["chunks"] += len(pairs)
    counts["chunks_failed"] += failed
    counts["docs_with_failures"] += bool(failed)
    if failed and cfg.on_failure == "drop_doc":
      counts["docs_dropped"] += 1
      continue
    counts["docs_written"] += 1
    counts["chunks_with_thought"] += sum(1 for c in chunk_records if c.thought is not None)
    meta = {"synthesis": {"kind": cfg.kind, "model": model, "failed_chunks": failed}}
    out.append(records.DocRecord(doc_id=doc_id, text=text, chunks=chunk_records, meta=meta))
  stats = {k: counts[k] for k in _DOC_COUNTS}
  stats["failed_chunks_by_kind"] = dict(sorted(failed_kinds.items()))
  return out, stats


_DOC_COUNTS = ("docs", "docs_written", "docs_with_failures", "docs_dropped", "chunks",
               "chunks_with_thought", "chunks_failed")


# --------------------------------------------------------------------------------- job


def run(config: Any, workdir: str, backend: Backend | None = None) -> dict[str, Any]:
  """Runs the synthesis job; returns the summary (also written to WORKDIR/synthesis/summary.json).

  Under multi-process JAX only process 0 works (the others return {}), so that no request is
  sent, and paid for, twice.

  Args:
    config: the experiment config (uses config.synthesis), or a SynthesisConfig.
    workdir: the run directory.
    backend: an uncached backend to use instead of the one config.synthesis names (tests,
      notebooks); it is wrapped with the request cache all the same.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  start = time.time()
  cfg = synthesis_config(config)
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_count() > 1 and jax.process_index() != 0:
    # Every host would send (and pay for) the same requests: process 0 does the work alone.
    logging.info("synthesis runs on process 0 only; process %d has nothing to do",
                 jax.process_index())
    return {}
  out_dir = os.path.join(workdir, "synthesis")
  os.makedirs(os.path.join(out_dir, "stats"), exist_ok=True)
  files = _input_files(config, cfg, workdir)

  # A counting pass sizes the shards (and stops on bad input under "fail" before any spend).
  num_docs = sum(1 for _ in _read_docs(files, cfg, sources.InputStats()))
  if num_docs == 0:
    raise ValueError(f"config.synthesis.input_files={list(cfg.input_files)} hold no usable "
                     f"document (field {cfg.text_field!r}); see the warnings above")
  num_shards = cfg.num_shards or math.ceil(num_docs / cfg.docs_per_shard)
  per_shard = math.ceil(num_docs / num_shards)

  inner = backend if backend is not None else make_backend(cfg, config)
  if getattr(inner, "cacheable", True):
    cached = CachingBackend(inner, RequestCache(cfg.cache_dir or os.path.join(out_dir, "cache")))
  else:  # a free, deterministic backend: one cache file per chunk would only cost time
    cached = inner
  identity = cached.identity()
  _check_plan(out_dir, _fingerprint(cfg, identity, files, num_docs, num_shards, per_shard))
  model = str(identity.get("model", ""))

  input_stats = sources.InputStats()
  docs_iter = _read_docs(files, cfg, input_stats)
  paths = records.shard_paths(os.path.join(out_dir, "shard"), num_shards)
  written = skipped = chunks_this_run = 0
  bar = tqdm(total=0, unit="chunk", desc=f"synthesize {cfg.kind}", dynamic_ncols=True)
  try:
    for path in paths:
      docs = list(itertools.islice(docs_iter, per_shard))
      stats_path = os.path.join(out_dir, "stats", os.path.basename(path)[:-len(".tfrecord")]
                                + ".json")
      if os.path.exists(path) and os.path.exists(stats_path):
        skipped += 1
        continue
      pairs_per_doc, requests = _shard_requests(docs, cfg)
      bar.total += len(requests)
      bar.refresh()

      def progress(i: int, result: Result) -> None:
        del i, result
        bar.update(1)
        if bar.n % 25 == 0:
          s = cached.stats
          bar.set_postfix(cached=s.cache_hits, failed=sum(s.failures.values()), refresh=False)

      results = cached.generate(requests, on_result=progress)
      recs, shard_stats = _shard_records(docs, pairs_per_doc, results, cfg, model)
      # Stats first, then the shard: the shard's rename is the commit point.
      io_utils.write_json(stats_path, shard_stats)
      records.write_shard(recs, path)
      written += 1
      chunks_this_run += len(requests)
      logging.info("wrote %s: %d docs, %d chunks, %d failed chunks", path,
                   shard_stats["docs_written"], shard_stats["chunks"],
                   shard_stats["chunks_failed"])
  finally:
    bar.close()
    close = getattr(inner, "close", None)
    if backend is None and close is not None:  # a caller's backend stays open for reuse
      close()

  summary = _summary(cfg, out_dir, paths, identity, cached, input_stats, written, skipped,
                     chunks_this_run, time.time() - start)
  io_utils.write_json(os.path.join(out_dir, "summary.json"), summary)
  api = summary["api"]
  logging.info("synthesis: %d docs, %d chunks (%d failed); %d requests, %d cache hits, "
               "%d retries, %d tokens, ~$%.4f", summary["docs"], summary["chunks"],
               summary["chunks_failed"], api["requests_sent"], api["cache_hits"],
               api["retries"], api["prompt_tokens"] + api["completion_tokens"],
               api["cost_usd"])
  return summary


def _summary(cfg, out_dir, paths, identity, cached, input_stats, written, skipped,
             chunks_this_run, wall_s) -> dict[str, Any]:
  """Dataset counts over every shard (from their stats files) plus this run's API usage."""
  totals = collections.Counter()
  failed_kinds = collections.Counter()
  for path in paths:
    stats = io_utils.read_json(os.path.join(
        out_dir, "stats", os.path.basename(path)[:-len(".tfrecord")] + ".json"))
    totals.update({k: stats[k] for k in _DOC_COUNTS})
    failed_kinds.update(stats["failed_chunks_by_kind"])
  out: dict[str, Any] = {
      "kind": cfg.kind, "source": prompts_lib.source_tag(cfg.kind), "backend": identity,
      "transport": getattr(getattr(getattr(cached, "inner", cached), "transport", None), "name",
                           None),
      "num_shards": len(paths), "shards_written": written, "shards_skipped": skipped,
      "shard_pattern": os.path.join(out_dir, f"shard-*-of-{len(paths):05d}.tfrecord"),
  }
  out.update({k: totals[k] for k in _DOC_COUNTS})
  out["failed_chunks_by_kind"] = dict(sorted(failed_kinds.items()))
  out["api"] = cached.stats.summary(cfg.price_prompt_per_m, cfg.price_completion_per_m)
  out["wall_time_s"] = round(wall_s, 3)
  out["chunks_this_run"] = chunks_this_run
  out["chunks_per_s"] = round(chunks_this_run / wall_s, 3) if wall_s > 0 else 0.0
  out["input"] = input_stats.summary()
  return out


def register(jobs: dict) -> None:
  """Adds this job to a name -> run(config, workdir) table (latent_em.jobs.JOBS)."""
  jobs["synthesize"] = run
