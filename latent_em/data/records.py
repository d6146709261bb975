"""Thought-augmented documents on disk: one DocRecord per document, in sharded TFRecord files.

A DocRecord holds a document and its chunks; each chunk carries its (prefix, suffix) pair, the
kept thought and the E-step statistics (DESIGN.md §4.5). Shards are named
`{prefix}-{i:05d}-of-{n:05d}.tfrecord` and written atomically, so a shard either exists whole or
not at all (readers check that every shard of a set is present).

TFRecord schema (one tf.train.Example per document, schema_version 1). C = number of chunks;
per-chunk fields are parallel lists of length C; lists of variable length per chunk are stored
flat with their per-chunk lengths, so `tf.io.RaggedFeature` rebuilds them:

  schema_version       int64  [1]   = 1
  doc_id               bytes  [1]   UTF-8
  text                 bytes  [1]   the raw document, UTF-8
  meta                 bytes  [1]   JSON object, UTF-8
  num_chunks           int64  [1]   C
  chunk/prefix         bytes  [C]
  chunk/suffix         bytes  [C]
  chunk/thought        bytes  [C]   "" where the chunk has no thought (see chunk/has_thought)
  chunk/has_thought    int64  [C]   0 = thought is None
  chunk/log_weights    float  [sum K_c]   K_c log-weights of chunk c, flat
  chunk/num_log_weights int64 [C]   K_c (0 for teacher thoughts)
  chunk/thought_len    int64  [C]   tokens; -1 if unknown
  chunk/ended          int64  [C]   1 if the thought ended with EoL
  chunk/elbo_k         bytes  [sum E_c]   ELBO keys ("1", "2", "4", ...), flat
  chunk/elbo           float  [sum E_c]   ELBO values, flat, parallel to chunk/elbo_k
  chunk/num_elbo       int64  [C]   E_c
  chunk/suffix_tokens  int64  [C]   tokens in the suffix; -1 if unknown
  chunk/cut_tokens     int64  [C]   suffix tokens cut by the overflow policy
  chunk/source         bytes  [C]   "teacher", "estep", "wrap:<style>", ...

Floats are stored as float32 (the only float type tf.train.Example has); read_records returns
the shortest decimal that round-trips through float32, so write -> read -> write is exact.

The JSONL form (to_jsonl / from_jsonl) has one object per line:
  {"doc_id": str, "text": str, "meta": {...}, "chunks": [{"prefix": str, "suffix": str,
   "thought": str | null, "log_weights": [float], "thought_len": int, "ended": bool,
   "elbo": {"1": float, ...}, "suffix_tokens": int, "cut_tokens": int, "source": str}]}
Only doc_id, text, chunks and each chunk's prefix and suffix are required on import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

SCHEMA_VERSION = 1
_SHARD_RE = re.compile(r"^(?P<prefix>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord$")


@dataclasses.dataclass
class ChunkRecord:
  """One chunk of a document with its thought and E-step statistics."""
  prefix: str
  suffix: str
  thought: str | None = None
  log_weights: list[float] = dataclasses.field(default_factory=list)  # [K]
  thought_len: int = -1
  ended: bool = False
  elbo: dict[str, float] = dataclasses.field(default_factory=dict)  # str(k) -> ELBO_k
  suffix_tokens: int = -1
  cut_tokens: int = 0
  source: str = ""


@dataclasses.dataclass
class DocRecord:
  """A document, its chunks in order, and free-form metadata (JSON-serialisable)."""
  doc_id: str
  text: str
  chunks: list[ChunkRecord] = dataclasses.field(default_factory=list)
  meta: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# tf.train.Example <-> DocRecord.


def _bytes(values: Iterable[str]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))


def _ints(values: Iterable[int]) -> tf.train.Feature:
  values = list(values)
  for v in values:
    # int("5") would quietly accept a string; a wrong type is a bug upstream.
    if not isinstance(v, (int, np.integer)):
      raise TypeError(f"{v!r} is not an integer")
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values: Iterable[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def to_example(rec: DocRecord) -> tf.train.Example:
  """Encodes a DocRecord with the schema in the module docstring."""
  try:
    cs = rec.chunks
    elbo_items = [list(c.elbo.items()) for c in cs]
    feature = {
        "schema_version": _ints([SCHEMA_VERSION]),
        "doc_id": _bytes([rec.doc_id]),
        "text": _bytes([rec.text]),
        "meta": _bytes([json.dumps(rec.meta, ensure_ascii=False)]),
        "num_chunks": _ints([len(cs)]),
        "chunk/prefix": _bytes(c.prefix for c in cs),
        "chunk/suffix": _bytes(c.suffix for c in cs),
        "chunk/thought": _bytes("" if c.thought is None else c.thought for c in cs),
        "chunk/has_thought": _ints(c.thought is not None for c in cs),
        "chunk/log_weights": _floats(w for c in cs for w in c.log_weights),
        "chunk/num_log_weights": _ints(len(c.log_weights) for c in cs),
        "chunk/thought_len": _ints(c.thought_len for c in cs),
        "chunk/ended": _ints(bool(c.ended) for c in cs),
        "chunk/elbo_k": _bytes(str(k) for items in elbo_items for k, _ in items),
        "chunk/elbo": _floats(v for items in elbo_items for _, v in items),
        "chunk/num_elbo": _ints(len(items) for items in elbo_items),
        "chunk/suffix_tokens": _ints(c.suffix_tokens for c in cs),
        "chunk/cut_tokens": _ints(c.cut_tokens for c in cs),
        "chunk/source": _bytes(c.source for c in cs),
    }
  except (TypeError, ValueError, AttributeError) as e:
    raise ValueError(f"DocRecord doc_id={getattr(rec, 'doc_id', '?')!r} cannot be encoded: {e}; "
                     f"check the field types against latent_em.data.records.ChunkRecord") from e
  return tf.train.Example(features=tf.train.Features(feature=feature))


def _f32_floats(values: Sequence[float]) -> list[float]:
  # Shortest decimal that is the same float32: stable under re-encoding and readable in JSONL.
  return [float(s) for s in np.asarray(values, np.float32).astype(str)]


def _split(flat: list, lengths: list[int]) -> list[list]:
  out, pos = [], 0
  for n in lengths:
    out.append(flat[pos:pos + n])
    pos += n
  return out


def from_example(serialized: bytes, where: str = "<bytes>") -> DocRecord:
  """Decodes one serialized tf.train.Example written by `to_example`; `where` names it in errors."""
  ex = tf.train.Example.FromString(serialized)
  f = ex.features.feature

  def strs(key):
    return [v.decode("utf-8") for v in f[key].bytes_list.value]

  def ints(key):
    return list(f[key].int64_list.value)

  version = ints("schema_version")
  if version != [SCHEMA_VERSION]:
    raise ValueError(f"{where}: schema_version {version or 'missing'} is not {SCHEMA_VERSION}; "
                     f"this file was not written by latent_em.data.records (or by a newer "
                     f"version): rewrite it with write_shard/from_jsonl")
  n = ints("num_chunks")[0]
  lw_lens, elbo_lens = ints("chunk/num_log_weights"), ints("chunk/num_elbo")
  columns = {
      "prefix": strs("chunk/prefix"), "suffix": strs("chunk/suffix"),
      "thought": strs("chunk/thought"), "has_thought": ints("chunk/has_thought"),
      "log_weights": _split(_f32_floats(f["chunk/log_weights"].float_list.value), lw_lens),
      "thought_len": ints("chunk/thought_len"), "ended": ints("chunk/ended"),
      "elbo_k": _split(strs("chunk/elbo_k"), elbo_lens),
      "elbo": _split(_f32_floats(f["chunk/elbo"].float_list.value), elbo_lens),
      "suffix_tokens": ints("chunk/suffix_tokens"), "cut_tokens": ints("chunk/cut_tokens"),
      "source": strs("chunk/source"),
  }
  bad = [k for k, v in columns.items() if len(v) != n]
  if bad:
    raise ValueError(f"{where}: num_chunks={n} but chunk/{bad[0]} has {len(columns[bad[0]])} "
                     f"entries; the record is corrupt: rewrite the shard")
  chunks = [
      ChunkRecord(
          prefix=columns["prefix"][i], suffix=columns["suffix"][i],
          thought=columns["thought"][i] if columns["has_thought"][i] else None,
          log_weights=columns["log_weights"][i], thought_len=columns["thought_len"][i],
          ended=bool(columns["ended"][i]),
          elbo=dict(zip(columns["elbo_k"][i], columns["elbo"][i])),
          suffix_tokens=columns["suffix_tokens"][i], cut_tokens=columns["cut_tokens"][i],
          source=columns["source"][i])
      for i in range(n)]
  return DocRecord(doc_id=strs("doc_id")[0], text=strs("text")[0], chunks=chunks,
                   meta=json.loads(strs("meta")[0]))


def tf_parse_fn() -> Callable[[tf.Tensor], dict[str, Any]]:
  """A tf.data map function: serialized Example (tf.string scalar) -> dict of tensors.

  Output (C = number of chunks of the document):
    doc_id, text, meta: tf.string []        (meta is a JSON object)
    num_chunks: tf.int64 []
    prefix, suffix, thought, source: tf.string [C]   (thought is "" where has_thought is False)
    has_thought, ended: tf.bool [C]
    thought_len, suffix_tokens, cut_tokens: tf.int64 [C]
    log_weights: tf.float32 ragged [C, (K)]
    elbo_k: tf.string ragged [C, (E)];  elbo: tf.float32 ragged [C, (E)]
  Batch with `dataset.ragged_batch(...)`, or select the fields a task needs first.
  """
  def ragged(dtype, key):
    return tf.io.RaggedFeature(dtype, value_key=key)

  def nested(dtype, key, lengths_key):
    return tf.io.RaggedFeature(dtype, value_key=key,
                               partitions=[tf.io.RaggedFeature.RowLengths(lengths_key)])

  spec = {
      "doc_id": tf.io.FixedLenFeature([], tf.string),
      "text": tf.io.FixedLenFeature([], tf.string),
      "meta": tf.io.FixedLenFeature([], tf.string, default_value="{}"),
      "num_chunks": tf.io.FixedLenFeature([], tf.int64),
      "prefix": ragged(tf.string, "chunk/prefix"),
      "suffix": ragged(tf.string, "chunk/suffix"),
      "thought": ragged(tf.string, "chunk/thought"),
      "has_thought": ragged(tf.int64, "chunk/has_thought"),
      "log_weights": nested(tf.float32, "chunk/log_weights", "chunk/num_log_weights"),
      "thought_len": ragged(tf.int64, "chunk/thought_len"),
      "ended": ragged(tf.int64, "chunk/ended"),
      "elbo_k": nested(tf.string, "chunk/elbo_k", "chunk/num_elbo"),
      "elbo": nested(tf.float32, "chunk/elbo", "chunk/num_elbo"),
      "suffix_tokens": ragged(tf.int64, "chunk/suffix_tokens"),
      "cut_tokens": ragged(tf.int64, "chunk/cut_tokens"),
      "source": ragged(tf.string, "chunk/source"),
  }

  def parse(serialized: tf.Tensor) -> dict[str, Any]:
    out = tf.io.parse_single_example(serialized, spec)
    out["has_thought"] = tf.cast(out["has_thought"], tf.bool)
    out["ended"] = tf.cast(out["ended"], tf.bool)
    return out

  return parse


# ---------------------------------------------------------------------------------------------
# Files.


def shard_paths(prefix: str, num_shards: int) -> list[str]:
  """`{prefix}-{i:05d}-of-{n:05d}.tfrecord` for i in [0, num_shards)."""
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  return [f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def _replace(tmp: str, path: str) -> None:
  if "://" in path:
    tf.io.gfile.rename(tmp, path, overwrite=True)
  else:
    os.replace(tmp, path)


def _remove_quietly(path: str) -> None:
  try:
    tf.io.gfile.remove(path)
  except tf.errors.NotFoundError:
    pass


@contextlib.contextmanager
def _atomic_tfrecord(path: str) -> Iterator[tf.io.TFRecordWriter]:
  """Writes to `path.tmp-<pid>` and renames it to `path` only if the block finishes."""
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  tmp = f"{path}.tmp-{os.getpid()}"
  writer = tf.io.TFRecordWriter(tmp)
  try:
    yield writer
    writer.close()
    _replace(tmp, path)
  except BaseException:
    writer.close()
    _remove_quietly(tmp)
    raise


def write_shard(records: Iterable[DocRecord], path: str) -> int:
  """Writes `records` to one TFRecord file atomically; returns how many were written."""
  count = 0
  with _atomic_tfrecord(path) as writer:
    for rec in records:
      writer.write(to_example(rec).SerializeToString())
      count += 1
  return count


def write_sharded(records: Iterable[DocRecord], prefix: str, num_shards: int) -> int:
  """Deals `records` round-robin into `shard_paths(prefix, num_shards)`; all or none appear."""
  paths = shard_paths(prefix, num_shards)
  count = 0
  with contextlib.ExitStack() as stack:
    writers = [stack.enter_context(_atomic_tfrecord(p)) for p in paths]
    for rec in records:
      writers[count % num_shards].write(to_example(rec).SerializeToString())
      count += 1
  return count


def expand_paths(paths_or_glob: str | Sequence[str]) -> list[str]:
  """Expands paths and globs, in order.

  A glob that matches `-i-of-n` shards must match all n of them: a shard missing from a glob
  (a crashed writer) stops the read, while explicit paths read exactly the files named.
  """
  patterns = [paths_or_glob] if isinstance(paths_or_glob, str) else list(paths_or_glob)
  paths: list[str] = []
  sets: dict[tuple[str, int], set[int]] = {}
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      raise FileNotFoundError(
          f"no file matches {pattern!r}; pass a path, a glob such as "
          f"'{pattern}-*-of-*.tfrecord', or a list of them")
    paths.extend(matched)
    if any(c in pattern for c in "*?["):
      for p in matched:
        m = _SHARD_RE.match(p)
        if m:
          sets.setdefault((m["prefix"], int(m["n"])), set()).add(int(m["i"]))
  for (prefix, n), have in sets.items():
    missing = sorted(set(range(n)) - have)
    if missing:
      raise FileNotFoundError(
          f"{shard_paths(prefix, n)[missing[0]]} is missing ({len(missing)} of {n} shards of "
          f"{prefix!r} absent); re-run the job that writes it, or pass the existing paths "
          f"explicitly to read a subset")
  return paths


def read_records(paths_or_glob: str | Sequence[str]) -> Iterator[DocRecord]:
  """Yields the DocRecords of the given files (paths or globs), file by file, in order."""
  for path in expand_paths(paths_or_glob):
    index = -1
    try:
      for index, serialized in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        yield from_example(serialized, f"{path}: record {index}")
    except tf.errors.DataLossError as e:
      raise ValueError(f"{path}: corrupt TFRecord data after record {index} ({e.message}); "
                       f"rewrite the shard") from None


# ---------------------------------------------------------------------------------------------
# JSONL.

_DOC_FIELDS = {"doc_id": str, "text": str, "chunks": list, "meta": dict}
_DOC_REQUIRED = ("doc_id", "text", "chunks")
_CHUNK_REQUIRED = ("prefix", "suffix")


def _type_name(kind) -> str:
  return {str: "a string", list: "a list", dict: "an object", bool: "true/false",
          int: "an integer"}.get(kind, str(kind))


def _chunk_from_json(d: Any, where: str) -> ChunkRecord:
  if not isinstance(d, dict):
    raise ValueError(f"{where}: is {type(d).__name__}, expected an object with 'prefix' and "
                     f"'suffix'")
  fields = {f.name for f in dataclasses.fields(ChunkRecord)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"{where}: unknown field {unknown[0]!r}; chunk fields are "
                     f"{sorted(fields)}")
  for key in _CHUNK_REQUIRED:
    if key not in d:
      raise ValueError(f"{where}: missing field {key!r}; every chunk needs 'prefix' and "
                       f"'suffix' (strings; the prefix may be \"\")")

  def want(key, ok, kind):
    if key in d and not ok(d[key]):
      raise ValueError(f"{where}.{key}: {d[key]!r} should be {kind}")

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  want("prefix", lambda v: isinstance(v, str), "a string")
  want("suffix", lambda v: isinstance(v, str), "a string")
  want("thought", lambda v: v is None or isinstance(v, str), "a string or null")
  want("log_weights", lambda v: isinstance(v, list) and all(map(is_num, v)), "a list of numbers")
  want("elbo", lambda v: isinstance(v, dict) and all(map(is_num, v.values())),
       "an object mapping k to a number, e.g. {\"1\": -2.5, \"4\": -2.1}")
  want("ended", lambda v: isinstance(v, bool), "true/false")
  want("source", lambda v: isinstance(v, str), "a string such as \"teacher\" or \"estep\"")
  for key in ("thought_len", "suffix_tokens", "cut_tokens"):
    want(key, is_int, "an integer (-1 if unknown)" if key != "cut_tokens" else "an integer")
  d = dict(d)
  if "log_weights" in d:
    d["log_weights"] = [float(v) for v in d["log_weights"]]
  if "elbo" in d:
    d["elbo"] = {str(k): float(v) for k, v in d["elbo"].items()}
  return ChunkRecord(**d)


def from_json_dict(d: Any, where: str = "<json>") -> DocRecord:
  """Builds a DocRecord from its JSON form; errors name `where` (e.g. "file.jsonl:12")."""
  if not isinstance(d, dict):
    raise ValueError(f"{where}: expected a JSON object per line, got {type(d).__name__}")
  unknown = sorted(set(d) - set(_DOC_FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown field {unknown[0]!r}; a line has fields "
                     f"{sorted(_DOC_FIELDS)}")
  for key in _DOC_REQUIRED:
    if key not in d:
      raise ValueError(f"{where}: missing field {key!r}; each line needs 'doc_id' (string), "
                       f"'text' (string) and 'chunks' (list of objects), and may have 'meta'")
  for key, kind in _DOC_FIELDS.items():
    if key in d and not isinstance(d[key], kind):
      raise ValueError(f"{where}: field {key!r} is {d[key]!r:.60}, it should be "
                       f"{_type_name(kind)}")
  chunks = [_chunk_from_json(c, f"{where}: chunks[{j}]") for j, c in enumerate(d["chunks"])]
  return DocRecord(doc_id=d["doc_id"], text=d["text"], chunks=chunks, meta=d.get("meta", {}))


def to_json_dict(rec: DocRecord) -> dict:
  return dataclasses.asdict(rec)


def read_jsonl(jsonl_path: str) -> Iterator[DocRecord]:
  """Yields the DocRecords of a JSONL file (blank lines are skipped)."""
  with tf.io.gfile.GFile(jsonl_path, "r") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{jsonl_path}:{lineno}"
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                         f"be one complete JSON object (no line breaks inside it)") from None
      yield from_json_dict(d, where)


def to_jsonl(paths_or_glob: str | Sequence[str], out_path: str) -> int:
  """Writes the records of TFRecord files to one JSONL file (atomically); returns the count."""
  tmp = f"{out_path}.tmp-{os.getpid()}"
  parent = os.path.dirname(out_path)
  if parent:
    tf.io.gfile.makedirs(parent)
  count = 0
  try:
    with tf.io.gfile.GFile(tmp, "w") as f:
      for rec in read_records(paths_or_glob):
        f.write(json.dumps(to_json_dict(rec), ensure_ascii=False) + "\n")
        count += 1
    _replace(tmp, out_path)
  except BaseException:
    _remove_quietly(tmp)
    raise
  return count


def from_jsonl(jsonl_path: str, out_path_prefix: str, num_shards: int) -> int:
  """Imports a JSONL file into `shard_paths(out_path_prefix, num_shards)`; returns the count.

  Records are dealt round-robin to the shards. A bad line stops the import with its file:line
  and no shard is left behind.
  """
  return write_sharded(read_jsonl(jsonl_path), out_path_prefix, num_shards)
