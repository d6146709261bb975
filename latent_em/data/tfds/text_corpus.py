"""TFDS builder `latent_em_text_corpus`: a raw-text corpus from local JSONL / Parquet files.

For corpora the user downloads (e.g. FineMath-4+ Parquet shards from the Hugging Face Hub).
Each config names its input files; every record's `text_field` becomes one example with
features `text` and `doc_id` ("RELPATH:N": the file relative to the deepest folder holding all
inputs, and the 1-based line of a JSONL file or the 0-based row of a Parquet file; also the
example key). Records whose text is empty or whitespace only are skipped; their number is
stored in the dataset's metadata (`builder.info.metadata["skipped_empty"]`) and logged. A record
without the field, or with a non-string value, stops the build with its file and line: it
usually means the wrong `text_field`.

The train/validation split is a pure function of the document text: a document goes to
validation when the first 8 bytes of sha256(utf-8 text), read as a fraction of 2**64, are below
`validation_fraction`. It does not depend on file order or sharding, and exact duplicates always
land in the same split. With `validation_fraction=0` there is no validation split.

Inputs: `.jsonl`, `.jsonl.gz` and `.parquet` files (Parquet needs pyarrow); glob patterns expand
in sorted order.

Python (each config is named by the user; the name is how the data is loaded later):

  from latent_em.data import tfds as latent_tfds
  builder = latent_tfds.build_text_corpus(
      "finemath4plus", ["/data/finemath-4plus/*.parquet"], text_field="text",
      validation_fraction=0.01, data_dir="/data/tfds")
  ds = latent_tfds.load_split("latent_em_text_corpus/finemath4plus", "train",
                              data_dir="/data/tfds")
  # or in a config: config.data.train_files = ("tfds:latent_em_text_corpus/finemath4plus:train",)

Command line, same result (see the docstring of latent_em.data.tfds for what the `tfds` command
needs installed):

  tfds build latent_em_text_corpus --imports=latent_em.data.tfds \
      --config='{"name": "finemath4plus", "files": ["/data/finemath-4plus/*.parquet"],
                 "text_field": "text", "validation_fraction": 0.01}' \
      --data_dir=/data/tfds

or, with the built-in config "manual" (every .jsonl / .jsonl.gz / .parquet file directly in the
manual dir, text field "text", 1% validation), loaded later as `latent_em_text_corpus`:

  tfds build latent_em_text_corpus --imports=latent_em.data.tfds \
      --manual_dir=/data/finemath-4plus --data_dir=/data/tfds
  tfds build latent_em/data/tfds/text_corpus.py \
      --manual_dir=/data/finemath-4plus --data_dir=/data/tfds   # same, by path

A config built by `tfds build --config='{...}'` and one built by `build_text_corpus` with the
same name and settings are the same dataset; either call reuses the other's output.

A prepared config is reused as is: building the same name again with other files or settings is
an error (pass `overwrite=True`, or pick a new name), so stale data is never read by mistake.
Files added later under the same glob are not noticed; rebuild with overwrite=True.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from typing import Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from latent_em.data.tfds import common

NAME = "latent_em_text_corpus"
MANUAL_CONFIG = "manual"
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_CONFIG_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """One corpus. `files`: paths or globs (empty: every supported file in the manual dir)."""
  files: tuple[str, ...] = ()
  text_field: str = "text"
  validation_fraction: float = 0.01

  def __post_init__(self):
    # JSON configs (`tfds build --config='{...}'`) arrive with lists.
    self.files = tuple(os.path.expanduser(f) for f in self.files)
    if not _CONFIG_NAME_RE.fullmatch(self.name or ""):
      raise ValueError(f"text corpus name {self.name!r}: use letters, digits, '_', '.', '-' "
                       "(it becomes a folder name and part of 'tfds:NAME/CONFIG:SPLIT')")
    if not self.text_field:
      raise ValueError(f"text corpus {self.name!r}: text_field must not be empty")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError(f"text corpus {self.name!r}: validation_fraction="
                       f"{self.validation_fraction} must be in [0, 1)")
    if self.description is None:
      self.description = settings_json(self)


def settings_json(config: TextCorpusConfig) -> str:
  """The settings that determine a corpus's content, as stored in its dataset_info.json."""
  return json.dumps({"files": list(config.files), "text_field": config.text_field,
                     "validation_fraction": config.validation_fraction}, sort_keys=True)


def in_validation(text: str, validation_fraction: float) -> bool:
  """Whether a document belongs to the validation split (a function of its text alone)."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < validation_fraction * 2.0**64


class LatentEmTextCorpus(tfds.core.GeneratorBasedBuilder):
  """Raw text documents from local files, split train/validation by text hash."""

  name = NAME
  # TFDS would derive this from the package through `importlib_resources`, which is not
  # always installed; the module file is the answer either way.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: text + doc_id from JSONL/JSONL.gz/Parquet; sha256 split.",
  }
  BUILDER_CONFIGS = [TextCorpusConfig(
      name=MANUAL_CONFIG,
      description="Every .jsonl, .jsonl.gz and .parquet file directly in the manual dir.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "For the 'manual' config only: put the corpus files (.jsonl, .jsonl.gz or .parquet, one "
      "document per record in field 'text') directly in the manual dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Raw text documents read from local files.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "doc_id": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: TextCorpusConfig = self.builder_config
    if config.files:
      files = expand_files(config.files, config.name)
    else:
      files = expand_files([os.path.join(os.fspath(dl_manager.manual_dir), "*")], config.name,
                           skip_unsupported=True)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    splits = {"train": False}
    if config.validation_fraction > 0:
      splits["validation"] = True
    return {split: self._generate_examples(files, root, validation)
            for split, validation in splits.items()}

  def _generate_examples(self, files: Sequence[str], root: str, validation: bool):
    config: TextCorpusConfig = self.builder_config
    skipped = kept = total = 0
    for path in files:
      rel = os.path.relpath(os.path.abspath(path), root)
      for n, text in read_texts(path, config.text_field):
        if not text.strip():
          skipped += 1
          continue
        total += 1
        if in_validation(text, config.validation_fraction) == validation:
          kept += 1
          doc_id = f"{rel}:{n}"
          yield doc_id, {"text": text, "doc_id": doc_id}
    if not kept:  # TFDS cannot write an empty split; say why instead of "no examples".
      split = "validation" if validation else "train"
      raise ValueError(
          f"text corpus {config.name!r}: no document fell into the {split} split ({total} "
          f"non-empty documents, {skipped} empty, validation_fraction="
          f"{config.validation_fraction}); adjust validation_fraction (0 means no validation "
          "split) or add documents")
    # Every split reads every file, so each pass sees the same count.
    self.info.metadata["skipped_empty"] = skipped
    if skipped:
      logging.info("%s/%s: skipped %d empty or whitespace-only documents", NAME, config.name,
                   skipped)


def expand_files(patterns: Sequence[str], name: str,
                 skip_unsupported: bool = False) -> list[str]:
  """Sorted files matching each pattern, checked to exist and to have a supported suffix."""
  out: list[str] = []
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if skip_unsupported:
      matches = [p for p in matches if p.endswith(SUFFIXES)]
    if not matches:
      raise FileNotFoundError(f"text corpus {name!r}: no {'/'.join(SUFFIXES)} file matches "
                              f"{pattern!r}")
    for path in matches:
      if not path.endswith(SUFFIXES):
        raise ValueError(f"text corpus {name!r}: {path} is not one of {SUFFIXES}; convert it "
                         "or narrow the pattern")
      if path not in out:
        out.append(path)
  return out


def read_texts(path: str, field: str) -> Iterator[tuple[int, str]]:
  """(line number for JSONL / row index for Parquet, text) for every record of one file."""
  if path.endswith(".parquet"):
    yield from _read_parquet(path, field)
    return
  for line_no, obj in common.read_jsonl(path):
    yield line_no, common.require_str(obj, field, f"{path}:{line_no}")


def _read_parquet(path: str, field: str) -> Iterator[tuple[int, str]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`), or "
                      "convert the file to JSONL") from None
  parquet = pq.ParquetFile(path)
  columns = parquet.schema_arrow.names
  if field not in columns:
    raise ValueError(f"{path}: no column {field!r} (columns: {columns}); set text_field")
  row = 0
  for batch in parquet.iter_batches(columns=[field], batch_size=1024):
    for value in batch.column(0).to_pylist():
      if not isinstance(value, str):
        raise ValueError(f"{path}: row {row}: column {field!r} is "
                         f"{type(value).__name__}, expected a string")
      yield row, value
      row += 1


def build_text_corpus(name: str, files: Sequence[str], text_field: str = "text",
                      validation_fraction: float = 0.01, data_dir: str | None = None, *,
                      overwrite: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares `latent_em_text_corpus/NAME` from local files; returns the (prepared) builder.

  Load it later with `load_split("latent_em_text_corpus/NAME", "train", data_dir)`.
  Raises ValueError if NAME was already built in data_dir with other settings and not
  `overwrite`.
  """
  if name == MANUAL_CONFIG:
    raise ValueError(f"text corpus name {name!r} is reserved for the manual-dir config; pick "
                     "another name")
  if isinstance(files, str):
    files = [files]
  if not files:
    raise ValueError(f"text corpus {name!r}: no input files given")
  config = TextCorpusConfig(name=name, files=tuple(files), text_field=text_field,
                            validation_fraction=validation_fraction)
  expand_files(config.files, name)  # fail before TFDS creates any folder
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  builder = LatentEmTextCorpus(config=config, data_dir=data_dir)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if builder.is_prepared():
    stored = _stored_settings(builder)
    if overwrite:
      mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # regenerates the dataset
    elif stored != settings_json(config):
      raise ValueError(
          f"text corpus {name!r} was already built in {builder.data_dir} from {stored}, not "
          f"{settings_json(config)}; pass overwrite=True or choose another name")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, download_mode=mode))
  if overwrite:
    builder = LatentEmTextCorpus(config=config, data_dir=data_dir)  # re-read the new info
  return builder


def _stored_settings(builder: tfds.core.DatasetBuilder) -> str | None:
  path = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("configDescription")
