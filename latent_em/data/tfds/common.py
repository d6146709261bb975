"""Helpers shared by the TFDS builders: local-file detection and strict JSONL reading."""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Sequence

from absl import logging


def local_dir(dl_manager: Any, names: Sequence[str], dataset: str) -> str | None:
  """The manual dir when it holds every file in `names`; None when it holds none of them.

  Builders that can download their data also accept local copies: TFDS hands every builder a
  manual dir (`DownloadConfig(manual_dir=...)`, `tfds build --manual_dir`), which defaults to
  DOWNLOAD_DIR/manual and may not exist. A dir holding only some of the files is almost always
  a mistake (a typo or an interrupted copy), so it is an error rather than a silent download.
  """
  try:
    path = os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError):  # TFDS: manual dir missing or empty
    return None
  present = [n for n in names if os.path.isfile(os.path.join(path, n))]
  if len(present) == len(names):
    logging.info("%s: reading local files %s from %s", dataset, list(names), path)
    return path
  if present:
    missing = sorted(set(names) - set(present))
    raise FileNotFoundError(
        f"{dataset}: manual dir {path} has {present} but not {missing}; put all of "
        f"{list(names)} there, or point manual_dir at an empty dir to download the data")
  logging.info("%s: %s holds none of %s; downloading", dataset, path, list(names))
  return None


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (1-based line number, object) for each non-blank line of a JSONL(.gz) file.

  A line that is not a JSON object raises ValueError naming `path:line`: a corrupt download or
  the wrong file must not turn silently into a smaller dataset.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e}); the file must hold one "
                         "JSON object per line") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                         f"{type(obj).__name__}")
      yield line_no, obj


def require_str(obj: dict[str, Any], field: str, where: str) -> str:
  """obj[field] when it is a string; otherwise a ValueError naming `where` and the field."""
  value = obj.get(field)
  if not isinstance(value, str):
    got = "missing" if field not in obj else f"a {type(value).__name__}"
    raise ValueError(f"{where}: field {field!r} is {got}, expected a string (fields present: "
                     f"{sorted(obj)})")
  return value
