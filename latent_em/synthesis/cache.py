"""On-disk request cache: a rerun never pays twice for the same request.

One small JSON file per request, at `{dir}/{key[:2]}/{key}.json`, where key = sha256 of the
canonical JSON of (backend identity, messages): endpoint, model and sampling settings are in
the identity, so changing any of them misses the cache. Each file is written to a temp file and
renamed into place, so concurrent writers (threads or processes) and crashes never leave a
partial entry visible; an entry that cannot be read anyway (e.g. truncated by a power loss) is a
miss and is overwritten. Only successful results are stored: a failed request is retried by the
next run.

The cache lives on the local filesystem (it is many small files).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import logging

from latent_em import io_utils
from latent_em.synthesis.backend import Backend, Request, Result, UsageStats


def request_key(identity: dict[str, Any], messages: Sequence[dict]) -> str:
  """sha256 hex of the canonical JSON of (identity, messages)."""
  blob = json.dumps({"identity": identity, "messages": list(messages)}, sort_keys=True,
                    ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class RequestCache:
  """Maps request keys to generated text, one atomically written file per key."""

  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)

  def path(self, key: str) -> str:
    return os.path.join(self.directory, key[:2], f"{key}.json")

  def get(self, key: str) -> dict[str, Any] | None:
    """The stored entry, or None when absent or unreadable (treated as a miss)."""
    path = self.path(key)
    try:
      with open(path, encoding="utf-8") as f:
        entry = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      logging.warning("ignoring unreadable cache entry %s (%s); the request will be re-sent",
                      path, e)
      return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(
        entry.get("text"), str):
      logging.warning("ignoring malformed cache entry %s; the request will be re-sent", path)
      return None
    return entry

  def put(self, key: str, entry: dict[str, Any]) -> None:
    io_utils.write_json(self.path(key), dict(entry, key=key))


class CachingBackend:
  """Wraps a Backend: answers from the cache, sends only misses (each distinct request once),
  and stores each success as soon as it arrives."""

  def __init__(self, inner: Backend, cache: RequestCache):
    self.inner = inner
    self.cache = cache

  @property
  def stats(self) -> UsageStats:
    return self.inner.stats

  def identity(self) -> dict[str, Any]:
    return self.inner.identity()

  def generate(self, requests: Sequence[Request],
               on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    identity = self.identity()
    results: list[Result | None] = [None] * len(requests)
    misses: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      key = request_key(identity, request.messages)
      entry = self.cache.get(key) if key not in misses else None
      if entry is None:
        misses.setdefault(key, []).append(i)
        continue
      self.stats.add("cache_hits")
      results[i] = Result(entry["text"], finish_reason=entry.get("finish_reason"), cached=True)
      if on_result is not None:
        on_result(i, results[i])
    keys = list(misses)

    def store(j: int, result: Result) -> None:
      indices = misses[keys[j]]
      if result.ok:
        self.cache.put(keys[j], {
            "identity": identity, "messages": list(requests[indices[0]].messages),
            "text": result.text, "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens,
                      "completion_tokens": result.completion_tokens},
            "created": time.time()})
      for n, i in enumerate(indices):
        # Duplicates of a request within the batch share its answer and cost nothing more.
        if n == 0:
          results[i] = result
        else:
          results[i] = Result(result.text, result.error, result.detail, result.finish_reason,
                              cached=True)
          if result.ok:
            self.stats.add("cache_hits")
        if on_result is not None:
          on_result(i, results[i])

    self.inner.generate([requests[misses[k][0]] for k in keys], on_result=store)
    return results  # type: ignore[return-value]
