"""seqio Tasks over thought-augmented documents: the M-step's training data (DESIGN.md §2).

A thought task reads DocRecord shards (records.py) and lays each document out in one of the
formats.DocFormat layouts; the text then goes through the raw-text preprocessing of tasks.py
(tokenize, append EOS, split into pieces of at most seq_len tokens). BOS is added by the feature
converter (pipeline.py).

Randomness is a function of (document id, epoch, seed) only, through a stable hash (blake2b),
never Python's hash() or tf.random: the same document gets the same layout in every run, on
every host, whatever the shuffling. `coin_flips` picks prior (True) or posterior form per chunk;
`use_raw` picks the documents sent through as raw text (`mix_in_raw_ratio`).

Epochs. pipeline.get_dataset repeats a task with seqio's `num_epochs`, and seqio applies the
repeat *inside* Task.get_dataset: after the source, before the preprocessors (a task with no
CacheDatasetPlaceholder runs all of them after the repeat). The source therefore numbers the
records of each pass (`position`, 0 for the first record this host reads in a pass); the first
preprocessor scans the repeated stream and increments the epoch at every position 0. The epoch
is thus "the number of completed passes over this host's share of the split", counted from 0;
it restarts at 0 whenever a dataset is built, so resuming by skipping batches
(BatchIterator) replays the same epochs. The layout step is a tf.numpy_function that calls
`layout_document`, so the TF path and the Python reference are the same code.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from latent_em import config_lib
from latent_em import formats
from latent_em.data import records
from latent_em.data import tasks

_FORMATS = tuple(f.value for f in formats.DocFormat)


@dataclasses.dataclass(frozen=True)
class ThoughtDataConfig:
  """`config.mstep_data`: thought-augmented training data and its layout.

  `record_files` (records.py shards, globs allowed) are trained on in `format`; when
  config.data.train_files is also set, the two are mixed with `thought_rate` : 1 - thought_rate
  (rates of examples).
  """
  record_files: tuple[str, ...] = ()
  thought_rate: float = 1.0
  format: str = "random"            # a formats.DocFormat value
  mix_in_raw_ratio: float = 0.0     # fraction of documents sent through as raw text
  seed: int = 0                     # seeds coin flips and raw-document choice (not shuffling)
  drop_thoughtless_chunks: bool = False  # False: a chunk whose thought is None stays raw text
  # Probability of the prior form per chunk in the `random` format (DESIGN.md §2: 1/2). After
  # `SoL` the model pays -log p(PRIOR) for the form when an ELBO scores `SoL PRIOR z EoL X`.
  prior_rate: float = 0.5
  # True: a chunk whose thought is None gets the empty thought (`SoL PRIOR EoL x`), so a
  # teacher's "nothing to think here" is learned as such, as the E-step writes it.
  empty_thoughts: bool = False

  def __post_init__(self):
    config_lib.check(self.format in _FORMATS, "config.mstep_data.format",
                     f"{self.format!r} is not one of {list(_FORMATS)}")
    config_lib.check(0.0 < self.thought_rate <= 1.0, "config.mstep_data.thought_rate",
                     f"{self.thought_rate} must be in (0, 1]")
    config_lib.check(0.0 <= self.mix_in_raw_ratio <= 1.0, "config.mstep_data.mix_in_raw_ratio",
                     f"{self.mix_in_raw_ratio} must be in [0, 1]")
    config_lib.check(0.0 <= self.prior_rate <= 1.0, "config.mstep_data.prior_rate",
                     f"{self.prior_rate} must be in [0, 1]")
    config_lib.check(not (self.empty_thoughts and self.drop_thoughtless_chunks),
                     "config.mstep_data.empty_thoughts",
                     "empty_thoughts and drop_thoughtless_chunks exclude each other: set one")

  def chunk_options(self) -> dict[str, Any]:
    """How `layout_document` lays out each chunk: its keyword arguments this config sets, except
    the per-document `mix_in_raw_ratio` (token counts are of the thought layout itself)."""
    return {"drop_thoughtless_chunks": self.drop_thoughtless_chunks,
            "prior_rate": self.prior_rate, "empty_thoughts": self.empty_thoughts}

  def layout_options(self) -> dict[str, Any]:
    """Every keyword argument of `layout_document` (and `lay_out`) this config sets."""
    return {"mix_in_raw_ratio": self.mix_in_raw_ratio, **self.chunk_options()}


# ---------------------------------------------------------------------------------------------
# Deterministic choices and the Python reference layout.


def _unit(kind: str, doc_id: str, epoch: int, seed: int, index: int) -> float:
  """A uniform number in [0, 1) from blake2b("{kind}\\0{seed}\\0{epoch}\\0{index}\\0{doc_id}")."""
  key = f"{kind}\0{int(seed)}\0{int(epoch)}\0{int(index)}\0{doc_id}".encode("utf-8")
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64


def coin_flips(doc_id: str, n_chunks: int, epoch: int, seed: int,
               prior_rate: float = 0.5) -> list[bool]:
  """Per-chunk form for DocFormat.RANDOM: True = prior form, each with probability `prior_rate`.

  Chunk i's flip depends only on (doc_id, epoch, seed, i), so it does not change with the
  number of chunks, and flips are independent across chunks, epochs and seeds.
  """
  return [_unit("flip", doc_id, epoch, seed, i) < prior_rate for i in range(n_chunks)]


def use_raw(doc_id: str, epoch: int, seed: int, ratio: float) -> bool:
  """Whether this document goes through as raw text this epoch (probability `ratio`)."""
  return _unit("raw", doc_id, epoch, seed, 0) < ratio


def layout_document(
    rec: records.DocRecord,
    fmt: formats.DocFormat | str,
    *,
    epoch: int,
    seed: int,
    mix_in_raw_ratio: float = 0.0,
    drop_thoughtless_chunks: bool = False,
    prior_rate: float = 0.5,
    empty_thoughts: bool = False,
) -> str:
  """The text a thought task trains on for one record in one epoch (no BOS/EOS).

  RAW, and documents picked by `use_raw`, give `rec.text`; PURE gives the record's thoughts
  joined; the other formats lay out each chunk's suffix with its thought (formats.document). A
  chunk without a thought stays raw text, is left out with `drop_thoughtless_chunks`, or gets
  the empty thought with `empty_thoughts`. RANDOM takes the prior form with probability
  `prior_rate`. An empty result (e.g. PURE with no thoughts) is not trained on.
  """
  fmt = formats.DocFormat(fmt)
  if fmt == formats.DocFormat.RAW or (
      mix_in_raw_ratio > 0 and use_raw(rec.doc_id, epoch, seed, mix_in_raw_ratio)):
    return rec.text
  chunks = [c.suffix for c in rec.chunks]
  thoughts = [c.thought for c in rec.chunks]
  if empty_thoughts and fmt != formats.DocFormat.PURE:
    thoughts = ["" if t is None else t for t in thoughts]
  # Flips are drawn for every chunk position, so dropping a chunk does not shift the others'.
  flips = coin_flips(rec.doc_id, len(chunks), epoch, seed, prior_rate)
  if drop_thoughtless_chunks:
    keep = [t is not None for t in thoughts]
    chunks, thoughts, flips = ([v for v, k in zip(seq, keep) if k]
                               for seq in (chunks, thoughts, flips))
  return formats.document(chunks, thoughts, fmt,
                          flips if fmt == formats.DocFormat.RANDOM else None)


# ---------------------------------------------------------------------------------------------
# The seqio source and task.


def _expand_record_files(specs: str | Sequence[str], key: str) -> list[str]:
  """Paths / globs -> DocRecord shard paths; errors name `key`."""
  specs = [specs] if isinstance(specs, str) else list(specs)
  try:
    # records' expansion also stops when a glob misses a shard of an -i-of-n set.
    paths = records.expand_paths(specs)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{key}: {e}") from None
  for path in paths:
    if ".tfrecord" not in path.rsplit("/", 1)[-1]:
      raise ValueError(
          f"{key}: {path!r} is not a DocRecord TFRecord shard (*.tfrecord); convert JSONL "
          f"with latent_em.data.records.from_jsonl(jsonl, out_prefix, num_shards)")
  return paths


class ThoughtRecordSource(seqio.DataSource):
  """Streams serialized DocRecords as {"record", "file", "index", "position"}.

  record: tf.string [] (a serialized tf.train.Example); file: tf.string [] its shard; index:
  tf.int64 [] its index in that file; position: tf.int64 [], the record's rank in this pass
  over this host's share (0 starts a pass; the epoch counter relies on it).

  Sharding (`shard_info`): with at least as many files as shards each host reads whole files
  (file i goes to host i % num_shards); otherwise every host reads every file and keeps the
  records whose index in their file % num_shards is its own (independent of file order).
  """

  def __init__(self, split_files: Mapping[str, Sequence[str]]):
    self._files = {k: list(v) for k, v in split_files.items()}
    super().__init__(splits=tuple(self._files), caching_permitted=False)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return self._files[split]

  def get_dataset(
      self,
      split: str = "train",
      shuffle: bool = True,
      seed: Optional[int] = None,
      shard_info: Optional[seqio.ShardInfo] = None,
      *,
      sequence_length: Optional[Mapping[str, int]] = None,  # unused
      use_cached: bool = False,  # unused
      num_epochs: Optional[int] = 1,  # unused: the task repeats the source
  ) -> tf.data.Dataset:
    if split not in self._files:
      raise ValueError(f"split {split!r} has no record files; known splits: {list(self._files)}")
    files, files_ds, rec_index, rec_num = tasks.shard_files(self._files[split], shard_info,
                                                            shuffle, seed)

    def read_file(path):
      ds = tf.data.TFRecordDataset(path).enumerate().shard(rec_num, rec_index)
      return ds.map(lambda i, r: {"record": r, "file": path, "index": i})

    ds = files_ds.interleave(read_file, cycle_length=min(len(files), 8), block_length=1,
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.enumerate().map(lambda pos, ex: dict(ex, position=pos))


def count_epochs(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Adds "epoch" (tf.int64 []): 0 for the first pass, +1 at each record with position 0."""
  def step(epoch, ex):
    epoch = epoch + tf.cast(tf.equal(ex["position"], 0), tf.int64)
    return epoch, {"record": ex["record"], "file": ex["file"], "index": ex["index"],
                   "epoch": epoch}
  return dataset.scan(tf.constant(-1, tf.int64), step)


def lay_out(dataset: tf.data.Dataset, *, fmt: str, seed: int,
            **options: Any) -> tf.data.Dataset:
  """{"record", "file", "index", "epoch"} -> {"targets": tf.string []}; empty layouts dropped.

  `options`: the layout keyword arguments of `layout_document` (ThoughtDataConfig.layout_options).
  """
  def text(serialized: bytes, file: bytes, index: np.int64, epoch: np.int64) -> bytes:
    rec = records.from_example(serialized, f"{file.decode()}: record {int(index)}")
    return layout_document(rec, fmt, epoch=int(epoch), seed=seed, **options).encode("utf-8")

  def to_text(ex):
    out = tf.numpy_function(text, [ex["record"], ex["file"], ex["index"], ex["epoch"]],
                            Tout=tf.string, stateful=False)
    return {"targets": tf.ensure_shape(out, [])}

  dataset = dataset.map(to_text, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.filter(lambda ex: tf.strings.length(ex["targets"]) > 0)


def register_thought_task(
    name: str,
    record_files: Mapping[str, Sequence[str]],
    vocabulary: seqio.Vocabulary,
    *,
    fmt: formats.DocFormat | str = "random",
    mix_in_raw_ratio: float = 0.0,
    seed: int = 0,
    drop_thoughtless_chunks: bool = False,
    prior_rate: float = 0.5,
    empty_thoughts: bool = False,
    shuffle_buffer_size: int = 10000,
    config_keys: Optional[Mapping[str, str]] = None,
) -> seqio.Task:
  """Registers (replacing any task of that name) a seqio Task over DocRecord shards.

  Args:
    name: the seqio task name.
    record_files: split -> DocRecord TFRecord paths / globs (a glob over `-i-of-n` shards must
      find all n). Splits with no entries are left out.
    vocabulary: `Tokenizer.vocabulary` (encodes each latent token as one id); its EOS ends
      every document.
    fmt, mix_in_raw_ratio, seed, drop_thoughtless_chunks, prior_rate, empty_thoughts: see
      ThoughtDataConfig and `layout_document`.
    shuffle_buffer_size: the example shuffle buffer used when the task is shuffled.
    config_keys: split -> the config key its files came from, used in error messages.

  Returns:
    The task. Output feature "targets": int32 token ids [n <= seq_len], the tokens of
    `layout_document(rec, fmt, epoch=e, ...)` followed by EOS, split into consecutive pieces
    of seq_len tokens when longer (seq_len = the task feature length given at get_dataset).
  """
  fmt = fmt.value if isinstance(fmt, formats.DocFormat) else fmt
  if fmt not in _FORMATS:
    raise ValueError(f"thought task {name!r}: format {fmt!r} is not one of {list(_FORMATS)} "
                     f"(config.mstep_data.format)")
  cfg = ThoughtDataConfig(format=fmt,
                          mix_in_raw_ratio=float(mix_in_raw_ratio), seed=int(seed),
                          drop_thoughtless_chunks=bool(drop_thoughtless_chunks),
                          prior_rate=float(prior_rate), empty_thoughts=bool(empty_thoughts))
  config_keys = dict(config_keys or {})
  split_files = {split: _expand_record_files(specs, config_keys.get(split, f"files[{split!r}]"))
                 for split, specs in record_files.items() if specs}
  if not split_files:
    keys = ", ".join(config_keys.get(s, f"record_files[{s!r}]") for s in record_files)
    raise ValueError(f"thought task {name!r} has no record files: set {keys or 'record_files'}")
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=ThoughtRecordSource(split_files),
      preprocessors=[
          count_epochs,
          functools.partial(lay_out, fmt=cfg.format, seed=cfg.seed, **cfg.layout_options()),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          seqio.preprocessors.append_eos,
          tasks.split_to_sequence_length,
      ],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
      shuffle_buffer_size=shuffle_buffer_size,
  )


def register_from_config(name: str, cfg: ThoughtDataConfig,
                         record_files: Mapping[str, Sequence[str]],
                         vocabulary: seqio.Vocabulary, **kwargs) -> seqio.Task:
  """register_thought_task with the layout settings of `config.mstep_data`."""
  return register_thought_task(name, record_files, vocabulary, fmt=cfg.format, seed=cfg.seed,
                               **cfg.layout_options(), **kwargs)


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> seqio.Mixture:
  """Registers (replacing any mixture of that name) a mixture sampling tasks by rate.

  Rates are relative numbers of *examples* (documents, or pieces of split documents).
  """
  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if not tasks_and_rates:
    raise ValueError(f"mixture {name!r}: give at least one (task name, rate) pair")
  for task_name, rate in tasks_and_rates:
    if task_name not in known:
      raise ValueError(f"mixture {name!r}: no registered task or mixture {task_name!r}; "
                       f"register it first (register_thought_task / tasks.register_raw_task)")
    if not rate > 0:
      raise ValueError(f"mixture {name!r}: rate {rate!r} of {task_name!r} must be > 0")
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks_and_rates])


# ---------------------------------------------------------------------------------------------
# Token accounting.


def thought_token_stats(record_files: str | Sequence[str], tokenizer, *, seed: int = 0,
                        epoch: int = 0, **options: Any) -> dict:
  """Token counts of a record set, for deriving token budgets (one pass, Python tokenizer).

  Args:
    record_files: DocRecord TFRecord paths / globs.
    tokenizer: a latent_em.tokenizer.Tokenizer.
    seed, epoch: the coin flips used for the "random" count.
    options: the per-chunk layout keyword arguments of layout_document
      (ThoughtDataConfig.chunk_options: drop_thoughtless_chunks, prior_rate, empty_thoughts).

  Returns:
    {"documents", "chunks", "chunks_with_thought": counts,
     "raw_tokens": tokens of the documents' text (no EOS),
     "thought_tokens": tokens of all thoughts (no latent tokens),
     "total_tokens": {format: training tokens of one epoch, EOS included}} where the last
    equals pipeline.count_tokens of a thought task with that format (and seed, at epoch 0);
    mix_in_raw_ratio r gives about (1 - r) * total_tokens[fmt] + r * total_tokens["raw"].
  """
  paths = _expand_record_files(record_files, "record_files")
  stats = {"documents": 0, "chunks": 0, "chunks_with_thought": 0, "raw_tokens": 0,
           "thought_tokens": 0}
  totals = {f: 0 for f in _FORMATS}
  for rec in records.read_records(paths):
    stats["documents"] += 1
    stats["chunks"] += len(rec.chunks)
    stats["raw_tokens"] += len(tokenizer.encode(rec.text))
    for c in rec.chunks:
      if c.thought is not None:
        stats["chunks_with_thought"] += 1
        stats["thought_tokens"] += len(tokenizer.encode(c.thought))
    for f in _FORMATS:
      text = layout_document(rec, f, epoch=epoch, seed=seed, **options)
      if text:
        totals[f] += len(tokenizer.encode(text)) + 1  # + EOS
  stats["total_tokens"] = totals
  return stats
