"""Splitting a document into chunks and (prefix, suffix) pairs (DESIGN.md §3).

A document is cut into units (sentences by default; also paragraphs or words) such that
`"".join(units) == text` byte for byte. Whitespace between two units travels with the
*following* unit, so every unit after the first starts with the whitespace that separated it
from its predecessor; leading whitespace of the document stays with the first unit and trailing
whitespace with the last. Every unit holds at least one non-whitespace character.

Consecutive units are grouped into chunks of `min_units + Poisson(avg_units - min_units)` units,
capped at `max_units`; the last chunk takes what is left (so it may be shorter than
`min_units`). The RNG is seeded from a stable hash of the document text plus `seed`, so the
chunks of a document depend only on (text, seed), never on the process, host or shard that
chunks it.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import re
from typing import Any, Sequence

import numpy as np

from latent_em import config_lib

UNITS = ("sentence", "paragraph", "word")


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """`config.chunking`: how documents are cut into chunks.

  Attributes:
    unit: "sentence", "paragraph" or "word".
    min_units / avg_units / max_units: chunk length law, in units (see module docstring).
    prefix_chunks: how many preceding chunks form the prefix of a (prefix, suffix) pair
      (1 for teacher prompts, 3 for the E-step).
    seed: added to the text hash; changing it re-draws every document's chunk lengths.
    break_after: a regular expression; a chunk always ends right after each of its matches
      (which also ends a unit there), and lengths are drawn afresh after it. "" = none. For
      question-answer text, r"\nAnswer:" puts a thought between a question and its answer,
      where the latent evaluation prompt asks the model to think.
    context_until: a regular expression; the text through the end of its first match is one
      chunk, the document's context: it is the prefix of the chunks after it but is not itself
      explained (`ChunkPair.context`: the E-step gives it no thought, so training keeps it as
      raw text). For question-answer text, r"\nAnswer:" makes the question context and the
      answer the one chunk that gets a thought. "" = none.
  """
  unit: str = "sentence"
  min_units: int = 1
  avg_units: int = 8
  max_units: int = 20
  prefix_chunks: int = 3
  seed: int = 0
  break_after: str = ""
  context_until: str = ""

  def __post_init__(self):
    key = "config.chunking"
    config_lib.check(self.unit in UNITS, f"{key}.unit",
                     f"{self.unit!r} is not one of {list(UNITS)}")
    config_lib.check(self.min_units >= 1, f"{key}.min_units",
                     f"must be >= 1, got {self.min_units}")
    config_lib.check(self.min_units <= self.avg_units <= self.max_units, f"{key}.avg_units",
                     f"need min_units <= avg_units <= max_units, got "
                     f"{self.min_units} / {self.avg_units} / {self.max_units}")
    config_lib.check(self.prefix_chunks >= 0, f"{key}.prefix_chunks",
                     f"must be >= 0, got {self.prefix_chunks}")
    for name in ("break_after", "context_until"):
      value = getattr(self, name)
      try:
        pattern = re.compile(value)
      except re.error as e:
        raise config_lib.ConfigError(f"{key}.{name}: {value!r} is not a regular "
                                     f"expression ({e})") from None
      config_lib.check(not value or not pattern.match(""), f"{key}.{name}",
                       f"{value!r} matches the empty string; it must match text")


def _as_config(cfg: Any) -> ChunkConfig:
  return config_lib.from_config(ChunkConfig, cfg, "config.chunking")


# ---------------------------------------------------------------------------------------------
# Units.

# A sentence ends with a run of terminators, optionally followed by closing quotes/brackets,
# before whitespace. The boundary is the end of the match: the whitespace starts the next unit.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u2019\u201d\u00bb)\]}]*(?=\s)")
# CJK full stops end a sentence without any whitespace after them.
_CJK_END = re.compile(r"[\u3002\uff01\uff1f]+[\"'\u2019\u201d\u300d\u300f)\uff09]*")
_WHITESPACE = re.compile(r"\s+")

# Words after which a period does not end a sentence. Single letters are deliberately absent:
# in math prose "... at the point A. Then ..." ends a sentence.
_ABBREVIATIONS = frozenset("""
    e.g i.e mr mrs ms dr prof sr jr st vs cf fig figs eq eqs resp approx ch chap sec sect
    thm prop lem cor def defn rem al viz vol eds ref refs inc ltd
""".split())
# Dotted initialisms such as "U.S", "a.m", "e.g".
_INITIALISM = re.compile(r"^(?:[^\W\d_]\.)+[^\W\d_]$")
_LIST_MARKER = re.compile(r"\d{1,3}|[a-z]|[ivx]{1,4}")

# Math spans inside which a period never ends a sentence. Lengths are bounded so that an
# unclosed delimiter costs a bounded scan instead of a pass over the rest of the document.
_MATH = re.compile(
    r"\$\$.{0,4000}?\$\$"
    r"|\\\[.{0,4000}?\\\]"
    r"|\\\(.{0,2000}?\\\)"
    r"|\\begin\{(equation|align|alignat|gather|multline|eqnarray|displaymath|math)(\*?)\}"
    r".{0,8000}?\\end\{\1\2\}"
    # Inline $...$ (pandoc's rule): the opener is not followed by a space and the closer is not
    # preceded by a space nor followed by a digit, so "$5. Then he paid $10" is not math.
    r"|(?<!\\)\$(?=[^\s$])(?:\\.|[^\\$]){0,2000}?(?<![\s\\])\$(?!\d)",
    re.DOTALL)
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_MATH_CLOSER = re.compile(r"(?:\$\$|\$|\\\]|\\\)|\\end\{[^}]*\})$")


def _math_spans(text: str) -> list[tuple[int, int]]:
  """Non-overlapping [start, end) spans of LaTeX math, in order."""
  spans = []
  pos = 0
  while True:
    m = _MATH.search(text, pos)
    if m is None:
      return spans
    span = m.group(0)
    # Inline math never crosses a paragraph break: such a match pairs two unrelated dollars.
    if span.startswith("$") and not span.startswith("$$") and _BLANK_LINE.search(span):
      pos = m.start() + 1
      continue
    spans.append((m.start(), m.end()))
    pos = m.end()


def _inside(spans: list[tuple[int, int]], starts: list[int], pos: int) -> bool:
  """Whether `pos` lies strictly inside one of `spans` (`starts` = their start offsets)."""
  i = bisect.bisect_right(starts, pos) - 1
  return i >= 0 and spans[i][0] < pos < spans[i][1]


def _line_breaks(s: str) -> int:
  return s.count("\n") + s.count("\r") - s.count("\r\n")


def _paragraph_breaks(text: str) -> list[int]:
  """Starts of whitespace runs that contain a blank line."""
  return [m.start() for m in _WHITESPACE.finditer(text) if _line_breaks(m.group(0)) >= 2]


def _next_char(text: str, pos: int) -> str:
  """The first non-whitespace character at or after pos ("" if none)."""
  m = _WHITESPACE.match(text, pos)
  pos = m.end() if m else pos
  return text[pos] if pos < len(text) else ""


def _is_abbreviation(text: str, term_start: int) -> bool:
  """Whether the single period at `term_start` closes an abbreviation or a list number."""
  # Scans are bounded: abbreviations are short, and a long token is no abbreviation.
  word_start = term_start
  while word_start > max(0, term_start - 32) and not text[word_start - 1].isspace():
    word_start -= 1
  word = text[word_start:term_start].lstrip("([{\"'\u2018\u201c")
  if word.lower() in _ABBREVIATIONS or _INITIALISM.match(word):
    return True
  # "1. First item" or "b. Second item" at the start of a line is a list marker, not a sentence.
  if _LIST_MARKER.fullmatch(word) is None:
    return False
  before = word_start
  while before > 0 and text[before - 1] in " \t":
    before -= 1
  return before == 0 or text[before - 1] in "\r\n"


def _sentence_boundaries(text: str) -> list[int]:
  spans = _math_spans(text)
  starts = [s for s, _ in spans]
  cuts = []
  for m in _SENTENCE_END.finditer(text):
    if _inside(spans, starts, m.start()):
      continue
    if m.group(0).rstrip("\"'\u2019\u201d\u00bb)]}") == ".":
      if _is_abbreviation(text, m.start()):
        continue
    # A lowercase continuation means the period did not end the sentence ("approx. two").
    if _next_char(text, m.end()).islower():
      continue
    cuts.append(m.end())
  for m in _CJK_END.finditer(text):
    if not _inside(spans, starts, m.start()):
      cuts.append(m.end())
  # Math that ends with a terminator ("\[x = 5.\] Then ...") ends the sentence with it.
  for start, end in spans:
    inner = _MATH_CLOSER.sub("", text[start:end]).rstrip()
    if (inner.endswith((".", "!", "?")) and end < len(text) and text[end].isspace()
        and not _next_char(text, end).islower()):
      cuts.append(end)
  # A paragraph break always ends a sentence (headings and lists carry no final period).
  cuts.extend(p for p in _paragraph_breaks(text) if not _inside(spans, starts, p))
  return cuts


def _word_boundaries(text: str) -> list[int]:
  return [m.start() for m in _WHITESPACE.finditer(text)]


def split_units(text: str, unit: str) -> list[str]:
  """Splits `text` into units with `"".join(units) == text`.

  Args:
    text: the document.
    unit: "sentence", "paragraph" or "word".
  Returns:
    The units, in order. [] for "", [text] for whitespace-only text; otherwise every unit holds
    a non-whitespace character, and the whitespace between two units starts the second one.
  """
  if unit == "sentence":
    cuts = _sentence_boundaries(text)
  elif unit == "paragraph":
    cuts = _paragraph_breaks(text)
  elif unit == "word":
    cuts = _word_boundaries(text)
  else:
    raise ValueError(f"unit={unit!r} is not one of {list(UNITS)}")
  if not text:
    return []
  units: list[str] = []
  prev = 0
  for cut in sorted(set(cuts)) + [len(text)]:
    if cut <= prev:
      continue
    piece = text[prev:cut]
    # A whitespace-only piece (leading or trailing whitespace, or a double boundary) joins its
    # neighbour, so that every unit carries text.
    if units and (not piece.strip() or not units[-1].strip()):
      units[-1] += piece
    else:
      units.append(piece)
    prev = cut
  return units


# ---------------------------------------------------------------------------------------------
# Chunks.


def stable_seed(text: str, seed: int) -> int:
  """A seed that depends only on (text, seed): blake2b of the UTF-8 text, plus seed, mod 2**64.

  Python's hash() is salted per process and would make chunking depend on the worker.
  """
  digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return (int.from_bytes(digest, "little") + int(seed)) % (1 << 64)


def chunk_lengths(n_units: int, cfg: Any, rng: np.random.Generator) -> list[int]:
  """Draws chunk lengths (in units) that sum to `n_units`.

  Each length is min(min_units + Poisson(avg_units - min_units), max_units); the last chunk
  takes the remainder, so it lies in [1, max_units] and may be shorter than min_units.
  """
  cfg = _as_config(cfg)
  lengths = []
  left = n_units
  lam = cfg.avg_units - cfg.min_units
  while left > 0:
    n = min(cfg.min_units + int(rng.poisson(lam)), cfg.max_units, left)
    lengths.append(n)
    left -= n
  return lengths


def chunk_document(text: str, cfg: Any) -> list[str]:
  """Cuts `text` into chunks with `"".join(chunks) == text`; [] for empty/whitespace-only text.

  `cfg` is a ChunkConfig or a `config.chunking` section.
  """
  cfg = _as_config(cfg)
  if not text.strip():
    return []
  rng = np.random.default_rng(stable_seed(text, cfg.seed))
  context, text = _context(text, cfg.context_until)
  chunks = [context] if context else []
  for segment in _segments(text, cfg.break_after):
    units = split_units(segment, cfg.unit)
    pos = 0
    for n in chunk_lengths(len(units), cfg, rng):
      chunks.append("".join(units[pos:pos + n]))
      pos += n
  return chunks


def _context(text: str, context_until: str) -> tuple[str, str]:
  """(the context: `text` through the end of the first match of `context_until`, the rest);
  ("", text) when there is no match or no rest with text in it."""
  m = re.search(context_until, text) if context_until else None
  if m is None or not text[m.end():].strip() or not text[:m.end()].strip():
    return "", text
  return text[:m.end()], text[m.end():]


def context_chunks(text: str, cfg: Any) -> int:
  """How many of `chunk_document(text, cfg)`'s chunks are context (0 or 1)."""
  cfg = _as_config(cfg)
  return int(bool(_context(text, cfg.context_until)[0])) if text.strip() else 0


def _segments(text: str, break_after: str) -> list[str]:
  """`text` cut after every match of `break_after` (whole text if ""); no piece is empty, and
  a whitespace-only piece joins its neighbour, as units do."""
  if not break_after:
    return [text]
  cuts = sorted({m.end() for m in re.finditer(break_after, text)} - {0, len(text)})
  pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
  out: list[str] = []
  for piece in pieces:
    if out and (not piece.strip() or not out[-1].strip()):
      out[-1] += piece
    else:
      out.append(piece)
  return out


@dataclasses.dataclass(frozen=True)
class ChunkPair:
  """Chunk `index` of a document (the suffix) and the chunks before it (the prefix).

  `context`: the chunk is the document's context (ChunkConfig.context_until): the prefix of
  what follows, given no thought of its own."""
  index: int
  prefix: str
  suffix: str
  context: bool = False


def chunk_pairs(
    text_or_chunks: str | Sequence[str],
    cfg: Any = None,
    prefix_chunks: int | None = None,
) -> list[ChunkPair]:
  """One (prefix, suffix) pair per chunk.

  Args:
    text_or_chunks: a document (chunked with `cfg`) or its chunks.
    cfg: ChunkConfig or `config.chunking`; may be None when chunks and prefix_chunks are given.
    prefix_chunks: overrides cfg.prefix_chunks (1 for teacher prompts, 3 for the E-step).
  Returns:
    pairs[i].suffix = chunk i; pairs[i].prefix = chunks [i - prefix_chunks, i) joined
    ("" for the first chunk or when prefix_chunks == 0); pairs[0].context when a document
    given as text opens with a context chunk (given as chunks: when `cfg` has context_until
    and the first chunk is exactly the document's context).
  """
  n_context = 0
  if isinstance(text_or_chunks, str):
    if cfg is None:
      raise ValueError("chunk_pairs needs a chunking config to chunk raw text")
    chunks = chunk_document(text_or_chunks, cfg)
    n_context = context_chunks(text_or_chunks, cfg)
  else:
    chunks = list(text_or_chunks)
    if cfg is not None and chunks:
      text = "".join(chunks)
      n_context = int(context_chunks(text, cfg) == 1
                      and _context(text, _as_config(cfg).context_until)[0] == chunks[0])
  if prefix_chunks is None:
    if cfg is None:
      raise ValueError("chunk_pairs needs prefix_chunks or a chunking config")
    prefix_chunks = _as_config(cfg).prefix_chunks
  if prefix_chunks < 0:
    raise ValueError(f"prefix_chunks must be >= 0, got {prefix_chunks}")
  return [ChunkPair(i, "".join(chunks[max(0, i - prefix_chunks):i]), chunk, i < n_context)
          for i, chunk in enumerate(chunks)]
