"""TFDS builders for the datasets latent_em trains and evaluates on.

Importing this package registers three builders with TFDS (see each module for the exact build
commands):
  latent_em_gsm8k        GSM8K train/test                              (gsm8k.py)
  latent_em_math         MATH train/test and MATH-500                  (math_dataset.py)
  latent_em_text_corpus  a user's local JSONL/Parquet corpus, per config (text_corpus.py)

`load_split` prepares a dataset on first use (from `manual_dir` when given, else by download)
and returns one split; `build_text_corpus` prepares a local corpus under a name of the user's
choosing.

The `tfds build ... --imports=latent_em.data.tfds` commands in the module docstrings need
`latent_em` importable (`pip install -e .` or PYTHONPATH=REPO). The `tfds` command of
tensorflow-datasets 4.9.10 also imports apache_beam and mlcroissant when it starts, even for
builders that use neither (`pip install apache-beam mlcroissant`); the Python calls need
neither.
"""
from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from latent_em.data.tfds import gsm8k, math_dataset, text_corpus
from latent_em.data.tfds.text_corpus import build_text_corpus

__all__ = ["build_text_corpus", "download_config", "load_split", "prepare",
           "gsm8k", "math_dataset", "text_corpus"]


def download_config(manual_dir: str | None = None) -> tfds.download.DownloadConfig:
  """The DownloadConfig the project uses: local files from `manual_dir`, never TFDS's GCS copy
  (these datasets are not hosted there, and asking costs a network round trip)."""
  manual = os.path.expanduser(manual_dir) if manual_dir else None
  return tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None
            ) -> tfds.core.DatasetBuilder:
  """The builder for `name` ("NAME" or "NAME/CONFIG"), prepared in data_dir if it was not.

  A prepared dataset is reused as is; `manual_dir` only matters for the first build. A text
  corpus config cannot be built from its name alone: use `build_text_corpus` first.
  """
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    hint = ""
    if name.startswith(text_corpus.NAME + "/"):
      hint = (f"; a text corpus must be built first with build_text_corpus("
              f"{name.split('/', 1)[1]!r}, files, data_dir={data_dir!r})")
    raise ValueError(f"TFDS cannot load {name!r} with data_dir={data_dir!r} ({e}){hint}"
                     ) from None
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=download_config(manual_dir))
  return builder


def load_split(name: str, split: str, data_dir: str | None,
               manual_dir: str | None = None) -> tf.data.Dataset:
  """One split of a latent_em TFDS dataset as a tf.data.Dataset of feature dicts.

  Elements are dicts of scalar tensors (tf.string for text, tf.int32 for MATH's `level`) in
  stored order: TFDS writes examples sorted by a hash of their key, not in source order, and
  files are not shuffled on read, so repeated calls yield the same sequence.
  """
  builder = prepare(name, data_dir, manual_dir)
  splits = sorted(builder.info.splits)
  # Slices and sums ("train[:10%]", "train+test") are left to TFDS to parse and check.
  if not any(c in split for c in "[+") and split not in splits:
    raise ValueError(f"{name!r} has no split {split!r}; its splits are {splits}")
  return builder.as_dataset(split=split, shuffle_files=False)
