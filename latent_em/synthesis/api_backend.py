"""Chat completions from any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, llama.cpp, ...).

One retry loop, ours, handles every transient failure; the HTTP client never retries by itself
(the `openai` client is built with max_retries=0), so every attempt is counted:
  429                 wait Retry-After / retry-after-ms when the server sends it (all workers
                      pause, since the limit is shared), else exponential backoff with jitter;
  408, 409, 5xx       exponential backoff with jitter;
  connection errors   (refused, reset, timeout) exponential backoff with jitter;
  401, 403, 404       raise ApiFatalError at once: every request would fail the same way;
  other 4xx           the request fails (kind "http_4xx"), e.g. a prompt over the context;
  200 but unusable    the request fails with kind "malformed", "empty", "length" (cut by
                      max_tokens, when length_is_failure) or "latent_token"; not retried, since
                      the same request would mostly get the same reply, and a rerun of the job
                      retries it anyway (failures are never cached).

Transports: "openai" uses the official `openai` client (connection pooling, its HTTP stack);
"urllib" uses only the standard library; "auto" picks "openai" when it is installed.
"""
from __future__ import annotations

import concurrent.futures
import email.utils
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging

from latent_em import config_lib, formats
from latent_em.synthesis.backend import Request, Result, UsageStats

TRANSPORTS = ("auto", "openai", "urllib")
_MAX_RETRY_AFTER_S = 600.0
_RETRYABLE_STATUS = (408, 409)


class ApiFatalError(config_lib.ConfigError):
  """An error that every request would hit (bad key, unknown model or URL): stop the job."""


class _Reply(NamedTuple):
  """One HTTP attempt: status None means no HTTP response (connection error, timeout)."""
  status: int | None
  headers: Mapping[str, str]
  body: str
  error: str = ""


# --------------------------------------------------------------------------------- transports


class _OpenAITransport:
  """Posts through the `openai` client; returns the raw reply so that parsing is ours."""
  name = "openai"

  def __init__(self, base_url: str, api_key: str, timeout_s: float):
    import openai  # pylint: disable=g-import-not-at-top  (optional dependency)
    self._openai = openai
    # The client insists on a key; servers that need none ignore the placeholder.
    self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY",
                                 max_retries=0, timeout=timeout_s)

  def post(self, payload: dict[str, Any]) -> _Reply:
    body = dict(payload)
    known = {k: body.pop(k) for k in ("model", "messages", "temperature", "max_tokens")
             if k in body}
    try:
      raw = self._client.chat.completions.with_raw_response.create(
          **known, extra_body=body or None)
      return _Reply(raw.http_response.status_code, raw.headers, raw.http_response.text)
    except self._openai.APIStatusError as e:
      return _Reply(e.status_code, e.response.headers, _safe_text(e.response))
    except self._openai.APIConnectionError as e:  # APITimeoutError included
      return _Reply(None, {}, "", f"{type(e).__name__}: {e}")

  def close(self) -> None:
    self._client.close()


def _safe_text(response) -> str:
  try:
    return response.text
  except Exception:  # pylint: disable=broad-except  (a streamed/closed body has no text)
    return ""


class _UrllibTransport:
  """Posts with urllib (standard library only); one connection per request."""
  name = "urllib"

  def __init__(self, base_url: str, api_key: str, timeout_s: float):
    self._url = base_url + "/chat/completions"
    self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
      self._headers["Authorization"] = f"Bearer {api_key}"
    self._timeout_s = timeout_s

  def post(self, payload: dict[str, Any]) -> _Reply:
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(self._url, data=data, headers=self._headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
        return _Reply(response.status, response.headers, response.read().decode("utf-8",
                                                                                "replace"))
    except urllib.error.HTTPError as e:
      try:
        text = e.read().decode("utf-8", "replace")
      except Exception:  # pylint: disable=broad-except
        text = ""
      return _Reply(e.code, e.headers or {}, text)
    except (urllib.error.URLError, OSError, ValueError) as e:
      # URLError wraps refused connections; socket timeouts and resets are OSErrors; a
      # malformed status line from the server surfaces as http.client's ValueError subclasses.
      return _Reply(None, {}, "", f"{type(e).__name__}: {e}")
    except Exception as e:  # pylint: disable=broad-except  (http.client.HTTPException etc.)
      return _Reply(None, {}, "", f"{type(e).__name__}: {e}")

  def close(self) -> None:
    pass


def openai_available() -> bool:
  try:
    import openai  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


# --------------------------------------------------------------------------------- replies


def retry_after_s(headers: Mapping[str, str]) -> float | None:
  """Seconds the server asks us to wait (retry-after-ms, or Retry-After in seconds or as an
  HTTP date); None if it does not say."""
  ms = headers.get("retry-after-ms")
  if ms:
    try:
      return max(0.0, float(ms) / 1000.0)
    except ValueError:
      pass
  value = headers.get("retry-after")
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def parse_reply(body: str, length_is_failure: bool) -> Result:
  """Turns a 200 chat-completions body into a Result (usage counted even when it failed)."""
  try:
    data = json.loads(body)
  except json.JSONDecodeError as e:
    return Result(None, "malformed", f"the reply is not JSON ({e.msg}): {body[:200]!r}")
  if not isinstance(data, dict):
    return Result(None, "malformed", f"the reply is a JSON {type(data).__name__}, not an object")
  usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
  tokens = {k: v if isinstance(v, int) and not isinstance(v, bool) else 0
            for k, v in ((k, usage.get(k, 0)) for k in ("prompt_tokens", "completion_tokens"))}
  choices = data.get("choices")
  if not isinstance(choices, list) or not choices:
    error = data.get("error")
    why = f"server error {error!r}" if error else f"keys {sorted(data)}"
    return Result(None, "malformed", f"the reply has no choices ({why})", **tokens)
  choice = choices[0] if isinstance(choices[0], dict) else {}
  message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
  content = message.get("content")
  finish = choice.get("finish_reason")
  finish = finish if isinstance(finish, str) else None
  if isinstance(content, list):
    # Some servers return content parts: [{"type": "text", "text": ...}, ...].
    content = "".join(p.get("text", "") for p in content
                      if isinstance(p, dict) and isinstance(p.get("text"), str))
  if content is not None and not isinstance(content, str):
    return Result(None, "malformed", f"choices[0].message.content is "
                  f"{type(content).__name__}, not text", finish, **tokens)
  text = (content or "").strip()
  if not text:
    return Result(None, "empty", "the reply's content is empty", finish, **tokens)
  if finish == "length" and length_is_failure:
    return Result(None, "length", "the reply was cut by max_tokens (finish_reason 'length'); "
                  "raise config.synthesis.max_tokens or set length_is_failure=False", finish,
                  **tokens)
  token = formats.contains_latent_token(text)
  if token is not None:
    return Result(None, "latent_token", f"the reply contains the reserved token {token!r}",
                  finish, **tokens)
  return Result(text, None, "", finish, **tokens)


# --------------------------------------------------------------------------------- backend


class ApiBackend:
  """Concurrent chat completions with retries, usage accounting and a shared rate-limit pause.

  Args:
    base_url: the API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1";
      requests go to {base_url}/chat/completions.
    model: the model name sent with every request.
    api_key_env: environment variable that holds the API key; "" for servers that need none.
    max_concurrency: requests in flight at once (threads).
    max_retries: retries per request after the first attempt, for 429 / 5xx / connection errors.
    timeout_s: per-attempt HTTP timeout.
    temperature / max_tokens: sampling settings (part of the cache key).
    length_is_failure: treat finish_reason "length" (text cut by max_tokens) as a failure.
    backoff_base_s / backoff_max_s: delay before retry r (r = 0, 1, ...) is
      min(backoff_max_s, backoff_base_s * 2**r) * U(0.5, 1).
    extra_body: further request fields (e.g. {"top_p": 0.95, "seed": 0}); part of the cache key.
    transport: "auto", "openai" or "urllib" (see the module docstring).
  """

  def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
               max_concurrency: int = 8, max_retries: int = 6, timeout_s: float = 60.0,
               temperature: float = 1.0, max_tokens: int = 1024, length_is_failure: bool = True,
               backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
               extra_body: Mapping[str, Any] | None = None, transport: str = "auto"):
    if not base_url:
      raise config_lib.ConfigError("config.synthesis.base_url is empty; set it to the API root, "
                                   "e.g. 'https://api.openai.com/v1'")
    if not model:
      raise config_lib.ConfigError("config.synthesis.model is empty; name the teacher model")
    if transport not in TRANSPORTS:
      raise config_lib.ConfigError(
          f"config.synthesis.transport={transport!r} is not one of {list(TRANSPORTS)}")
    api_key = ""
    if api_key_env:
      api_key = os.environ.get(api_key_env, "")
      if not api_key:
        raise config_lib.ConfigError(
            f"config.synthesis.api_key_env={api_key_env!r} but ${api_key_env} is not set; "
            f"export it, or set config.synthesis.api_key_env='' for a server that needs no key")
    self.base_url = base_url.rstrip("/")
    self.model = model
    self.api_key_env = api_key_env
    self.max_concurrency = max(1, int(max_concurrency))
    self.max_retries = max(0, int(max_retries))
    self.temperature = float(temperature)
    self.max_tokens = int(max_tokens)
    self.length_is_failure = length_is_failure
    self.backoff_base_s = float(backoff_base_s)
    self.backoff_max_s = float(backoff_max_s)
    self.extra_body = dict(extra_body or {})
    if transport == "auto":
      transport = "openai" if openai_available() else "urllib"
    if transport == "openai" and not openai_available():
      raise config_lib.ConfigError(
          "config.synthesis.transport='openai' but the openai package is not installed; "
          "`pip install openai`, or set transport='urllib'")
    cls = _OpenAITransport if transport == "openai" else _UrllibTransport
    self.transport = cls(self.base_url, api_key, float(timeout_s))
    self.stats = UsageStats()
    self._pause_until = 0.0
    self._pause_lock = threading.Lock()
    self._abort = threading.Event()

  def identity(self) -> dict[str, Any]:
    return {"backend": "api", "base_url": self.base_url, "model": self.model,
            "temperature": self.temperature, "max_tokens": self.max_tokens,
            "extra_body": self.extra_body}

  def payload(self, request: Request) -> dict[str, Any]:
    out = {"model": self.model, "messages": list(request.messages),
           "temperature": self.temperature, "max_tokens": self.max_tokens}
    out.update(self.extra_body)
    return out

  def close(self) -> None:
    self.transport.close()

  # ------------------------------------------------------------------------------- retries

  def _backoff_s(self, retry: int) -> float:
    return min(self.backoff_max_s, self.backoff_base_s * 2 ** retry) * random.uniform(0.5, 1.0)

  def _pause_all(self, seconds: float) -> None:
    with self._pause_lock:
      self._pause_until = max(self._pause_until, time.monotonic() + seconds)

  def _sleep(self, seconds: float) -> None:
    if seconds > 0 and self._abort.wait(seconds):
      raise _Aborted()

  def _wait_for_pause(self) -> None:
    while True:
      with self._pause_lock:
        left = self._pause_until - time.monotonic()
      if left <= 0:
        return
      self._sleep(left)

  def complete(self, request: Request) -> Result:
    """Sends one request, retrying transient failures; raises ApiFatalError on 401/403/404."""
    payload = self.payload(request)
    last = ""
    for attempt in range(self.max_retries + 1):
      if attempt:
        self.stats.add("retries")
      self._wait_for_pause()
      self.stats.add("requests_sent")
      reply = self.transport.post(payload)
      status = reply.status
      if status is not None and 200 <= status < 300:
        result = parse_reply(reply.body, self.length_is_failure)
        self.stats.add("prompt_tokens", result.prompt_tokens)
        self.stats.add("completion_tokens", result.completion_tokens)
        if not result.ok:
          self.stats.fail(result.error)
          logging.log_every_n(logging.WARNING, "request %s failed (%s): %s", 50, request.tag,
                              result.error, result.detail)
        return result
      if status is None:
        self.stats.add("connection_errors")
        last = f"connection error: {reply.error}"
        delay = self._backoff_s(attempt)
      elif status == 429:
        self.stats.add("http_429")
        last = "HTTP 429 (rate limited)"
        asked = retry_after_s(reply.headers)
        if asked is not None:
          delay = min(asked, _MAX_RETRY_AFTER_S)
          self._pause_all(delay)  # the limit is shared: every worker waits
        else:
          delay = self._backoff_s(attempt)
      elif status >= 500 or status in _RETRYABLE_STATUS:
        self.stats.add("http_5xx")
        last = f"HTTP {status}: {reply.body[:200]!r}"
        delay = self._backoff_s(attempt)
      elif status in (401, 403):
        raise ApiFatalError(
            f"{self.base_url} refused the API key (HTTP {status}: {reply.body[:300]!r}); check "
            f"${self.api_key_env or '<none: config.synthesis.api_key_env is empty>'} "
            f"(config.synthesis.api_key_env)")
      elif status == 404:
        raise ApiFatalError(
            f"{self.base_url}/chat/completions answered HTTP 404 ({reply.body[:300]!r}); check "
            f"config.synthesis.base_url (the API root, usually ending in /v1) and "
            f"config.synthesis.model={self.model!r}")
      else:
        self.stats.fail("http_4xx")
        return Result(None, "http_4xx", f"HTTP {status}: {reply.body[:300]!r}")
      if attempt < self.max_retries:
        self._sleep(delay)
    self.stats.fail("retries_exhausted")
    return Result(None, "retries_exhausted",
                  f"gave up after {self.max_retries + 1} attempts; last: {last}")

  def generate(self, requests: Sequence[Request],
               on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    """Runs `requests` with at most max_concurrency in flight; results in request order."""
    results: list[Result | None] = [None] * len(requests)
    if not requests:
      return []
    self._abort.clear()
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=min(self.max_concurrency, len(requests)), thread_name_prefix="synthesis")
    futures = {pool.submit(self.complete, r): i for i, r in enumerate(requests)}
    try:
      for future in concurrent.futures.as_completed(futures):
        i = futures[future]
        results[i] = future.result()
        if on_result is not None:
          on_result(i, results[i])
    except BaseException:
      # A fatal error or Ctrl-C: drop queued requests and wake workers sleeping in backoff;
      # in-flight HTTP calls finish within timeout_s.
      self._abort.set()
      pool.shutdown(wait=False, cancel_futures=True)
      raise
    pool.shutdown(wait=True)
    return results  # type: ignore[return-value]


class _Aborted(Exception):
  """Raised inside workers when generate() is unwinding."""
