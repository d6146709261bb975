"""Teacher text from one of our own checkpoints, through the JAX sampler.

Chat messages are rendered as plain text (each message's content, separated by blank lines,
followed by a blank line), which suits base language models; generation stops at EOS or after
`max_tokens`. Latent tokens are banned, so the output is plain text.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_em import model as model_lib
from latent_em.sampling import sampler as sampler_lib
from latent_em.synthesis.backend import Request, Result, UsageStats


def render_messages(messages: Sequence[dict]) -> str:
  return "\n\n".join(m["content"] for m in messages) + "\n\n"


class LocalBackend:
  """Generates one text per request with `model_cfg`/`params` (batched, greedy or sampled)."""

  def __init__(self, model_cfg: model_lib.ModelConfig, params: Any, tokenizer, *,
               checkpoint: str, temperature: float = 1.0, max_tokens: int = 256,
               batch_size: int = 8, max_prompt_len: int = 1024, seed: int = 0):
    self.tok = tokenizer
    self.params = params
    self.checkpoint = checkpoint
    self.temperature = temperature
    self.max_tokens = max_tokens
    self.batch_size = batch_size
    self.max_prompt_len = max_prompt_len
    self.seed = seed
    self.stats = UsageStats()
    banned = tuple(sorted(set(tokenizer.latent_ids.values())
                          | set(range(tokenizer.vocab_size, model_cfg.vocab_size))
                          | {tokenizer.bos_id, tokenizer.pad_id}))
    cfg = sampler_lib.SamplingConfig(temperature=temperature, max_gen_len=max_tokens,
                                     banned_ids=banned)
    self.sampler = sampler_lib.Sampler(sampler_lib.DecodeModel.for_model(model_cfg), cfg,
                                       stop_ids=(tokenizer.eos_id,))

  def identity(self) -> dict[str, Any]:
    return {"backend": "local", "model": self.checkpoint, "temperature": self.temperature,
            "max_tokens": self.max_tokens, "seed": self.seed}

  def generate(self, requests: Sequence[Request],
               on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    results: list[Result] = []
    for start in range(0, len(requests), self.batch_size):
      batch = requests[start:start + self.batch_size]
      prompts = []
      for r in batch:
        ids = self.tok.encode(render_messages(r.messages), bos=True)
        if len(ids) > self.max_prompt_len:   # keep the end: the instruction and the chunk
          ids = [self.tok.bos_id] + ids[-(self.max_prompt_len - 1):]
        prompts.append(ids)
      longest = max(len(p) for p in prompts)
      bucket = sampler_lib.bucket_length(longest, sampler_lib.default_buckets(
          self.max_prompt_len))
      arr = np.zeros((self.batch_size, bucket), np.int32)
      lens = np.ones((self.batch_size,), np.int32)
      arr[:, 0] = self.tok.bos_id
      for i, p in enumerate(prompts):
        arr[i, :len(p)] = p
        lens[i] = len(p)
      # Seed from the requests so a rerun regenerates the same text for the same prompts.
      digest = hashlib.blake2b("".join(r.tag + str(r.messages) for r in batch).encode(),
                               digest_size=4).digest()
      rng = jax.random.fold_in(jax.random.key(self.seed), int.from_bytes(digest, "little"))
      out = jax.device_get(self.sampler(self.params, jnp.asarray(arr), jnp.asarray(lens), rng))
      for i, p in enumerate(prompts):
        n = int(out.lengths[i])
        ids = out.tokens[i, :n].tolist()
        finished = bool(out.finished[i])
        text = self.tok.decode(ids[:-1] if finished else ids).strip()
        self.stats.add("requests_sent")
        self.stats.add("prompt_tokens", len(p))
        self.stats.add("completion_tokens", n)
        if not text:
          res = Result(None, error="empty", detail="the model generated no text",
                       finish_reason="stop" if finished else "length")
          self.stats.fail("empty")
        else:
          res = Result(text, finish_reason="stop" if finished else "length",
                       prompt_tokens=len(p), completion_tokens=n)
        results.append(res)
        if on_result is not None:
          on_result(start + i, res)
    return results
