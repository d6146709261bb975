"""Reading raw documents from JSONL / TFRecord files, with one policy for bad input.

Every record passes the same checks before it reaches the tokenizer. A record is bad when:
  malformed_json    a JSONL line is not a JSON object
  malformed_record  a TFRecord entry is not a serialized tf.train.Example
  missing_field     the text field is absent
  non_string_field  the text field is not a string (null, a number, a list, ...)
  invalid_utf8      the bytes are not UTF-8 (or JSON escapes encode an unpaired surrogate)
  empty             the text is empty or whitespace only
  too_long          the text has more than `max_doc_chars` characters (when that is > 0)
  latent_token      the text contains a latent token (formats.LATENT_TOKENS); such a document
                    would teach the model a thought boundary that is not one
With policy "fail" the first bad record raises BadInputError naming `file:line`, the problem and
the fix. With policy "skip" it is counted in InputStats, and the first record of each category
is logged. Blank JSONL lines carry no document and are passed over silently.

Documents longer than the context are not bad input: the task splits their token sequence into
several training sequences (see tasks.py). `max_doc_chars` exists to drop pathological records
(e.g. a whole book or a base64 blob on one line) before they are tokenized.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import threading
from typing import IO, Iterator

from absl import logging

from latent_em import config_lib
from latent_em import formats

POLICIES = ("skip", "fail")
TFDS_PREFIX = "tfds:"
BUILTIN_PREFIX = "builtin:"  # project corpora; runtime.resolve_files turns them into JSONL paths
_FIX_POLICY = 'or set config.data.on_bad_input="skip" to skip such records'


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """`config.data`: where raw text comes from and how it becomes batches.

  Each file entry is a path or glob of JSONL (`.jsonl`, `.jsonl.gz`), a TFRecord of
  tf.train.Example (`*.tfrecord*`, optionally `.gz`), one `tfds:NAME[/CONFIG]:SPLIT` spec, or
  a `builtin:` corpus (resolved to JSONL files by runtime.resolve_files).
  `batch_size` is global: each of the N hosts gets batch_size / N sequences.
  """
  train_files: tuple[str, ...] = ()
  validation_files: tuple[str, ...] = ()
  text_field: str = "text"
  on_bad_input: str = "skip"     # "skip" (count + log) | "fail" (raise naming file:line)
  # 0 = no limit. Longer documents are bad input (skipped or fatal per on_bad_input). Documents
  # longer than seq_len tokens but under this limit are split into several sequences.
  max_doc_chars: int = 0
  seq_len: int = 256
  batch_size: int = 8
  shuffle_buffer: int = 10000
  seed: int = 0
  pack: bool = True

  def __post_init__(self):
    config_lib.check(self.on_bad_input in POLICIES, "config.data.on_bad_input",
                     f"{self.on_bad_input!r} is not one of {list(POLICIES)}")
    config_lib.check(self.max_doc_chars >= 0, "config.data.max_doc_chars",
                     f"{self.max_doc_chars} must be >= 0 (0 means no limit)")
    config_lib.check(self.seq_len >= 2, "config.data.seq_len", f"{self.seq_len} must be >= 2")
    config_lib.check(self.batch_size >= 1, "config.data.batch_size",
                     f"{self.batch_size} must be >= 1")
    config_lib.check(self.shuffle_buffer >= 1, "config.data.shuffle_buffer",
                     f"{self.shuffle_buffer} must be >= 1")
    config_lib.check(bool(self.text_field), "config.data.text_field", "must not be empty")
    for key in ("train_files", "validation_files"):
      for i, spec in enumerate(getattr(self, key)):
        if _is_glob(spec) or spec.startswith(BUILTIN_PREFIX):
          continue  # checked when listed / materialised as JSONL by runtime.resolve_files
        try:
          file_kind(spec)
        except ValueError as e:
          raise config_lib.ConfigError(f"config.data.{key}[{i}]: {e}") from None


class BadInputError(ValueError):
  """A bad input record under policy "fail"; the message names file:line and the fix."""


# tf.data wraps exceptions raised inside generators into tf.errors.OpError, keeping only the
# text. The pipeline looks the text up here to re-raise the original BadInputError.
_RECENT_ERRORS: collections.deque[BadInputError] = collections.deque(maxlen=16)
_RECENT_LOCK = threading.Lock()


def _raise(error: BadInputError) -> None:
  with _RECENT_LOCK:
    _RECENT_ERRORS.append(error)
  raise error


def find_bad_input_error(message: str) -> BadInputError | None:
  """Returns the BadInputError whose text appears in `message` (a tf.errors.OpError text)."""
  with _RECENT_LOCK:
    for error in reversed(_RECENT_ERRORS):
      if str(error) in message:
        return error
  return None


# The bad-input categories, in the order of the module docstring.
CATEGORIES = ("malformed_json", "malformed_record", "missing_field", "non_string_field",
              "invalid_utf8", "empty", "too_long", "latent_token")


@dataclasses.dataclass
class InputStats:
  """Counts of records read, kept and skipped per bad-input category (thread-safe)."""
  docs_read: int = 0
  docs_kept: int = 0
  malformed_json: int = 0
  malformed_record: int = 0
  missing_field: int = 0
  non_string_field: int = 0
  invalid_utf8: int = 0
  empty: int = 0
  too_long: int = 0
  latent_token: int = 0
  _lock: threading.Lock = dataclasses.field(
      default_factory=threading.Lock, repr=False, compare=False)
  _logged: set[str] = dataclasses.field(default_factory=set, repr=False, compare=False)

  def add(self, name: str, n: int = 1) -> None:
    with self._lock:
      setattr(self, name, getattr(self, name) + n)

  def skip(self, category: str, where: str, problem: str) -> None:
    """Counts one skipped record; logs the first of each category."""
    with self._lock:
      setattr(self, category, getattr(self, category) + 1)
      first = category not in self._logged
      self._logged.add(category)
    if first:
      logging.warning("skipping bad input %s: %s (further %s records are counted, not logged)",
                      where, problem, category)

  @property
  def skipped(self) -> int:
    return sum(getattr(self, c) for c in CATEGORIES)

  def summary(self) -> dict[str, int]:
    with self._lock:
      out = {"docs_read": self.docs_read, "docs_kept": self.docs_kept}
      out.update({c: getattr(self, c) for c in CATEGORIES})
    out["skipped"] = sum(out[c] for c in CATEGORIES)
    return out

  def log(self) -> None:
    s = self.summary()
    bad = ", ".join(f"{c}={s[c]}" for c in CATEGORIES if s[c])
    logging.info("input: read %d records, kept %d, skipped %d%s", s["docs_read"],
                 s["docs_kept"], s["skipped"], f" ({bad})" if bad else "")


def _is_glob(spec: str) -> bool:
  return not spec.startswith(TFDS_PREFIX) and any(c in spec for c in "*?[")


def file_kind(spec: str) -> str:
  """"jsonl", "tfrecord" or "tfds" for one `config.data.*_files` entry (no file access)."""
  if spec.startswith(TFDS_PREFIX):
    parse_tfds_spec(spec)
    return "tfds"
  base = spec.rsplit("/", 1)[-1]
  if base.endswith((".jsonl", ".jsonl.gz")):
    return "jsonl"
  if ".tfrecord" in base:
    return "tfrecord"
  raise ValueError(
      f"cannot tell the format of {spec!r}: name JSONL files *.jsonl or *.jsonl.gz, TFRecord "
      f"files *.tfrecord* (tf.train.Example records), or use 'tfds:NAME/CONFIG:SPLIT'")


def parse_tfds_spec(spec: str) -> tuple[str, str]:
  """'tfds:NAME/CONFIG:SPLIT' -> ('NAME/CONFIG', 'SPLIT'); NAME may carry ':VERSION'."""
  body = spec[len(TFDS_PREFIX):]
  name, sep, split = body.rpartition(":")
  if not sep or not name or not split:
    raise ValueError(f"{spec!r} should look like 'tfds:NAME/CONFIG:SPLIT' (e.g. "
                     "'tfds:my_corpus/default:train')")
  return name, split


def expand_files(specs: tuple[str, ...] | list[str], config_key: str) -> list[str]:
  """Expands globs in file entries; a pattern matching nothing raises FileNotFoundError.

  tfds specs pass through unchanged. Globs expand in sorted order so that every host sees the
  same file list (per-host sharding assigns files by position).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow import, only here)
  out = []
  for i, spec in enumerate(specs):
    key = f"{config_key}[{i}]"
    try:
      kind = "glob" if _is_glob(spec) else file_kind(spec)
    except ValueError as e:
      raise ValueError(f"{key}: {e}") from None
    if kind == "tfds":
      out.append(spec)
      continue
    matches = sorted(tf.io.gfile.glob(spec))
    if not matches:
      raise FileNotFoundError(
          f"{key}={spec!r}: no such file (or the glob matches nothing); fix the path in "
          f"{config_key}")
    for path in matches:
      try:
        file_kind(path)
      except ValueError as e:
        raise ValueError(f"{key}={spec!r} matches {path!r}: {e}") from None
    out.extend(matches)
  return out


def _open_binary(path: str) -> IO[bytes]:
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    raw = tf.io.gfile.GFile(path, "rb")
  else:
    raw = open(path, "rb")  # pylint: disable=consider-using-with
  if path.endswith(".gz"):
    return gzip.GzipFile(fileobj=raw, mode="rb")
  return raw


class _Checker:
  """Applies the bad-input policy to one record; returns the text or None (skipped)."""

  def __init__(self, text_field: str, policy: str, max_doc_chars: int, stats: InputStats):
    if policy not in POLICIES:
      raise ValueError(f"on_bad_input={policy!r} is not one of {list(POLICIES)}")
    self.text_field = text_field
    self.policy = policy
    self.max_doc_chars = max_doc_chars
    self.stats = stats

  def reject(self, category: str, where: str, problem: str, fix: str) -> None:
    if self.policy == "fail":
      _raise(BadInputError(f"{where}: {problem}. Fix: {fix}, {_FIX_POLICY}."))
    self.stats.skip(category, where, problem)

  def value(self, value: object, where: str, fields: list[str] | None) -> str | None:
    """Checks a decoded field value (None = the field is missing)."""
    field = self.text_field
    if value is None and fields is not None:
      self.reject("missing_field", where, f"no field {field!r} (fields: {fields})",
                  "set config.data.text_field to the field holding the document text")
      return None
    if not isinstance(value, str):
      self.reject("non_string_field", where,
                  f"field {field!r} is {type(value).__name__}, not a string",
                  f"store the document text as a string in {field!r}")
      return None
    return self.text(value, where)

  def decoded(self, data: bytes, where: str) -> str | None:
    """Checks a bytes value: UTF-8 first, then the text-level checks."""
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      self.reject("invalid_utf8", where,
                  f"field {self.text_field!r} is not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                  f"offset {e.start})", "re-encode the text as UTF-8")
      return None
    return self.text(text, where)

  def text(self, text: str, where: str) -> str | None:
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      self.reject("invalid_utf8", where,
                  f"field {self.text_field!r} has an unpaired surrogate at character {e.start}",
                  "re-encode the text as valid UTF-8")
      return None
    if not text.strip():
      self.reject("empty", where, f"field {self.text_field!r} is empty or whitespace only",
                  "remove the record")
      return None
    if self.max_doc_chars and len(text) > self.max_doc_chars:
      self.reject("too_long", where,
                  f"the document has {len(text)} characters, more than "
                  f"config.data.max_doc_chars={self.max_doc_chars}",
                  "raise config.data.max_doc_chars (0 = no limit; documents longer than the "
                  "context are split into several sequences)")
      return None
    token = formats.contains_latent_token(text)
    if token is not None:
      self.reject("latent_token", where,
                  f"the document contains the reserved latent token {token!r}, which would "
                  "corrupt training on thought-augmented text",
                  "remove or escape that string in the raw data")
      return None
    return text


def read_jsonl_texts(
    path: str,
    text_field: str,
    policy: str,
    stats: InputStats,
    *,
    max_doc_chars: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Iterator[tuple[str, str]]:
  """Yields (doc_id "path:line", text) for the good records of one JSONL file.

  Lines are numbered from 1. With num_shards > 1 only lines whose (line - 1) % num_shards ==
  shard_index are read (per-host sharding when there are fewer files than hosts).
  """
  checker = _Checker(text_field, policy, max_doc_chars, stats)
  with _open_binary(path) as f:
    for line_no, raw in enumerate(f, start=1):
      if num_shards > 1 and (line_no - 1) % num_shards != shard_index:
        continue
      if not raw.strip():
        continue
      stats.add("docs_read")
      where = f"{path}:{line_no}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        checker.reject("invalid_utf8", where,
                       f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                       "re-encode the file as UTF-8")
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        checker.reject("malformed_json", where, f"line is not valid JSON ({e.msg} at column "
                       f"{e.colno})", "fix or remove the line")
        continue
      if not isinstance(record, dict):
        checker.reject("malformed_json", where,
                       f"line is a JSON {type(record).__name__}, not an object",
                       'write one object per line, e.g. {"text": "..."}')
        continue
      fields = sorted(record) if text_field not in record else None
      text = checker.value(record.get(text_field), where, fields)
      if text is not None:
        stats.add("docs_kept")
        yield where, text


def read_tfrecord_texts(
    path: str,
    text_field: str,
    policy: str,
    stats: InputStats,
    *,
    max_doc_chars: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Iterator[tuple[str, str]]:
  """Yields (doc_id "path:record", text) from a TFRecord file of tf.train.Example.

  The text is the single bytes value of feature `text_field`. Records are numbered from 1;
  sharding works as in read_jsonl_texts.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  checker = _Checker(text_field, policy, max_doc_chars, stats)
  compression = "GZIP" if path.endswith(".gz") else ""
  records = tf.data.TFRecordDataset(path, compression_type=compression).as_numpy_iterator()
  for rec_no, raw in enumerate(records, start=1):
    if num_shards > 1 and (rec_no - 1) % num_shards != shard_index:
      continue
    stats.add("docs_read")
    where = f"{path}:{rec_no}"
    try:
      example = tf.train.Example.FromString(raw)
    except Exception:  # pylint: disable=broad-except  (protobuf raises DecodeError variants)
      checker.reject("malformed_record", where, "record is not a serialized tf.train.Example",
                     "write tf.train.Example records")
      continue
    features = example.features.feature
    if text_field not in features:
      checker.value(None, where, sorted(features))
      continue
    feature = features[text_field]
    kind = feature.WhichOneof("kind")
    if kind != "bytes_list" or len(feature.bytes_list.value) != 1:
      n = len(getattr(feature, kind).value) if kind else 0
      checker.reject("non_string_field", where,
                     f"feature {text_field!r} is a {kind} with {n} values, not one bytes value",
                     f"store the document text as a single bytes value in {text_field!r}")
      continue
    text = checker.decoded(feature.bytes_list.value[0], where)
    if text is not None:
      stats.add("docs_kept")
      yield where, text


def read_texts(path: str, text_field: str, policy: str, stats: InputStats,
               **kwargs) -> Iterator[tuple[str, str]]:
  """Dispatches to the JSONL or TFRecord reader by file name."""
  kind = file_kind(path)
  if kind == "jsonl":
    return read_jsonl_texts(path, text_field, policy, stats, **kwargs)
  if kind == "tfrecord":
    return read_tfrecord_texts(path, text_field, policy, stats, **kwargs)
  raise ValueError(f"{path!r}: tfds specs are read through seqio.TfdsDataSource, not here")


def read_docs(files: list[str], text_field: str, policy: str, stats: InputStats,
              **kwargs) -> Iterator[tuple[str, str]]:
  """Yields (doc_id, text) over several files, doc_id "RELPATH:N" with RELPATH relative to the
  deepest folder holding all files.

  The ids (which seed per-document choices such as the M-step's layout coin flips) therefore do
  not depend on where the files live: the same corpus copied to another workdir gives the same
  ids. Error messages still name the full path.
  """
  files = list(files)
  if not files:
    return
  root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
  for path in files:
    rel = os.path.relpath(os.path.abspath(path), root)
    for where, text in read_texts(path, text_field, policy, stats, **kwargs):
      yield f"{rel}:{where.rsplit(':', 1)[1]}", text


def check_text(data: bytes, where: str, text_field: str, policy: str, stats: InputStats,
               max_doc_chars: int = 0) -> str | None:
  """Applies the checks to one raw text value (for sources read by TF, e.g. TFDS).

  Returns the decoded text, or None when the record is skipped; raises under policy "fail".
  """
  stats.add("docs_read")
  out = _Checker(text_field, policy, max_doc_chars, stats).decoded(data, where)
  if out is not None:
    stats.add("docs_kept")
  return out

