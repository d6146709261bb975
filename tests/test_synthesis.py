"""Teacher synthesis against a fake OpenAI-compatible server on 127.0.0.1 (no real network)."""
from __future__ import annotations

import collections
import hashlib
import http.server
import json
import os
import threading
import time

import pytest

from latent_em import config_lib, formats
from latent_em.data import records, sources
from latent_em.synthesis import api_backend, cache as cache_lib, job, prompts
from latent_em.synthesis.backend import Request, Result

# ----------------------------------------------------------------------------- fake server


def fake_thought(messages) -> str:
  """What the fake server answers: a digest of the whole prompt, so each chunk's is its own."""
  blob = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
  return "thought-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


COMPLETION_TOKENS = 5


class FakeServer:
  """Chat-completions server whose behaviour depends on markers in the prompt:

    RATELIMIT  first request with that prompt: 429 with Retry-After: 0
    WAIT       first request with that prompt: 429 with retry-after-ms: 300
    FLAKY      first request with that prompt: 500
    MALFORMED  always 200 without `choices` (usage still billed)
    ALWAYS500  always 500
    CUTOFF     finish_reason "length"
    BLANK      empty content
    LEAK       content holds a latent token
    TOOLONG    400 (a per-request client error)
  Otherwise it answers fake_thought(messages) with usage prompt_tokens = words in the prompt.
  """

  def __init__(self, delay_s: float = 0.0, api_key: str | None = None):
    self.lock = threading.Lock()
    self.seen: set[str] = set()
    self.requests: list[dict] = []
    self.statuses = collections.Counter()
    self.prompt_tokens = 0
    self.completion_tokens = 0
    self.inflight = 0
    self.max_inflight = 0
    self.delay_s = delay_s
    self.api_key = api_key
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):
        pass

      def do_POST(self):  # pylint: disable=invalid-name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
          server.inflight += 1
          server.max_inflight = max(server.max_inflight, server.inflight)
        try:
          time.sleep(server.delay_s)
          status, headers, reply = server.answer(self.path, self.headers, body)
        finally:
          with server.lock:
            server.inflight -= 1
        data = json.dumps(reply).encode("utf-8")
        self.send_response(status)
        for k, v in headers.items():
          self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    class Server(http.server.ThreadingHTTPServer):
      request_queue_size = 128   # the default backlog of 5 resets connections under load

    self.httpd = Server(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                   daemon=True)
    self.thread.start()

  def answer(self, path, headers, body):
    if path != "/v1/chat/completions":
      return 404, {}, {"error": {"message": f"no route {path}"}}
    if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
      return 401, {}, {"error": {"message": "invalid api key"}}
    prompt = "\n".join(m["content"] for m in body["messages"])
    with self.lock:
      self.requests.append(body)
      first = prompt not in self.seen
      self.seen.add(prompt)

    def reply(status, payload, headers=None):
      with self.lock:
        self.statuses[status] += 1
        if status == 200 and "usage" in payload:
          self.prompt_tokens += payload["usage"]["prompt_tokens"]
          self.completion_tokens += payload["usage"]["completion_tokens"]
      return status, headers or {}, payload

    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": COMPLETION_TOKENS}
    if "RATELIMIT" in prompt and first:
      return reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
    if "WAIT" in prompt and first:
      return reply(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "300"})
    if ("FLAKY" in prompt and first) or "ALWAYS500" in prompt:
      return reply(500, {"error": {"message": "internal"}})
    if "TOOLONG" in prompt:
      return reply(400, {"error": {"message": "context length exceeded"}})
    if "MALFORMED" in prompt:
      return reply(200, {"id": "x", "object": "chat.completion", "usage": usage})
    content, finish = fake_thought(body["messages"]), "stop"
    if "CUTOFF" in prompt:
      finish = "length"
    if "BLANK" in prompt:
      content = "  "
    if "LEAK" in prompt:
      content += formats.EOL
    return reply(200, {
        "id": "x", "object": "chat.completion", "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish}],
        "usage": usage})

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = FakeServer(delay_s=0.02)
  yield s
  s.close()


# ----------------------------------------------------------------------------- corpus

# One chunk per paragraph (see CHUNKING), so each marker sits in the last chunk of its document
# and no other chunk has it in its prefix.
DOCS = [
    "Alpha one.\n\nAlpha two has $\\frac{a}{b}$ and literal {x} braces.\n\nAlpha three.",
    "Beta one.\n\nBeta two RATELIMIT here.",
    "Gamma one.\n\nGamma two.\n\nGamma FLAKY end.",
    "Delta one.\n\nDelta MALFORMED end.",
    "Epsilon is a single paragraph.",
    "Zeta one.\n\nZeta two.",
    "Eta one.\n\nEta two.\n\nEta three.\n\nEta four.",
]
CHUNKING = {"unit": "paragraph", "min_units": 1, "avg_units": 1, "max_units": 1,
            "prefix_chunks": 1}


def write_corpus(path, docs=DOCS):
  with open(path, "w", encoding="utf-8") as f:
    for text in docs:
      f.write(json.dumps({"text": text, "meta": {}}) + "\n")
  return str(path)


def make_config(tmp_path, server, **overrides):
  section = {
      "model": "fake-teacher", "base_url": server.base_url, "api_key_env": "",
      "max_concurrency": 4, "max_retries": 3, "timeout_s": 10.0, "backoff_base_s": 0.001,
      "backoff_max_s": 0.01, "price_prompt_per_m": 2.0, "price_completion_per_m": 10.0,
      "input_files": [os.path.join(str(tmp_path), "corpus.jsonl")], "docs_per_shard": 3,
      "chunking": CHUNKING,
  }
  section.update(overrides)
  return {"synthesis": section}


def paragraphs(text):
  parts = text.split("\n\n")
  return [parts[0]] + ["\n\n" + p for p in parts[1:]]


def shard_records(workdir, num_shards):
  prefix = os.path.join(workdir, "synthesis", "shard")
  return list(records.read_records(records.shard_paths(prefix, num_shards)))


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("kind", prompts.KINDS)
def test_prompts_fill_every_placeholder(kind):
  prefix = "Earlier chunk with {braces} and $\\frac{1}{2}$."
  suffix = " Current chunk: $x^{2}$ {text}? no, literal."
  messages = prompts.build_messages(kind, prefix, suffix)
  assert [m["role"] for m in messages] == ["user"]
  content = messages[0]["content"]
  assert suffix in content
  # Only the literal braces from the chunks themselves remain.
  leftover = content.replace(prefix, "").replace(suffix, "")
  for name in ("prefix", "suffix", "text"):
    assert "{" + name + "}" not in leftover
  assert (prefix in content) == (kind == "latent_thoughts")
  first = prompts.build_messages(kind, "", suffix)[0]["content"]
  if kind == "latent_thoughts":
    assert prompts.PromptConfig().empty_prefix in first
  with_system = prompts.build_messages(kind, prefix, suffix, prompts.PromptConfig(system="Be brief."))
  assert with_system[0] == {"role": "system", "content": "Be brief."}
  assert with_system[1] == messages[0]


def test_prompt_template_validation_names_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"prompts\.latent_thoughts.*\{suffix\}"):
    prompts.PromptConfig(latent_thoughts="Context {prefix} only")
  with pytest.raises(config_lib.ConfigError, match=r"prompts\.wrap_qa.*unknown.*\{suffix\}"):
    prompts.PromptConfig(wrap_qa="{text} {suffix}")
  with pytest.raises(config_lib.ConfigError, match=r"prompts\.wrap_simple.*positional"):
    prompts.PromptConfig(wrap_simple="{} {text}")
  with pytest.raises(config_lib.ConfigError, match=r"prompts\.wrap_cot"):
    prompts.PromptConfig(wrap_cot="{text} {unclosed")
  # Through the job config, with a doubled literal brace and an optional {prefix}.
  cfg = config_lib.from_config(job.SynthesisConfig, {"prompts": {
      "wrap_cot": "Context: {prefix}\nRewrite {{verbatim}}: {text}"}}, "config.synthesis")
  content = prompts.build_messages("wrap_cot", "P.", "S.", cfg.prompts)[0]["content"]
  assert content == "Context: P.\nRewrite {verbatim}: S."
  assert prompts.source_tag("latent_thoughts") == "teacher"
  assert prompts.source_tag("wrap_encyclopedic") == "wrap:encyclopedic"


# ----------------------------------------------------------------------------- backend


def test_api_backend_failure_kinds_and_retries(server):
  backend = api_backend.ApiBackend(server.base_url, "fake", api_key_env="", max_concurrency=3,
                                   max_retries=2, backoff_base_s=0.001, backoff_max_s=0.002,
                                   transport="urllib")
  texts = ["fine", "ALWAYS500", "CUTOFF", "BLANK", "LEAK", "TOOLONG", "MALFORMED", "RATELIMIT"]
  reqs = [Request(({"role": "user", "content": t},), tag=t) for t in texts]
  seen = []
  results = backend.generate(reqs, on_result=lambda i, r: seen.append(i))
  assert sorted(seen) == list(range(len(texts)))
  by_text = dict(zip(texts, results))
  assert by_text["fine"].text == fake_thought(reqs[0].messages)
  assert by_text["RATELIMIT"].ok and by_text["RATELIMIT"].text == fake_thought(reqs[-1].messages)
  assert {t: r.error for t, r in by_text.items() if not r.ok} == {
      "ALWAYS500": "retries_exhausted", "CUTOFF": "length", "BLANK": "empty",
      "LEAK": "latent_token", "TOOLONG": "http_4xx", "MALFORMED": "malformed"}
  s = backend.stats.summary()
  # ALWAYS500: 1 + max_retries attempts; RATELIMIT: one retry; the rest: one attempt each.
  assert s["requests_sent"] == len(server.requests) == len(texts) + 2 + 1
  assert s["retries"] == 3 and s["http_429"] == 1 and s["http_5xx"] == 3
  assert s["failures"] == {"empty": 1, "http_4xx": 1, "latent_token": 1, "length": 1,
                           "malformed": 1, "retries_exhausted": 1}
  # Every 200 reply is billed, failed ones included.
  assert s["prompt_tokens"] == server.prompt_tokens > 0
  assert s["completion_tokens"] == server.completion_tokens == 6 * COMPLETION_TOKENS
  backend.close()

  lenient = api_backend.ApiBackend(server.base_url, "fake", api_key_env="",
                                   length_is_failure=False, transport="urllib")
  [cut] = lenient.generate([reqs[2]])
  assert cut.ok and cut.finish_reason == "length"


def test_api_backend_fatal_errors_and_key(monkeypatch):
  srv = FakeServer(api_key="sekrit")
  try:
    monkeypatch.setenv("FAKE_KEY", "wrong")
    backend = api_backend.ApiBackend(srv.base_url, "m", api_key_env="FAKE_KEY",
                                     transport="urllib")
    reqs = [Request(({"role": "user", "content": f"q{i}"},)) for i in range(20)]
    with pytest.raises(api_backend.ApiFatalError, match="FAKE_KEY"):
      backend.generate(reqs)
    monkeypatch.setenv("FAKE_KEY", "sekrit")
    ok = api_backend.ApiBackend(srv.base_url, "m", api_key_env="FAKE_KEY", transport="urllib")
    assert ok.generate(reqs[:1])[0].text == fake_thought(reqs[0].messages)
    wrong_url = api_backend.ApiBackend(srv.base_url[:-3], "m", api_key_env="FAKE_KEY",
                                       transport="urllib")
    with pytest.raises(api_backend.ApiFatalError, match="base_url"):
      wrong_url.generate(reqs[:1])
  finally:
    srv.close()
  monkeypatch.delenv("FAKE_KEY")
  with pytest.raises(config_lib.ConfigError, match=r"\$FAKE_KEY is not set"):
    api_backend.ApiBackend("http://127.0.0.1:1/v1", "m", api_key_env="FAKE_KEY")
  # Nothing listens there: connection errors are retried, then reported.
  dead = api_backend.ApiBackend("http://127.0.0.1:1/v1", "m", api_key_env="", max_retries=1,
                                backoff_base_s=0.001, timeout_s=2, transport="urllib")
  [r] = dead.generate([Request(({"role": "user", "content": "x"},))])
  assert r.error == "retries_exhausted" and dead.stats.connection_errors == 2


def test_api_backend_honours_retry_after(server):
  backend = api_backend.ApiBackend(server.base_url, "fake", api_key_env="", max_concurrency=2,
                                   backoff_base_s=0.001, backoff_max_s=0.001, transport="urllib")
  start = time.monotonic()
  [r] = backend.generate([Request(({"role": "user", "content": "WAIT"},))])
  # Backoff alone would wait ~1 ms: only the header explains the pause.
  assert r.ok and time.monotonic() - start >= 0.3
  assert backend.stats.http_429 == 1 and backend.stats.retries == 1


def test_retry_after_header_forms():
  assert api_backend.retry_after_s({"retry-after": "2.5"}) == 2.5
  assert api_backend.retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
  future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
  assert 25 < api_backend.retry_after_s({"retry-after": future}) <= 30
  assert api_backend.retry_after_s({}) is None
  assert api_backend.retry_after_s({"retry-after": "soon"}) is None


def test_local_backend_generates_with_our_sampler(tmp_path):
  """backend="local": greedy text from a checkpoint equals a manual greedy loop over forward."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from latent_em import model as model_lib
  from latent_em.synthesis.local_backend import LocalBackend, render_messages
  from test_estep import MODEL, make_assets
  corpus, tok, model_cfg, params = make_assets(str(tmp_path))
  backend = LocalBackend(model_cfg, params, tok, checkpoint="ckpt", temperature=0.0,
                         max_tokens=6, batch_size=2)
  reqs = [Request(tuple(prompts.build_messages("latent_thoughts", "", f"Fact {i}.")), f"r{i}")
          for i in range(3)]
  results = backend.generate(reqs)
  assert len(results) == 3 and backend.stats.requests_sent == 3
  banned = set(tok.latent_ids.values())
  ids = tok.encode(render_messages(reqs[1].messages), bos=True)
  expect = []
  for _ in range(6):
    logits = model_lib.forward(model_cfg, params, jnp.asarray([ids]))[0, -1]
    logits = logits.at[jnp.asarray(sorted(banned | {tok.bos_id, tok.pad_id}
                                          | set(range(tok.vocab_size, model_cfg.vocab_size))))
                       ].set(-1e30)
    nxt = int(jnp.argmax(logits))
    if nxt == tok.eos_id:
      break
    expect.append(nxt)
    ids = ids + [nxt]
  assert results[1].text == tok.decode(expect).strip() or results[1].error == "empty"


@pytest.mark.slow
def test_local_backend_job(tmp_path):
  """The synthesize job with backend="local": config.synthesis.model names the checkpoint."""
  import ml_collections
  from test_estep import MODEL, make_assets
  corpus, tok, model_cfg, params = make_assets(str(tmp_path))
  config = {"synthesis": {"backend": "local", "model": os.path.join(str(tmp_path), "params"),
                          "temperature": 0.0, "max_tokens": 6, "input_files": [corpus],
                          "docs_per_shard": 3, "chunking": CHUNKING},
            "model": ml_collections.ConfigDict(dict(vocab_size=384, **MODEL)).to_dict(),
            "tokenizer": {"path": os.path.join(str(tmp_path), "tokenizer.model")}}
  summary = job.run(ml_collections.ConfigDict(config), str(tmp_path / "work"))
  assert summary["docs"] == 6 and summary["chunks"] >= 6
  recs = shard_records(str(tmp_path / "work"), 2)
  assert all(formats.SOL not in (c.thought or "") for r in recs for c in r.chunks)


# ----------------------------------------------------------------------------- cache


class CountingBackend:
  """Answers "A:<content>", fails for contents starting with "fail"; counts calls."""

  def __init__(self):
    from latent_em.synthesis.backend import UsageStats
    self.stats = UsageStats()
    self.sent = []

  def identity(self):
    return {"backend": "counting"}

  def generate(self, requests, on_result=None):
    out = []
    for i, r in enumerate(requests):
      content = r.messages[-1]["content"]
      self.sent.append(content)
      res = (Result(None, "malformed") if content.startswith("fail")
             else Result("A:" + content, prompt_tokens=1))
      out.append(res)
      if on_result:
        on_result(i, res)
    return out


def test_cache_hits_dedups_and_never_stores_failures(tmp_path):
  inner = CountingBackend()
  cached = cache_lib.CachingBackend(inner, cache_lib.RequestCache(str(tmp_path / "c")))
  reqs = [Request(({"role": "user", "content": c},)) for c in ["a", "b", "a", "fail1"]]
  first = cached.generate(reqs)
  assert inner.sent == ["a", "b", "fail1"]   # the duplicate "a" is sent once
  assert [r.text for r in first] == ["A:a", "A:b", "A:a", None]
  assert [r.cached for r in first] == [False, False, True, False]
  second = cached.generate(reqs)
  assert inner.sent == ["a", "b", "fail1", "fail1"]   # only the failure is re-sent
  assert [r.text for r in second] == ["A:a", "A:b", "A:a", None]
  assert all(r.cached for r in second[:3])
  fail_key = cache_lib.request_key(inner.identity(), reqs[3].messages)
  assert not os.path.exists(cached.cache.path(fail_key))
  # A corrupt entry (e.g. after a power loss) is a miss, and is rewritten.
  key = cache_lib.request_key(inner.identity(), reqs[1].messages)
  with open(cached.cache.path(key), "w") as f:
    f.write('{"key": "tr')
  assert cached.generate(reqs[1:2])[0].text == "A:b" and inner.sent[-1] == "b"
  assert cached.cache.get(key)["text"] == "A:b"
  # The key covers the backend identity: another model misses.
  assert key != cache_lib.request_key({"backend": "other"}, reqs[1].messages)


def test_cache_concurrent_writers(tmp_path):
  cache = cache_lib.RequestCache(str(tmp_path / "c"))
  keys = [cache_lib.request_key({}, [{"n": i % 5}]) for i in range(200)]

  def write(i):
    cache.put(keys[i], {"text": f"t{i % 5}"})

  threads = [threading.Thread(target=write, args=(i,)) for i in range(200)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for i in range(5):
    assert cache.get(keys[i])["text"] == f"t{i}"
  leftovers = [n for _, _, files in os.walk(tmp_path) for n in files if n.endswith(".tmp")]
  assert leftovers == []


# ----------------------------------------------------------------------------- the job


def expected_pairs(text):
  chunks = paragraphs(text)
  return [("" if i == 0 else chunks[i - 1], c) for i, c in enumerate(chunks)]


@pytest.mark.parametrize("transport", ["urllib", "openai"])
def test_job_end_to_end_rerun_and_cache(tmp_path, server, transport):
  if transport == "openai" and not api_backend.openai_available():
    pytest.skip("the openai package is not installed")
  write_corpus(tmp_path / "corpus.jsonl")
  workdir = str(tmp_path / "work")
  config = make_config(tmp_path, server, transport=transport)
  summary = job.run(config, workdir)

  recs = shard_records(workdir, 3)
  # Ids name the file relative to its folder, never the absolute path (see sources.read_docs).
  assert [r.doc_id for r in recs] == [f"corpus.jsonl:{i}" for i in range(1, len(DOCS) + 1)]
  n_chunks = 0
  for rec, text in zip(recs, DOCS):
    assert rec.text == text
    assert "".join(c.suffix for c in rec.chunks) == text
    assert [(c.prefix, c.suffix) for c in rec.chunks] == expected_pairs(text)
    for c in rec.chunks:
      n_chunks += 1
      assert c.source == "teacher"
      if "MALFORMED" in c.suffix:
        assert c.thought is None and not c.ended
      else:
        assert c.thought == fake_thought(prompts.build_messages(
            "latent_thoughts", c.prefix, c.suffix)) and c.ended
    assert rec.meta["synthesis"]["failed_chunks"] == int("MALFORMED" in text)

  # Every prompt was fully filled, and LaTeX braces reached the teacher intact.
  sent = [m["content"] for body in server.requests for m in body["messages"]]
  assert not any(p in s for s in sent for p in ("{prefix}", "{suffix}", "{text}"))
  assert any("$\\frac{a}{b}$ and literal {x} braces" in s for s in sent)
  assert all(body["model"] == "fake-teacher" for body in server.requests)
  assert 1 < server.max_inflight <= 4

  api = summary["api"]
  assert summary["docs"] == summary["docs_written"] == len(DOCS)
  assert summary["chunks"] == n_chunks and summary["chunks_failed"] == 1
  assert summary["chunks_with_thought"] == n_chunks - 1
  assert summary["docs_with_failures"] == 1 and summary["docs_dropped"] == 0
  assert summary["failed_chunks_by_kind"] == {"malformed": 1}
  assert summary["transport"] == transport
  assert api["requests_sent"] == len(server.requests) == n_chunks + 2
  assert api["http_429"] == 1 and api["http_5xx"] == 1 and api["retries"] == 2
  assert api["failures"] == {"malformed": 1} and api["cache_hits"] == 0
  assert api["prompt_tokens"] == server.prompt_tokens
  assert api["completion_tokens"] == server.completion_tokens == n_chunks * COMPLETION_TOKENS
  assert api["cost_usd"] == pytest.approx(
      (server.prompt_tokens * 2.0 + server.completion_tokens * 10.0) / 1e6)
  assert summary["input"]["docs_kept"] == len(DOCS)
  assert summary["shards_written"] == 3 and summary["wall_time_s"] > 0
  on_disk = json.load(open(os.path.join(workdir, "synthesis", "summary.json")))
  assert on_disk["api"] == api

  # Rerun: finished shards are neither recomputed nor rewritten; nothing is sent.
  paths = records.shard_paths(os.path.join(workdir, "synthesis", "shard"), 3)
  stamps = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths]
  sent_before = len(server.requests)
  again = job.run(config, workdir)
  assert len(server.requests) == sent_before
  assert [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths] == stamps
  assert again["shards_skipped"] == 3 and again["api"]["requests_sent"] == 0
  assert again["chunks"] == n_chunks and again["chunks_failed"] == 1

  # Lost shards are redone from the cache: only the failed request is sent again.
  for p in paths:
    os.remove(p)
  billed_before = server.prompt_tokens
  redo = job.run(config, workdir)
  assert len(server.requests) == sent_before + 1
  assert redo["api"]["cache_hits"] == n_chunks - 1 and redo["api"]["requests_sent"] == 1
  assert redo["api"]["prompt_tokens"] == server.prompt_tokens - billed_before > 0
  assert [(r.doc_id, r.chunks) for r in shard_records(workdir, 3)] == [
      (r.doc_id, r.chunks) for r in recs]

  # Different sampling settings cannot be mixed into the same shards.
  with pytest.raises(config_lib.ConfigError, match="temperature|backend"):
    job.run(make_config(tmp_path, server, transport=transport, temperature=0.1), workdir)


def test_job_wrap_kind_and_drop_doc(tmp_path, server):
  write_corpus(tmp_path / "corpus.jsonl")
  workdir = str(tmp_path / "work")
  config = make_config(tmp_path, server, kind="wrap_qa", on_failure="drop_doc",
                       max_concurrency=1, num_shards=2)
  summary = job.run(config, workdir)
  assert server.max_inflight == 1
  recs = shard_records(workdir, 2)
  kept = [t for t in DOCS if "MALFORMED" not in t]
  assert [r.text for r in recs] == kept
  for rec in recs:
    for c in rec.chunks:
      assert c.source == "wrap:qa"
      assert c.thought == fake_thought(prompts.build_messages("wrap_qa", "", c.suffix))
  # WRAP prompts carry the chunk alone: exactly one request per distinct chunk text.
  sent = {body["messages"][0]["content"] for body in server.requests}
  assert sent == {prompts.build_messages("wrap_qa", "", c)[0]["content"]
                  for t in DOCS for c in paragraphs(t)}
  assert summary["docs"] == len(DOCS) and summary["docs_dropped"] == 1
  assert summary["docs_written"] == len(kept) and summary["source"] == "wrap:qa"


def test_job_bad_input_policy(tmp_path, server):
  path = tmp_path / "corpus.jsonl"
  lines = [
      json.dumps({"text": "Good one.\n\nStill good."}),
      "{not json",
      json.dumps({"body": "no text field"}),
      json.dumps({"text": 7}),
      json.dumps({"text": "   "}),
      "",
      json.dumps({"text": f"Has a {formats.EOL} token."}),
      json.dumps({"text": "Good two."}),
  ]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  summary = job.run(make_config(tmp_path, server), str(tmp_path / "skip"))
  assert summary["input"] == {
      "docs_read": 7, "docs_kept": 2, "malformed_json": 1, "malformed_record": 0,
      "missing_field": 1, "non_string_field": 1, "invalid_utf8": 0, "empty": 1,
      "too_long": 0, "latent_token": 1, "skipped": 5}
  recs = shard_records(str(tmp_path / "skip"), 1)
  assert [r.doc_id.rsplit(":", 1)[1] for r in recs] == ["1", "8"]
  assert summary["chunks"] == 3 and summary["chunks_failed"] == 0

  sent = len(server.requests)
  with pytest.raises(sources.BadInputError, match=r"corpus\.jsonl:2"):
    job.run(make_config(tmp_path, server, on_bad_input="fail"), str(tmp_path / "fail"))
  assert len(server.requests) == sent   # stopped before any request


def test_job_config_errors(tmp_path, server):
  with pytest.raises(config_lib.ConfigError, match="input_files is empty"):
    job.run(make_config(tmp_path, server, input_files=[]), str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="nope"):
    job.run(make_config(tmp_path, server, input_files=[str(tmp_path / "nope.jsonl")]),
            str(tmp_path / "w"))
  with pytest.raises(config_lib.ConfigError, match="on_failure"):
    job.run(make_config(tmp_path, server, on_failure="ignore"), str(tmp_path / "w"))
  assert server.requests == []
