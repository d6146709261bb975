"""Teacher prompts: latent thoughts (DESIGN.md §5) and the WRAP / WRAP-CoT paraphrase baselines.

Every template is a `str.format` string. The latent-thought template takes `{prefix}` (the
chunks before the current one) and `{suffix}` (the current chunk); the WRAP templates take
`{text}` (the current chunk) and may also use `{prefix}`. Literal braces in a template must be
doubled (`{{` / `}}`); braces inside the document text need no escaping, since substituted
values are never re-parsed.
"""
from __future__ import annotations

import dataclasses
import string

from latent_em import config_lib

KINDS = ("latent_thoughts", "wrap_simple", "wrap_scholarly", "wrap_encyclopedic", "wrap_qa",
         "wrap_cot")

_THOUGHTS = """\
Below is the beginning of a document, then the passage that follows it. Write down the \
thoughts that underlie the passage: the background knowledge a reader needs but the passage \
leaves out, and the reasoning behind each claim it makes. Derive every calculation, equation \
and logical step step by step, so that a reader can check it.

Rules for your answer:
- Use concise, declarative language.
- Plain text only: no markdown, no headings, no bullet lists.
- Do not refer to "the beginning", "the passage", "the prefix" or "the suffix"; state the \
thoughts themselves.
- Do not repeat the beginning of the document.

Beginning of the document:
{prefix}

Passage:
{suffix}

Thoughts:"""

_WRAP_SIMPLE = """\
Paraphrase the following text using a very small vocabulary and very short, simple sentences \
that a toddler could understand. Keep every fact and number. Answer with the paraphrase only.

Text:
{text}"""

_WRAP_SCHOLARLY = """\
Paraphrase the following text in high-quality scholarly English, as an erudite scholar would \
write it: replace common words and phrases with rare and precise ones. Keep every fact and \
number. Answer with the paraphrase only.

Text:
{text}"""

_WRAP_ENCYCLOPEDIC = """\
Paraphrase the following text in the high-quality encyclopedic style of a Wikipedia article. \
Keep every fact and number. Answer with the paraphrase only.

Text:
{text}"""

_WRAP_QA = """\
Convert the following text into a dialogue of questions and answers, each question on a line \
starting with "Question:" and followed by a line starting with "Answer:". Cover every fact and \
number in the text. Answer with the dialogue only.

Text:
{text}"""

_WRAP_COT = """\
Paraphrase the following text, and wherever it states a result, a claim or a calculation, \
insert the step-by-step reasoning that leads to it. Keep every fact and number. Answer with the \
paraphrase only, in plain text without markdown.

Text:
{text}"""

# Placeholders each template must contain, and those it may contain.
_REQUIRED = {"latent_thoughts": {"prefix", "suffix"}}
_ALLOWED = {"latent_thoughts": {"prefix", "suffix"}}
for _kind in KINDS[1:]:
  _REQUIRED[_kind] = {"text"}
  _ALLOWED[_kind] = {"text", "prefix"}


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """`config.synthesis.prompts`: one chat prompt template per synthesis kind.

  Attributes:
    system: optional system message ("" = send only the user message).
    empty_prefix: what `{prefix}` becomes for a document's first chunk, which has no prefix.
    latent_thoughts: teacher thoughts for a (prefix, suffix) pair; needs {prefix} and {suffix}.
    wrap_simple / wrap_scholarly / wrap_encyclopedic / wrap_qa: the four WRAP rewrites of the
      chunk {text}.
    wrap_cot: paraphrase of {text} with step-by-step reasoning inserted.
  """
  system: str = ""
  empty_prefix: str = "(nothing: the passage starts the document)"
  latent_thoughts: str = _THOUGHTS
  wrap_simple: str = _WRAP_SIMPLE
  wrap_scholarly: str = _WRAP_SCHOLARLY
  wrap_encyclopedic: str = _WRAP_ENCYCLOPEDIC
  wrap_qa: str = _WRAP_QA
  wrap_cot: str = _WRAP_COT

  def __post_init__(self):
    for kind in KINDS:
      check_template(getattr(self, kind), kind)


def placeholders(template: str) -> set[str]:
  """The `{name}` fields of a format string; raises ValueError on `{}`, `{0}` or bad braces."""
  names = set()
  for _, name, _, _ in string.Formatter().parse(template):
    if name is None:
      continue
    if not name or name.isdigit():
      raise ValueError("positional fields ({} or {0}) are not allowed; name them")
    names.add(name)
  return names


def check_template(template: str, kind: str) -> None:
  """Raises ConfigError naming config.synthesis.prompts.<kind> if the template is unusable."""
  key = f"config.synthesis.prompts.{kind}"
  try:
    names = placeholders(template)
  except ValueError as e:
    raise config_lib.ConfigError(
        f"{key}: {e}; write literal braces as '{{{{' and '}}}}'") from None
  missing = _REQUIRED[kind] - names
  unknown = names - _ALLOWED[kind]
  config_lib.check(not missing, key, f"the template lacks "
                   f"{', '.join('{' + m + '}' for m in sorted(missing))}; add it where the "
                   f"text should go")
  config_lib.check(not unknown, key, f"unknown placeholder "
                   f"{', '.join('{' + u + '}' for u in sorted(unknown))}; allowed: "
                   f"{', '.join('{' + a + '}' for a in sorted(_ALLOWED[kind]))} (write literal "
                   f"braces as '{{{{' and '}}}}')")


def source_tag(kind: str) -> str:
  """ChunkRecord.source for a kind: "teacher" for thoughts, "wrap:<style>" for paraphrases."""
  if kind == "latent_thoughts":
    return "teacher"
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
  return "wrap:" + kind[len("wrap_"):]


def build_messages(kind: str, prefix: str, suffix: str,
                   cfg: PromptConfig | None = None) -> list[dict]:
  """Chat-completions messages for one chunk.

  Args:
    kind: one of KINDS.
    prefix: the chunks before this one ("" for the first chunk).
    suffix: this chunk; WRAP kinds paraphrase it.
    cfg: the prompt templates (default: PromptConfig()).
  Returns:
    [{"role": "system", ...}] (only when cfg.system is set) + [{"role": "user", "content": ...}].
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
  cfg = cfg or PromptConfig()
  shown_prefix = prefix if prefix.strip() else cfg.empty_prefix
  values = {"prefix": shown_prefix}
  if kind == "latent_thoughts":
    values["suffix"] = suffix
  else:
    values["text"] = suffix
  messages = []
  if cfg.system:
    messages.append({"role": "system", "content": cfg.system})
  messages.append({"role": "user", "content": getattr(cfg, kind).format(**values)})
  return messages
