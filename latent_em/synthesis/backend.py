"""The interface between the synthesis job and whatever generates text.

A Backend turns chat requests into results, in order. `ApiBackend` (api_backend.py) calls an
OpenAI-compatible HTTP endpoint; `CachingBackend` (cache.py) wraps any backend with the on-disk
request cache; `local_backend.LocalBackend` samples from one of our own checkpoints.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, Protocol, Sequence

# Failure kinds a Result may carry (Result.error); the summary counts them.
FAILURE_KINDS = (
    "malformed",          # 200 reply that is not a chat completion (bad JSON, no choices, ...)
    "empty",              # the reply's content is empty or whitespace only
    "length",             # finish_reason "length" (the text was cut) when configured as failure
    "latent_token",       # the reply contains a latent token string (formats.LATENT_TOKENS)
    "http_4xx",           # a client error that retrying cannot fix (e.g. context too long)
    "retries_exhausted",  # 429 / 5xx / connection errors on every attempt
)


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request.

  Attributes:
    messages: chat messages, [{"role": ..., "content": ...}, ...].
    tag: the caller's label for logs and errors (e.g. "file.jsonl:3#chunk2"); not part of the
      cache key.
    context: what the messages were built from, for backends that read it instead of the
      messages (oracle_backend): {"kind", "document_prefix" (everything before the chunk),
      "suffix"}. Not part of the cache key.
  """
  messages: tuple[dict, ...]
  tag: str = ""
  context: dict | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class Result:
  """The outcome of one Request.

  Attributes:
    text: the generated text (stripped), or None when the request failed.
    error: None on success, else one of FAILURE_KINDS.
    detail: a human-readable reason for the failure.
    finish_reason: as reported by the backend ("stop", "length", ...).
    cached: True when the text came from the request cache (nothing was paid for it).
    prompt_tokens / completion_tokens: usage reported for this request (0 when cached).
  """
  text: str | None
  error: str | None = None
  detail: str = ""
  finish_reason: str | None = None
  cached: bool = False
  prompt_tokens: int = 0
  completion_tokens: int = 0

  @property
  def ok(self) -> bool:
    return self.error is None


class Backend(Protocol):
  """Anything that generates one text per request.

  generate() returns one Result per request, in request order; `on_result(i, result)` (if given)
  is called once per finished request i as soon as it finishes (so that callers can persist
  paid results before the batch ends), always from the calling thread. A failure that concerns
  one request is a Result with `error` set; a failure that dooms every request (bad API key,
  unknown model) raises.
  """

  stats: "UsageStats"

  def generate(self, requests: Sequence[Request],
               on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    ...

  def identity(self) -> dict[str, Any]:
    """What besides the messages determines the output (endpoint, model, sampling settings);
    part of every cache key."""
    ...


@dataclasses.dataclass
class UsageStats:
  """Request counters for one run (thread-safe)."""
  requests_sent: int = 0       # HTTP attempts, retries included
  cache_hits: int = 0
  retries: int = 0             # attempts after the first, for any reason
  http_429: int = 0
  http_5xx: int = 0            # also 408 / 409, which are retried the same way
  connection_errors: int = 0   # timeouts, refused or reset connections
  prompt_tokens: int = 0
  completion_tokens: int = 0
  failures: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  _lock: threading.Lock = dataclasses.field(
      default_factory=threading.Lock, repr=False, compare=False)

  def add(self, name: str, n: int = 1) -> None:
    with self._lock:
      setattr(self, name, getattr(self, name) + n)

  def fail(self, kind: str) -> None:
    with self._lock:
      self.failures[kind] += 1

  def cost(self, price_prompt_per_m: float, price_completion_per_m: float) -> float:
    """Estimated spend: tokens times the per-million-token prices."""
    return (self.prompt_tokens * price_prompt_per_m
            + self.completion_tokens * price_completion_per_m) / 1e6

  def summary(self, price_prompt_per_m: float = 0.0,
              price_completion_per_m: float = 0.0) -> dict[str, Any]:
    with self._lock:
      out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if not f.name.startswith("_") and f.name != "failures"}
      out["failures"] = dict(sorted(self.failures.items()))
    out["failed_requests"] = sum(out["failures"].values())
    out["cost_usd"] = round(self.cost(price_prompt_per_m, price_completion_per_m), 6)
    return out
