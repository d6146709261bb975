"""The one place that spells the latent tokens and every text layout (DESIGN.md §2, §4, §5).

All layouts are plain strings: the four latent tokens are user-defined symbols of the
tokenizer, so each encodes to exactly one id wherever it appears. BOS/EOS are ids, not text;
functions that need them say so and the tokenizer adds them.

Layouts, for a chunk x with thought z:
  prior form        SoL PRIOR z EoL x          (think, then write)
  posterior form    SoL EoL x SoL POST z EoL   (read, then explain)
  posterior prompt  [BOS] P SoL EoL X SoL POST (the E-step samples z after it)
  joint target      SoL PRIOR z EoL X          (scored after the context [BOS] P)
  latent answer     <question> SoL PRIOR       (evaluation: think, close, answer)
"""
from __future__ import annotations

import enum
from typing import Sequence

SOL = "<|START_OF_LATENT|>"
EOL = "<|END_OF_LATENT|>"
PRIOR = "<|PRIOR_PREFIX|>"
POST = "<|POSTERIOR_PREFIX|>"

# Order matters: the tokenizer appends them in this order, so their ids are V, V+1, V+2, V+3
# after a base vocabulary of size V.
LATENT_TOKENS: tuple[str, ...] = (SOL, EOL, PRIOR, POST)


class DocFormat(str, enum.Enum):
  """How a thought-augmented document is laid out for training."""
  RANDOM = "random"                  # each chunk: prior or posterior form, p = 1/2
  PRIOR_ONLY = "prior_only"
  POSTERIOR_ONLY = "posterior_only"
  PURE = "pure"                      # synthetic text alone (paraphrase baselines)
  RAW = "raw"                        # the original document


def prior_chunk(thought: str, chunk: str) -> str:
  """`SoL PRIOR z EoL x`: the model thinks, then writes the chunk."""
  return f"{SOL}{PRIOR}{thought}{EOL}{chunk}"


def posterior_chunk(thought: str, chunk: str) -> str:
  """`SoL EoL x SoL POST z EoL`: the model reads the chunk, then explains it."""
  return f"{SOL}{EOL}{chunk}{SOL}{POST}{thought}{EOL}"


def chunk_in_form(thought: str, chunk: str, use_prior: bool) -> str:
  return prior_chunk(thought, chunk) if use_prior else posterior_chunk(thought, chunk)


def document(
    chunks: Sequence[str],
    thoughts: Sequence[str | None],
    fmt: DocFormat | str,
    use_prior: Sequence[bool] | None = None,
) -> str:
  """Lays out one document (without BOS/EOS, which the tokenizer adds).

  Args:
    chunks: the document's chunks; joined they give the document byte for byte.
    thoughts: one thought per chunk; None means "no thought", and that chunk is kept raw.
    fmt: a DocFormat. For PURE, `thoughts` holds the synthetic text and `chunks` is ignored.
    use_prior: per-chunk coin flips for RANDOM (True = prior form); required for RANDOM.
  """
  fmt = DocFormat(fmt)
  if len(chunks) != len(thoughts) and fmt != DocFormat.PURE:
    raise ValueError(f"{len(chunks)} chunks but {len(thoughts)} thoughts")
  if fmt == DocFormat.RAW:
    return "".join(chunks)
  if fmt == DocFormat.PURE:
    return "".join(t for t in thoughts if t)
  if fmt == DocFormat.RANDOM:
    if use_prior is None or len(use_prior) != len(chunks):
      raise ValueError("DocFormat.RANDOM needs one coin flip per chunk in `use_prior`")
    flips = list(use_prior)
  else:
    flips = [fmt == DocFormat.PRIOR_ONLY] * len(chunks)
  parts = []
  for chunk, thought, prior in zip(chunks, thoughts, flips):
    parts.append(chunk if thought is None else chunk_in_form(thought, chunk, prior))
  return "".join(parts)


def posterior_prompt(prefix: str, suffix: str) -> str:
  """E-step prompt `P SoL EoL X SoL POST` (BOS is prepended by the tokenizer)."""
  return f"{prefix}{SOL}{EOL}{suffix}{SOL}{POST}"


def joint_target(thought: str, suffix: str) -> str:
  """The span scored for log p(z, X | P): `SoL PRIOR z EoL X`, after the context `BOS P`."""
  return prior_chunk(thought, suffix)


def posterior_prompt_ids(bos_id: int, prefix_ids: Sequence[int], suffix_ids: Sequence[int],
                         latent_ids: dict[str, int]) -> list[int]:
  """`posterior_prompt` on token ids: `BOS P SoL EoL X SoL POST` (`latent_ids`: token -> id,
  as Tokenizer.latent_ids)."""
  return ([bos_id, *prefix_ids, latent_ids[SOL], latent_ids[EOL], *suffix_ids,
           latent_ids[SOL], latent_ids[POST]])


def joint_ids(bos_id: int, prefix_ids: Sequence[int], thought_ids: Sequence[int],
              suffix_ids: Sequence[int], latent_ids: dict[str, int]
              ) -> tuple[list[int], list[int]]:
  """`joint_target` on token ids: (context `BOS P`, target `SoL PRIOR z EoL X`)."""
  return ([bos_id, *prefix_ids],
          [latent_ids[SOL], latent_ids[PRIOR], *thought_ids, latent_ids[EOL], *suffix_ids])


def latent_answer_prompt(prompt: str) -> str:
  """Evaluation prompt for thought-trained models: the model thinks, emits EoL, then answers."""
  return f"{prompt}{SOL}{PRIOR}"


def strip_latents(text: str) -> str:
  """Removes latent blocks from generated text, keeping what follows the last EoL."""
  if EOL in text:
    text = text.rsplit(EOL, 1)[1]
  for tok in LATENT_TOKENS:
    text = text.replace(tok, "")
  return text


def contains_latent_token(text: str) -> str | None:
  """Returns the first latent token found in `text`, or None (used to validate raw input)."""
  for tok in LATENT_TOKENS:
    if tok in text:
      return tok
  return None
