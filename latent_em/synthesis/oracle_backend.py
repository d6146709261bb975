"""The built-in corpus' teacher as a synthesis backend (`config.synthesis.backend = "oracle"`).

For the embedded math corpus (`data/mathcorpus.py`) a rule-based oracle knows the working behind
every derived quantity. It plays the strong teacher of the warm start in the CPU demo, through
the same synthesis job (shards, summary, record format) that calls a chat model for real corpora.
It reads `Request.context` (the whole text before the chunk, and the chunk), not the prompt, so
the prompt templates do not matter to it; it is free and deterministic, so nothing is cached.

Kinds: `latent_thoughts` (the working for the chunk; no text when the chunk derives nothing)
and `wrap_cot` (the chunk with the working written before each derived sentence). The four
style paraphrases of WRAP need a language model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from latent_em import config_lib
from latent_em.data import mathcorpus
from latent_em.synthesis.backend import Request, Result, UsageStats

KINDS = ("latent_thoughts", "wrap_cot")


class OracleBackend:
  """Rule-based teacher for the built-in math corpus."""

  cacheable = False

  def __init__(self, kind: str):
    config_lib.check(kind in KINDS, "config.synthesis.kind",
                     f"the oracle backend writes {list(KINDS)}, not {kind!r}; the WRAP style "
                     "paraphrases need backend 'api' or 'local'")
    self.kind = kind
    self.stats = UsageStats()

  def identity(self) -> dict[str, Any]:
    return {"backend": "oracle", "model": "mathcorpus-oracle", "kind": self.kind}

  def _one(self, request: Request) -> Result:
    ctx = request.context
    if not ctx or "suffix" not in ctx:
      raise ValueError(f"{request.tag}: the oracle backend needs Request.context (set by the "
                       "synthesis job)")
    prefix, suffix = ctx.get("document_prefix", ""), ctx["suffix"]
    if self.kind == "latent_thoughts":
      # None: the chunk states nothing derived, so there is nothing to think; the chunk is kept
      # without a thought (not a failure).
      return Result(mathcorpus.oracle_thought(prefix, suffix), finish_reason="stop")
    return Result(mathcorpus.oracle_cot(prefix, suffix), finish_reason="stop")

  def generate(self, requests: Sequence[Request],
               on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    out = []
    for i, request in enumerate(requests):
      result = self._one(request)
      self.stats.add("requests_sent")
      out.append(result)
      if on_result is not None:
        on_result(i, result)
    return out
