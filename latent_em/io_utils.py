"""Atomic file writes: every output is written to a temp file in the same directory, then
renamed, so a killed job never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temp path next to `path`; renames it onto `path` only if the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")


def write_jsonl(path: str, rows) -> int:
  n = 0
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False, default=_default) + "\n")
        n += 1
  return n


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _default(obj):
  if hasattr(obj, "item"):
    return obj.item()
  if hasattr(obj, "tolist"):
    return obj.tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
