"""seqio Tasks over raw text: validated documents -> token ids ending with EOS.

A raw task reads its splits through `TextSource`, which applies the bad-input policy of
sources.py, then: rekey the text to "targets", tokenize, append EOS, and split token sequences
longer than the context into consecutive pieces of `seq_len` tokens (seqio would otherwise
truncate them, silently dropping the rest of the document). BOS is added later by the feature
converter (pipeline.py), once per packed segment.

Per-host sharding (`shard_info`) is handled by the source: with at least as many files as
shards each host reads whole files (file i goes to host i % num_shards); otherwise every host
reads every file and keeps records whose index % num_shards is its own.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from latent_em.data import sources

_TEXT = "text"  # the source's single output key, whatever config.data.text_field is


def shard_files(files: Sequence[str], shard_info: Optional[seqio.ShardInfo], shuffle: bool,
                seed: Optional[int]) -> tuple[list[str], tf.data.Dataset, int, int]:
  """This host's share of `files`: whole files when there are at least as many files as hosts,
  else every file and records whose index % num_shards == shard index.

  Returns (files, a dataset of their paths, shuffled if asked, record shard index, record
  shard count).
  """
  files = list(files)
  index, num = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
  rec_index, rec_num = 0, 1
  if num > 1:
    if len(files) >= num:
      files = files[index::num]
    else:
      rec_index, rec_num = index, num
  files_ds = tf.data.Dataset.from_tensor_slices(files)
  if shuffle:
    files_ds = files_ds.shuffle(len(files), seed=seed)
  return files, files_ds, rec_index, rec_num


class TextSource(seqio.DataSource):
  """A seqio DataSource streaming validated documents as {"text": tf.string}.

  Each split is either a list of JSONL / TFRecord files (read by a Python generator, so that
  every record goes through sources.py's checks) or exactly one `tfds:NAME:SPLIT` spec (read by
  seqio.TfdsDataSource, with the same text checks applied in a tf.py_function filter).
  """

  def __init__(
      self,
      split_files: Mapping[str, Sequence[str]],
      *,
      text_field: str = "text",
      policy: str = "skip",
      max_doc_chars: int = 0,
      stats: Optional[sources.InputStats] = None,
      tfds_data_dir: Optional[str] = None,
  ):
    if policy not in sources.POLICIES:
      raise ValueError(
          f"config.data.on_bad_input={policy!r} is not one of {list(sources.POLICIES)}")
    self._files = {k: list(v) for k, v in split_files.items()}
    self._tfds: dict[str, tuple[str, seqio.TfdsDataSource]] = {}
    for split, files in self._files.items():
      if files and sources.file_kind(files[0]) == "tfds":
        name, tfds_split = sources.parse_tfds_spec(files[0])
        self._tfds[split] = (files[0], seqio.TfdsDataSource(
            tfds_name=name, tfds_data_dir=tfds_data_dir, splits={split: tfds_split},
            read_only=True))
    self.text_field = text_field
    self.policy = policy
    self.max_doc_chars = max_doc_chars
    self.stats = stats if stats is not None else sources.InputStats()
    super().__init__(splits=tuple(self._files), caching_permitted=False)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # by file, or by record index when there are fewer files than shards

  def list_shards(self, split: str) -> Sequence[str]:
    if split in self._tfds:
      return self._tfds[split][1].list_shards(split)
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
      num_epochs: Optional[int] = 1,  # unused
  ) -> tf.data.Dataset:
    if split not in self._files:
      raise ValueError(f"split {split!r} has no files; known splits: {list(self._files)}")
    if split in self._tfds:
      return self._tfds_dataset(split, shuffle, seed, shard_info)
    files, files_ds, rec_index, rec_num = shard_files(self._files[split], shard_info, shuffle,
                                                      seed)

    def generate(path):
      for _, text in sources.read_texts(
          path.decode(), self.text_field, self.policy, self.stats,
          max_doc_chars=self.max_doc_chars, shard_index=rec_index, num_shards=rec_num):
        yield text

    def read_file(path):
      return tf.data.Dataset.from_generator(
          generate, args=(path,), output_signature=tf.TensorSpec([], tf.string))

    # Several files are read at once so that a shuffle buffer sees more than one file; the
    # interleave order is deterministic.
    ds = files_ds.interleave(read_file, cycle_length=min(len(files), 8), block_length=1,
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(lambda t: {_TEXT: t})

  def _tfds_dataset(self, split, shuffle, seed, shard_info) -> tf.data.Dataset:
    spec, source = self._tfds[split]
    if shard_info and len(source.list_shards(split)) >= shard_info.num_shards:
      ds = source.get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    else:
      ds = source.get_dataset(split, shuffle=shuffle, seed=seed)
      if shard_info:
        ds = ds.shard(shard_info.num_shards, shard_info.index)
    field_spec = ds.element_spec.get(self.text_field) if isinstance(
        ds.element_spec, dict) else None
    if field_spec is None:
      fields = sorted(ds.element_spec) if isinstance(ds.element_spec, dict) else []
      raise ValueError(f"{spec}: no feature {self.text_field!r} (features: {fields}); set "
                       "config.data.text_field to the feature holding the document text")
    if field_spec.dtype != tf.string or field_spec.shape.rank != 0:
      raise ValueError(f"{spec}: feature {self.text_field!r} is {field_spec}, not a scalar "
                       "string; set config.data.text_field to a text feature")

    def keep(text):
      data = text.numpy()
      where = f"{spec} (document starting {data[:40]!r})"
      return sources.check_text(data, where, self.text_field, self.policy, self.stats,
                                self.max_doc_chars) is not None

    ds = ds.map(lambda ex: ex[self.text_field])
    ds = ds.filter(lambda t: tf.py_function(keep, [t], Tout=tf.bool))
    return ds.map(lambda t: {_TEXT: t})


def split_to_sequence_length(
    dataset: tf.data.Dataset,
    sequence_length: Optional[Mapping[str, int]] = None,
) -> tf.data.Dataset:
  """Splits "targets" [n] into ceil(n / L) consecutive pieces of at most L tokens.

  L = sequence_length["targets"]; with no length the dataset passes through. Each piece later
  gets its own BOS, so the first token of a continuation piece is predicted from BOS alone.
  """
  if not sequence_length or sequence_length.get("targets") is None:
    return dataset
  length = int(sequence_length["targets"])

  def pieces(ex):
    tokens = ex["targets"]
    n = tf.size(tokens)
    starts = tf.range(0, n, length)
    lengths = tf.minimum(length, n - starts)
    ragged = tf.RaggedTensor.from_row_lengths(tokens, lengths)
    return tf.data.Dataset.from_tensor_slices({"targets": ragged})

  return dataset.flat_map(pieces)


def register_raw_task(
    name: str,
    files: Mapping[str, Sequence[str]],
    vocabulary: seqio.Vocabulary,
    *,
    text_field: str = "text",
    policy: str = "skip",
    max_doc_chars: int = 0,
    shuffle_buffer_size: int = 10000,
    tfds_data_dir: Optional[str] = None,
    config_keys: Optional[Mapping[str, str]] = None,
) -> seqio.Task:
  """Registers (replacing any task of that name) a seqio Task over raw documents.

  Args:
    name: the seqio task name.
    files: split -> file paths / globs (JSONL or TFRecord) or a single 'tfds:NAME:SPLIT'.
      Splits with no entries are left out.
    vocabulary: the tokenizer; its eos_id ends every document.
    text_field, policy, max_doc_chars: see sources.InputConfig.
    shuffle_buffer_size: the example shuffle buffer used when the task is shuffled.
    tfds_data_dir: where TFDS datasets are prepared (None = the TFDS default).
    config_keys: split -> the config key its files came from, used in error messages.

  Returns:
    The task. `task.source.stats` (InputStats) counts records over every pass and split read
    through it (log it with `.log()`). Output feature "targets" holds
    int32 token ids [n <= seq_len] ending with EOS (unless a long document was split).
  """
  config_keys = dict(config_keys or {})
  split_files = {}
  for split, specs in files.items():
    key = config_keys.get(split, f"files[{split!r}]")
    if not specs:
      continue
    expanded = sources.expand_files(tuple(specs), key)
    kinds = {sources.file_kind(p) for p in expanded}
    if "tfds" in kinds and len(expanded) > 1:
      raise ValueError(f"{key}: a tfds spec must be the only entry of its split, got {specs}")
    if "tfds" in kinds:
      expanded = [_check_tfds_prepared(expanded[0], tfds_data_dir, key)]
    split_files[split] = expanded
  if not split_files:
    keys = ", ".join(config_keys.get(s, f"files[{s!r}]") for s in files) or "files"
    raise ValueError(f"task {name!r} has no input files: set {keys}")
  source = TextSource(split_files, text_field=text_field, policy=policy,
                      max_doc_chars=max_doc_chars, tfds_data_dir=tfds_data_dir)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={"targets": _TEXT}),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          seqio.preprocessors.append_eos,
          split_to_sequence_length,
      ],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
      shuffle_buffer_size=shuffle_buffer_size,
  )


def register_from_config(name: str, cfg: sources.InputConfig,
                         vocabulary: seqio.Vocabulary,
                         tfds_data_dir: Optional[str] = None) -> seqio.Task:
  """Registers the "train" / "validation" splits named in `config.data`."""
  return register_raw_task(
      name,
      {"train": cfg.train_files, "validation": cfg.validation_files},
      vocabulary,
      text_field=cfg.text_field,
      policy=cfg.on_bad_input,
      max_doc_chars=cfg.max_doc_chars,
      shuffle_buffer_size=cfg.shuffle_buffer,
      tfds_data_dir=tfds_data_dir,
      config_keys={"train": "config.data.train_files",
                   "validation": "config.data.validation_files"},
  )


def _check_tfds_prepared(spec: str, data_dir: Optional[str], key: str) -> str:
  """Checks that a tfds spec's dataset is prepared; returns the spec with its version pinned
  (seqio needs NAME:VERSION, and pinning keeps every host on the same data)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, split = sources.parse_tfds_spec(spec)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception as e:  # pylint: disable=broad-except  (tfds raises several lookup errors)
    raise FileNotFoundError(f"{key}={spec!r}: TFDS cannot find {name!r} ({e})") from None
  if not prepared:
    raise FileNotFoundError(
        f"{key}={spec!r}: TFDS dataset {name!r} is not prepared in {builder.data_dir}; build "
        "it first (e.g. `tfds build`) or point tfds_data_dir at it")
  if ":" not in name:
    name = f"{name}:{builder.version}"
  return f"{sources.TFDS_PREFIX}{name}:{split}"
