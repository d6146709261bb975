"""Tests for latent_em.data.chunking: units, chunk lengths, determinism, (prefix, suffix) pairs."""
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from latent_em import config_lib
from latent_em.data import chunking

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA),
                                reason=f"shared data folder {DATA} is missing")
SETTINGS = hypothesis.settings(max_examples=150, deadline=None)

# Pieces that exercise the sentence rules: terminators, closers, abbreviations, decimals,
# LaTeX math, list markers, CRLF, unicode and CJK punctuation.
_PIECES = ["Word", "x", "the", " ", "  ", "\t", "\n", "\r\n", "\n\n", "\r\n\r\n", ".", "!", "?",
           "...", '"', ")", "''", "e.g.", "Mr.", "3.14", "1.", "$", "$$", "\\[", "\\]",
           "$x = 1.$", "U.S.", "é", "数学", "。", "\u2028", "\u00a0", "Ω"]
texts = st.one_of(
    st.text(),
    st.lists(st.sampled_from(_PIECES), max_size=60).map("".join),
    st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=5)), max_size=40).map("".join),
)
units_st = st.sampled_from(chunking.UNITS)


@st.composite
def configs(draw):
  lo = draw(st.integers(1, 4))
  avg = draw(st.integers(lo, lo + 6))
  hi = draw(st.integers(avg, avg + 6))
  return chunking.ChunkConfig(unit=draw(units_st), min_units=lo, avg_units=avg, max_units=hi,
                              prefix_chunks=draw(st.integers(0, 4)),
                              seed=draw(st.integers(0, 2**31)))


def _normalize_newlines(s):
  return s.replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------------------------
# Units.


@SETTINGS
@hypothesis.given(texts, units_st)
def test_units_reproduce_text(text, unit):
  units = chunking.split_units(text, unit)
  assert "".join(units) == text
  if not text:
    assert units == []
  elif not text.strip():
    assert units == [text]
  else:
    assert all(u.strip() for u in units)
    # Whitespace between units travels with the following unit.
    assert all(not u[-1].isspace() for u in units[:-1])


@SETTINGS
@hypothesis.given(texts)
def test_words_match_str_split(text):
  units = chunking.split_units(text, "word")
  assert [u.strip() for u in units if u.strip()] == text.split()
  assert all(u[0].isspace() for u in units[1:])


@SETTINGS
@hypothesis.given(texts)
def test_paragraphs_match_blank_line_split(text):
  units = chunking.split_units(text, "paragraph")
  expected = [p.strip() for p in re.split(r"\n[^\S\n]*\n", _normalize_newlines(text))
              if p.strip()]
  assert [_normalize_newlines(u).strip() for u in units if u.strip()] == expected
  assert all(u[0].isspace() for u in units[1:])


def test_sentence_rules():
  split = lambda t: chunking.split_units(t, "sentence")
  assert split("One. Two!  Three?\nFour") == ["One.", " Two!", "  Three?", "\nFour"]
  # Decimals, abbreviations, initialisms and lowercase continuations do not end a sentence.
  assert split("Pi is 3.14. Mr. Smith, e.g. Dr. Who, saw it. The U.S. Army is approx. two.") == [
      "Pi is 3.14.", " Mr. Smith, e.g. Dr. Who, saw it.", " The U.S. Army is approx. two."]
  # Closing quotes and brackets stay with their sentence.
  assert split('He said "Stop." Then (it ended.) Next') == [
      'He said "Stop."', " Then (it ended.)", " Next"]
  # Periods inside math do not split; display math ending with a period does.
  assert split("Let $x = 1. y$ be given. So \\[a = 5.\\] Then stop.") == [
      "Let $x = 1. y$ be given.", " So \\[a = 5.\\]", " Then stop."]
  # A dollar amount is not math: the sentence after "$5." starts a new unit.
  assert split("He paid $5. Then he paid $10.") == ["He paid $5.", " Then he paid $10."]
  # A blank line always ends a sentence, even without punctuation.
  assert split("\\section{Intro}\n\nText here.  ") == ["\\section{Intro}", "\n\nText here.  "]
  # List markers at the start of a line are not sentences.
  assert split("Steps:\n1. Add.\n2. Stir.") == ["Steps:\n1. Add.", "\n2. Stir."]
  assert split("数学。好。") == ["数学。", "好。"]
  assert split("A.\r\nB.") == ["A.", "\r\nB."]


def test_bad_unit_raises():
  with pytest.raises(ValueError, match="paragraphs"):
    chunking.split_units("text", "paragraphs")


@needs_data
def test_sentences_of_a_math_solution():
  with open(os.path.join(DATA, "math", "train.jsonl")) as f:
    rec = next(json.loads(line) for line in f if '"train/algebra/0.json"' in line)
  units = chunking.split_units(rec["solution"], "sentence")
  assert "".join(units) == rec["solution"]
  assert [u[:14] for u in units] == [
      "For the piecew", " For example, ", " This implies ", " Similarly, $x",
      " Substituting,", " So $a+b=-3+3="]
  assert units[2].endswith("which we solve to get $2a=-6 \\Rightarrow a=-3$.")


@needs_data
def test_sentences_of_a_latex_textbook_paragraph():
  with open(os.path.join(DATA, "mathtext", "hott_book.jsonl")) as f:
    doc = next(d for d in map(json.loads, f)
               if d["meta"]["section"] == "Type families are fibrations")["text"]
  paragraphs = chunking.split_units(doc, "paragraph")
  assert "".join(paragraphs) == doc
  para = next(p for p in paragraphs if p.startswith("\n\nRecall that a type family"))
  sentences = chunking.split_units(para, "sentence")
  assert "".join(sentences) == para
  assert [s.split(" ")[0] for s in sentences] == ["\n\nRecall", "\nThen", "\nIn"]
  assert sentences[-1].endswith("are \\emph{equivalent}.")
  # The display "\[D(x,y,p)\defeq P(x)\to P(y).\]" ends a sentence; "$p:x= y$" math does not.
  proof = next(p for p in paragraphs if p.startswith("\n\n\\begin{proof}[First proof]"))
  units = chunking.split_units(proof, "sentence")
  assert units[0].endswith("\\[D(x,y,p)\\defeq P(x)\\to P(y).\\]")
  assert units[1].startswith("\n  Then we have the function")
  assert units[1].endswith("which we define to be $\\transf p$.")
  chunks = chunking.chunk_document(doc, chunking.ChunkConfig())
  assert "".join(chunks) == doc and len(chunks) >= 5


# ----------------------------------------------------------------------------------------------
# Chunk lengths and chunks.


def _units_per_chunk(text, chunks, unit):
  """Number of units in each chunk, checking that chunks end on unit boundaries."""
  ends, pos = [], 0
  for u in chunking.split_units(text, unit):
    pos += len(u)
    ends.append(pos)
  counts, start = [], 0
  for chunk in chunks:
    start += len(chunk)
    assert start in ends, "a chunk ends inside a unit"
    counts.append(sum(1 for e in ends if e <= start) - sum(counts))
  return counts


@SETTINGS
@hypothesis.given(texts, configs())
def test_chunks_reproduce_text_and_respect_bounds(text, cfg):
  chunks = chunking.chunk_document(text, cfg)
  if not text.strip():
    assert chunks == []
    return
  assert "".join(chunks) == text
  counts = _units_per_chunk(text, chunks, cfg.unit)
  assert all(cfg.min_units <= n <= cfg.max_units for n in counts[:-1])
  assert 1 <= counts[-1] <= cfg.max_units
  assert chunking.chunk_document(text, cfg) == chunks


@SETTINGS
@hypothesis.given(st.integers(0, 300), configs(), st.integers(0, 2**32))
def test_chunk_lengths_sum_and_bounds(n, cfg, seed):
  lengths = chunking.chunk_lengths(n, cfg, np.random.default_rng(seed))
  assert sum(lengths) == n
  assert all(cfg.min_units <= x <= cfg.max_units for x in lengths[:-1])
  assert all(1 <= x <= cfg.max_units for x in lengths)


def test_chunk_lengths_follow_capped_poisson():
  lam, lo, hi = 7, 1, 10
  cfg = chunking.ChunkConfig(min_units=lo, avg_units=lo + lam, max_units=hi)
  lengths = np.array(chunking.chunk_lengths(200_000, cfg, np.random.default_rng(0))[:-1])
  # P(min + Poisson(lam) >= max) = P(Poisson(7) >= 9), from the Poisson pmf.
  p_cap = 1 - sum(math.exp(-lam) * lam**k / math.factorial(k) for k in range(hi - lo))
  assert abs(np.mean(lengths == hi) - p_cap) < 0.01
  p_min = math.exp(-lam)
  assert abs(np.mean(lengths == lo) - p_min) < 0.003
  uncapped = chunking.ChunkConfig(min_units=2, avg_units=8, max_units=1000)
  lengths = chunking.chunk_lengths(200_000, uncapped, np.random.default_rng(1))[:-1]
  assert abs(np.mean(lengths) - 8) < 0.1


def test_stable_seed_is_blake2b_plus_seed():
  digest = hashlib.blake2b("héllo".encode(), digest_size=8).digest()
  assert chunking.stable_seed("héllo", 5) == int.from_bytes(digest, "little") + 5
  assert chunking.stable_seed("héllo", 0) != chunking.stable_seed("hello", 0)


def _doc(n):
  return " ".join(f"Sentence number {i} is here." for i in range(n))


def test_chunking_independent_of_process_hash_seed():
  cfg = chunking.ChunkConfig(avg_units=3, max_units=6, seed=7)
  script = ("import json, sys; from latent_em.data import chunking as c; "
            "print(json.dumps(c.chunk_document(sys.argv[1], "
            "c.ChunkConfig(avg_units=3, max_units=6, seed=7))))")
  repo = os.path.join(os.path.dirname(__file__), "..")
  outs = []
  for hash_seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed,
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, _doc(40)], env=env,
                          capture_output=True, text=True, check=True)
    outs.append(json.loads(proc.stdout))
  assert outs[0] == outs[1] == chunking.chunk_document(_doc(40), cfg)


def test_seed_changes_chunking():
  base = chunking.ChunkConfig(avg_units=4, max_units=10)
  other = chunking.ChunkConfig(avg_units=4, max_units=10, seed=1)
  docs = [_doc(30 + i) for i in range(20)]
  differ = sum(chunking.chunk_document(d, base) != chunking.chunk_document(d, other)
               for d in docs)
  assert differ >= 17


def test_golden_chunk_lengths():
  # Pins the chunking of a fixed document so that a change in the RNG or the splitter, which
  # would silently re-chunk every corpus, is noticed.
  chunks = chunking.chunk_document(_doc(50), chunking.ChunkConfig())
  lengths = [len(chunking.split_units(c, "sentence")) for c in chunks]
  assert sum(lengths) == 50
  assert lengths == [10, 8, 10, 9, 8, 5]


def test_empty_documents_give_no_chunks():
  cfg = chunking.ChunkConfig()
  assert chunking.chunk_document("", cfg) == []
  assert chunking.chunk_document(" \r\n\t ", cfg) == []
  assert chunking.chunk_pairs("   ", cfg) == []


# ----------------------------------------------------------------------------------------------
# Pairs.


@SETTINGS
@hypothesis.given(texts, configs(), st.one_of(st.none(), st.integers(0, 5)))
def test_pairs_prefix_is_previous_chunks(text, cfg, k):
  chunks = chunking.chunk_document(text, cfg)
  pairs = chunking.chunk_pairs(text, cfg, prefix_chunks=k)
  k = cfg.prefix_chunks if k is None else k
  assert [p.index for p in pairs] == list(range(len(chunks)))
  assert [p.suffix for p in pairs] == chunks
  for i, p in enumerate(pairs):
    assert p.prefix == "".join(chunks[max(0, i - k):i])
    assert p.prefix + p.suffix in text
  assert chunking.chunk_pairs(chunks, prefix_chunks=k) == pairs


def test_pairs_examples():
  chunks = ["a", " b", " c", " d"]
  pairs = chunking.chunk_pairs(chunks, prefix_chunks=1)
  assert [(p.prefix, p.suffix) for p in pairs] == [("", "a"), ("a", " b"), (" b", " c"),
                                                   (" c", " d")]
  pairs = chunking.chunk_pairs(chunks, chunking.ChunkConfig(prefix_chunks=3))
  assert pairs[3] == chunking.ChunkPair(3, "a b c", " d")
  assert [p.prefix for p in chunking.chunk_pairs(chunks, prefix_chunks=0)] == [""] * 4
  with pytest.raises(ValueError, match="prefix_chunks"):
    chunking.chunk_pairs(chunks)


# ----------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("section, key", [
    ({"min_units": 0}, "config.chunking.min_units"),
    ({"min_units": 5, "avg_units": 3}, "config.chunking.avg_units"),
    ({"avg_units": 30}, "config.chunking.avg_units"),
    ({"unit": "line"}, "config.chunking.unit"),
    ({"prefix_chunks": -1}, "config.chunking.prefix_chunks"),
    ({"max_unit": 5}, "config.chunking.max_unit"),
    ({"break_after": "(Answer"}, "config.chunking.break_after"),
    ({"break_after": "x*"}, "config.chunking.break_after"),
    ({"context_until": "(Answer"}, "config.chunking.context_until"),
    ({"context_until": "x?"}, "config.chunking.context_until"),
])
def test_bad_config_names_the_key(section, key):
  with pytest.raises(config_lib.ConfigError, match=re.escape(key)):
    chunking.chunk_document("A. B.", section)


def test_config_section_accepted():
  section = {"unit": "word", "min_units": 2, "avg_units": 2, "max_units": 2}
  assert chunking.chunk_document("a b c d e", section) == ["a b", " c d", " e"]


# ---------------------------------------------------------------------------------------------
# Forced breaks.


@SETTINGS
@hypothesis.given(texts, configs(), st.sampled_from([r"\n", r"[.!?]", r"e"]))
def test_break_after_ends_a_chunk_after_every_match(text, cfg, pattern):
  cfg = dataclasses.replace(cfg, break_after=pattern)
  chunks = chunking.chunk_document(text, cfg)
  if not text.strip():
    assert chunks == []
    return
  assert "".join(chunks) == text
  ends = set(itertools.accumulate(len(c) for c in chunks))
  for m in re.finditer(pattern, text):
    # Every match ends a chunk, up to whitespace: a piece between two cuts that holds only
    # whitespace joins its neighbour (no chunk is whitespace alone), and so does whitespace at
    # either end of the text.
    if text[:m.end()].strip() and text[m.end():].strip():
      assert any(not text[min(e, m.end()):max(e, m.end())].strip() for e in ends), (
          text, m.end(), chunks)
  # Between two breaks the usual law holds: no chunk longer than max_units units.
  for chunk in chunks:
    assert len(chunking.split_units(chunk, cfg.unit)) <= cfg.max_units


def test_break_after_puts_the_answer_of_a_question_in_its_own_chunk():
  text = ("Question: Mia has 7 apples. Mia buys 5 more apples. How many apples does Mia have "
          "now?\nAnswer: The answer is 12.")
  cfg = {"min_units": 12, "avg_units": 12, "max_units": 12, "break_after": r"\nAnswer:"}
  assert chunking.chunk_document(text, cfg) == [text[:-len(" The answer is 12.")],
                                                " The answer is 12."]
  # Without it the whole exercise is one chunk; and "" changes nothing, draw for draw.
  assert chunking.chunk_document(text, {**cfg, "break_after": ""}) == [text]
  story = "A b. C d. E f. G h. I j. K l. M n. O p. Q r. S t."
  for seed in range(5):
    plain = {"min_units": 1, "avg_units": 2, "max_units": 4, "seed": seed}
    assert (chunking.chunk_document(story, {**plain, "break_after": ""})
            == chunking.chunk_document(story, plain))


# ---------------------------------------------------------------------------------------------
# Context.


@SETTINGS
@hypothesis.given(texts, configs(), st.sampled_from([r"\n", r"[.!?]", r"e"]))
def test_context_until_makes_the_opening_one_context_chunk(text, cfg, pattern):
  cfg = dataclasses.replace(cfg, context_until=pattern)
  chunks = chunking.chunk_document(text, cfg)
  pairs = chunking.chunk_pairs(text, cfg)
  assert [p.suffix for p in pairs] == chunks
  if not text.strip():
    assert chunks == [] and chunking.context_chunks(text, cfg) == 0
    return
  assert "".join(chunks) == text
  m = re.search(pattern, text)
  if m and text[:m.end()].strip() and text[m.end():].strip():
    # The text through the first match is one chunk, the only context; the rest is chunked
    # by the usual law, and its first chunk has the context as prefix.
    assert chunks[0] == text[:m.end()] and chunking.context_chunks(text, cfg) == 1
    assert [p.context for p in pairs] == [True] + [False] * (len(chunks) - 1)
    assert all(len(chunking.split_units(c, cfg.unit)) <= cfg.max_units for c in chunks[1:])
    if cfg.prefix_chunks:
      assert pairs[1].prefix.endswith(chunks[0])
  else:
    assert not any(p.context for p in pairs) and chunking.context_chunks(text, cfg) == 0
    assert chunks == chunking.chunk_document(text, dataclasses.replace(cfg, context_until=""))


def test_context_until_makes_a_question_context_and_its_answer_the_chunk_to_explain():
  text = ("Question: Mia has 7 apples. Mia buys 5 more apples. How many apples does Mia have "
          "now?\nAnswer: The answer is 12.")
  cfg = {"min_units": 12, "avg_units": 12, "max_units": 12, "context_until": r"\nAnswer:",
         "prefix_chunks": 1}
  pairs = chunking.chunk_pairs(text, cfg)
  question = text[:-len(" The answer is 12.")]
  assert [(p.context, p.prefix, p.suffix) for p in pairs] == [
      (True, "", question), (False, question, " The answer is 12.")]
  # Given as chunks, with the config, the same chunks are marked; a question without its
  # answer is one chunk and no context.
  assert [p.context for p in chunking.chunk_pairs([question, " The answer is 12."], cfg)] == [
      True, False]
  assert [p.context for p in chunking.chunk_pairs(question, cfg)] == [False]
