"""The built-in corpus "where thoughts matter": small, deterministic, compressed math stories.

Real math web text and 1B models do not fit a laptop CPU, so the quick-start demo trains on
short stories generated here. Each story states quantities ("Mia has 52 marbles. She gives 5
marbles to her brother.") and then states *derived* quantities without the working ("Now she
has 47 marbles."). The derived number appears nowhere earlier in the text, so a model of the raw
text must do the arithmetic silently at one token; a thought that writes the working
("Mia had 52 marbles. 52 - 5 = 47.") turns it into a copy. That gap is what EM over latent
thoughts can close.

`oracle_thought(prefix, suffix)` plays the strong teacher of the warm start (DESIGN.md §1, §5):
it parses the text back into facts, replays them and writes the working for every derived
quantity in the suffix. It reads only the text, so it works on any sentence-aligned chunking.

Arithmetic stays where a model of a few million parameters can learn it step by step: given
numbers up to `max_operand`, every value up to `max_value`, one operation per equation and at
most `max_steps` equations per derived quantity. Every sentence ends with "." and holds no other
sentence terminator, so `chunking.split_units(text, "sentence")` returns `Document.sentences`.

With `exercises`, every document is instead a word problem with a bare answer, as in an answer
key: "Question: Mia has 7 apples. Mia buys 5 more apples. How many apples does Mia have
now?\nAnswer: The answer is 12." The question ends with "?", and the answer cue "\nAnswer:" is
a sentence of its own here (chunking cuts after it with `break_after=ANSWER_BREAK`), so the
answer's working is the thought of a chunk that starts right after the cue: where the latent
evaluation prompt (`<question> SoL PRIOR`) asks the model to think. The held-out questions are
then exercises too (`exercise_question`).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import random
import re
from typing import Any, Iterable, Sequence

from latent_em import config_lib, io_utils


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """`config.corpus`: sizes and arithmetic range of the built-in corpus.

  The default sizes fit the 15-minute CPU demo: ~2k warm-start stories (with oracle thoughts,
  ~0.3M tokens) teach a tiny model the thought format; ~4k bootstrap stories keep one E-step
  (K samples per chunk, decoded on CPU) to a few minutes; 300 validation stories give a stable
  NLL; 200 questions (+8 few-shot exemplars) measure arithmetic to about +-3.5 points.
  """
  seed: int = 0
  n_warmstart: int = 2000
  n_bootstrap: int = 4000
  n_validation: int = 300
  n_eval: int = 200
  n_fewshot: int = 8
  n_fresh: int = 0          # extra distinct stories for the raw_fresh baseline
  # Distinct stories to pretrain a base model on (config.em.base_files): split `pretrain` holds
  # them as written, `pretrain_cot` with the oracle's working before each derived sentence.
  n_pretrain: int = 0
  # Exercises only: equations in the working of each pretraining exercise (0: min_steps to
  # max_steps, as the others). 1 gives worked one-step problems whose starting values span the
  # whole range up to max_value: every primitive step a multi-step exercise takes, not the
  # composition.
  pretrain_steps: int = 0
  # Exercises only: split `pretrain_questions`, multi-step questions without cue or answer
  # (question text for the base to read).
  n_pretrain_questions: int = 0
  # Question split `dev`: held out from every training split like `eval`, for choices and
  # probes, so that `eval` is read only for final results.
  n_dev: int = 0
  n_names: int = 0          # names per gender to draw from (0 = all 28)
  n_objects: int = 0        # objects to draw from (0 = all 24)
  max_steps: int = 3        # equations in the working of one derived quantity
  min_steps: int = 1        # exercises: the fewest equations in an answer's working
  max_operand: int = 50     # largest given (stated) number
  max_value: int = 99       # largest value anywhere (given, intermediate or derived)
  # Largest single change ("buys 3 more"; 0 = max_operand). Small changes make the one-step
  # sums a small table to learn, while a total over several of them stays a multi-step sum.
  max_change: int = 0
  # Plain stories: one wording per kind of sentence, present tense, names instead of pronouns,
  # no side remarks or connectives. Less text that no thought explains, so a larger share of a
  # story's information is in its derived numbers.
  plain: bool = False
  # Tally stories: each person's quantity changes several times (`max_steps` changes, or one
  # fewer) before the story states it, so every derived number is a multi-step computation
  # over numbers all written earlier; nothing else is derived.
  tally: bool = False
  # Exercises: every document is one word problem in the corpus' own wording, a question and
  # its bare answer ("Question: ... How many marbles does Mia have now?\nAnswer: The answer is
  # 12."), of the evaluation's five kinds (chain, relation, sum, difference, split), the
  # working of its 1 to `max_steps` equations never shown: an answer key. The thought of the
  # answer is its working, written after "Answer:" where the latent evaluation prompt asks the
  # model to think (`config.*.chunking.break_after`).
  exercises: bool = False

  def __post_init__(self):
    key = "config.corpus"
    for name in ("n_warmstart", "n_bootstrap", "n_validation", "n_eval", "n_fewshot", "n_fresh",
                 "n_pretrain", "n_pretrain_questions", "n_dev"):
      config_lib.check(getattr(self, name) >= 0, f"{key}.{name}",
                       f"must be >= 0, got {getattr(self, name)}")
    config_lib.check(0 <= self.n_names <= len(FEMALE), f"{key}.n_names",
                     f"must be in [0, {len(FEMALE)}], got {self.n_names}")
    config_lib.check(0 <= self.n_objects <= len(OBJECTS), f"{key}.n_objects",
                     f"must be in [0, {len(OBJECTS)}], got {self.n_objects}")
    config_lib.check(2 <= self.max_steps <= 4, f"{key}.max_steps",
                     f"must be in [2, 4] (the story templates), got {self.max_steps}")
    config_lib.check(10 <= self.max_operand <= self.max_value, f"{key}.max_operand",
                     f"need 10 <= max_operand <= max_value, got {self.max_operand} / "
                     f"{self.max_value}")
    config_lib.check(20 <= self.max_value <= 999, f"{key}.max_value",
                     f"must be in [20, 999] (1-3 digit arithmetic), got {self.max_value}")
    config_lib.check(not (self.tally and self.exercises), f"{key}.exercises",
                     "tally and exercises exclude each other: set one")
    config_lib.check(1 <= self.min_steps <= self.max_steps, f"{key}.min_steps",
                     f"need 1 <= min_steps <= max_steps={self.max_steps}, got {self.min_steps}")
    config_lib.check(0 <= self.pretrain_steps <= self.max_steps, f"{key}.pretrain_steps",
                     f"must be in [0, max_steps={self.max_steps}], got {self.pretrain_steps}")
    for name in ("pretrain_steps", "n_pretrain_questions"):
      config_lib.check(not getattr(self, name) or self.exercises, f"{key}.{name}",
                       "applies to exercises only: set config.corpus.exercises = True")
    config_lib.check(self.max_change == 0 or 3 <= self.max_change <= self.max_operand,
                     f"{key}.max_change",
                     f"must be 0 (= max_operand) or in [3, max_operand={self.max_operand}], "
                     f"got {self.max_change}")

  @property
  def change_cap(self) -> int:
    """The largest single change."""
    return self.max_change or self.max_operand


@dataclasses.dataclass(frozen=True)
class Fact:
  """One fact stated by a sentence.

  kind / nums: init (n,) | change (k,) op +/- | groups (g, s) op +/- | relation (k,) op
  more/fewer or (factor,) op times/half | split (g,) | state (v,) | compare (v,) op
  more/fewer/sum | part (v,). The last four are derived: their number is the result of working
  the text does not show. `who` is a person's name (None for `part`: the last split's person),
  `other` the second person of a relation/compare, `unit` the container of split/part, `day`
  the dated change a state is asked after ("How many ... after Monday?").
  """
  kind: str
  who: str | None
  obj: str | None
  nums: tuple[int, ...]
  op: str = ""
  other: str | None = None
  unit: str | None = None
  day: str | None = None


DERIVED = frozenset({"state", "compare", "part"})


@dataclasses.dataclass(frozen=True)
class Document:
  """A generated story: `"".join(sentences) == text`; one oracle thought and facts per sentence."""
  text: str
  sentences: list[str]
  oracle_thoughts: list[str | None]
  facts: list[tuple[Fact, ...]]


# ---------------------------------------------------------------------------------- vocabulary

FEMALE = ("Mia", "Ava", "Emma", "Lily", "Zoe", "Nora", "Ella", "Ruby", "Chloe", "Maya", "Sara",
          "Anna", "Lucy", "Ivy", "Rosa", "Leah", "Nina", "Hana", "Amira", "Priya", "Mei", "Olga",
          "Fatima", "Elena", "Aisha", "Yuki", "Clara", "Julia")
MALE = ("Tom", "Leo", "Sam", "Max", "Ben", "Omar", "Ravi", "Noah", "Liam", "Jack", "Eli", "Finn",
        "Hugo", "Ivan", "Kai", "Luca", "Owen", "Theo", "Yusuf", "Diego", "Kenji", "Arjun", "Felix",
        "Oscar", "Pablo", "Marco", "Adam", "Jonas")
_GENDER = {**{n: "f" for n in FEMALE}, **{n: "m" for n in MALE}}
OBJECTS = ("marbles", "stickers", "apples", "cards", "books", "coins", "shells", "pencils",
           "cookies", "stamps", "crayons", "beads", "rocks", "oranges", "eggs", "balloons",
           "candies", "buttons", "comics", "plums", "ribbons", "erasers", "feathers", "cupcakes")
_CONTAINERS = {"items": (("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("jar", "jars"),
                         ("basket", "baskets"), ("bowl", "bowls"), ("tin", "tins")),
               "money": (("envelope", "envelopes"), ("jar", "jars"), ("purse", "purses"))}
_PLURAL_TO_SINGULAR = {p: s for pairs in _CONTAINERS.values() for s, p in pairs}
_RELATIVES = ("friend", "brother", "sister", "cousin", "aunt", "uncle", "neighbor", "teacher",
              "grandmother", "grandfather", "classmate")
_ITEMS = ("notebooks", "pens", "tickets", "sandwiches", "toys", "posters", "bracelets",
          "drawings", "candles", "mugs", "plants", "kites")
_THINGS = ("lunch", "a book", "a ticket", "a gift", "a new toy", "snacks", "a game", "a hat",
           "a bus pass", "paint")
_JOBS = ("by washing cars", "by walking dogs", "at the market", "by selling lemonade",
         "for helping a neighbor", "by mowing lawns", "at a bake sale")
_TIMES = {"twice": 2, "three times": 3, "four times": 4}
_CONNECTIVES = ("Then ", "Later, ", "Next, ", "After that, ")
# Exercises date each change by a day of the week, consecutive days in order: the day names
# the step, so working through an exercise finds each change by its day.
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_DAY_LEADS = tuple(f"On {d}, " for d in DAYS)

# ----------------------------------------------------------------------------------- templates
# A template is text with slots. {a|b} is a verb in present|past tense (one tense per story).
# Person slots: S (subject: name / she / he), O (object: name / her / him), P (possessive:
# name's / her / his); `who` / `other` say which slot holds the fact's person and second person.
# Numbers: n k g s v. Decorative slots (pos, rel, item, thing, job) carry no fact.


@dataclasses.dataclass(frozen=True)
class _Template:
  kinds: tuple[str, ...]
  text: str
  frames: tuple[str, ...] = ("items", "money")
  op: str = ""
  who: str = "S"
  other: str = "O"
  after_sub: bool = False     # "... left." reads well only after something was taken away

  @property
  def connective(self) -> bool:
    return self.kinds[0] in ("change", "groups") and self.text.startswith("{S}")


def _t(kinds: str, text: str, frames: str = "items money", **kw) -> _Template:
  return _Template(tuple(kinds.split("+")), text, tuple(frames.split()), **kw)


_TEMPLATES: tuple[_Template, ...] = (
    _t("mention", "{S} {loves|loved} collecting {obj}.", "items"),
    _t("mention", "{S} {keeps|kept} {pos} {obj} in a big box.", "items"),
    _t("mention", "{S} {is|was} proud of {pos} {obj}.", "items"),
    _t("mention", "{S} {is|was} saving money for a new bike.", "money"),
    _t("mention", "{S} {keeps|kept} track of {pos} money in a notebook.", "money"),
    _t("mention", "{S} {wants|wanted} to buy a present for {pos} {rel}.", "money"),
    _t("init", "{S} {has|had} {n} {obj}."),
    _t("init", "{S} {owns|owned} {n} {obj}.", "items"),
    _t("init", "{S} {starts|started} the day with {n} {obj}."),
    _t("init", "{S} {has|had} a collection of {n} {obj}.", "items"),
    _t("init", "There {are|were} {n} {obj} in {P} box.", "items", who="P"),
    _t("init", "At first, {S} {has|had} {n} {obj}."),
    _t("init", "{S} {has|had} {n} {obj} in {pos} wallet.", "money"),
    _t("init", "{S} {saves|saved} {n} {obj} from {pos} allowance.", "money"),
    _t("change", "{S} {buys|bought} {k} more {obj}.", "items", op="+"),
    _t("change", "{S} {finds|found} {k} more {obj}.", "items", op="+"),
    _t("change", "{S} {gets|got} {k} {obj} from {pos} {rel}.", op="+"),
    _t("change", "{pos} {rel} {gives|gave} {O} {k} {obj}.", op="+", who="O"),
    _t("change", "{S} {wins|won} {k} {obj} in a game.", "items", op="+"),
    _t("change", "{S} {receives|received} {k} {obj} for {pos} birthday.", op="+"),
    _t("change", "{S} {earns|earned} {k} {obj} {job}.", "money", op="+"),
    _t("change", "{S} {gives|gave} {k} {obj} to {pos} {rel}.", op="-"),
    _t("change", "{S} {loses|lost} {k} {obj}.", op="-"),
    _t("change", "{S} {sells|sold} {k} of {pos} {obj}.", "items", op="-"),
    _t("change", "{S} {gives|gave} away {k} {obj}.", "items", op="-"),
    _t("change", "{S} {uses|used} {k} {obj} for a school project.", "items", op="-"),
    _t("change", "{S} {spends|spent} {k} {obj} on {thing}.", "money", op="-"),
    _t("change", "{S} {pays|paid} {k} {obj} for {thing}.", "money", op="-"),
    _t("groups", "{S} {buys|bought} {g} {cs} of {obj} with {s} {obj} in each {c}.", "items",
       op="+"),
    _t("groups", "{S} {gets|got} {g} more {cs} that each {hold|held} {s} {obj}.", "items", op="+"),
    _t("groups", "{S} {fills|filled} {g} {cs} with {s} {obj} each and {adds|added} them to {pos} "
       "collection.", "items", op="+"),
    _t("groups", "{S} {works|worked} {g} hours and {earns|earned} {s} {obj} per hour.", "money",
       op="+"),
    _t("groups", "{S} {sells|sold} {g} {item} for {s} {obj} each.", "money", op="+"),
    _t("groups", "{S} {gives|gave} {g} friends {s} {obj} each.", op="-"),
    _t("groups", "{S} {packs|packed} {g} gift {cs} with {s} {obj} in each and {gives|gave} them "
       "away.", "items", op="-"),
    _t("groups", "{S} {buys|bought} {g} {item} that {cost|cost} {s} {obj} each.", "money", op="-"),
    _t("groups", "{S} {pays|paid} for {g} {item} at {s} {obj} each.", "money", op="-"),
    _t("state", "Now {S} {has|had} {v} {obj}."),
    _t("state", "So {S} {has|had} {v} {obj}."),
    _t("state", "{S} {ends|ended} up with {v} {obj}."),
    _t("state", "At this point, {S} {has|had} {v} {obj}."),
    _t("state", "This {brings|brought} {P} total to {v} {obj}.", who="P"),
    _t("state", "In the end, {S} {has|had} {v} {obj}."),
    _t("state", "{S} now {has|had} {v} {obj}."),
    _t("state", "That {leaves|left} {O} with {v} {obj}.", who="O", after_sub=True),
    _t("state", "{S} {has|had} {v} {obj} left.", after_sub=True),
    _t("change+state", "After giving {k} {obj} to {pos} {rel}, {S} {has|had} {v} {obj} left.",
       op="-"),
    _t("change+state", "After losing {k} {obj}, {S} {has|had} {v} {obj}.", op="-"),
    _t("change+state", "{S} {buys|bought} {k} more {obj} and now {has|had} {v} {obj}.", "items",
       op="+"),
    _t("change+state", "With {k} more {obj} from {pos} {rel}, {S} {has|had} {v} {obj}.", op="+"),
    _t("change+state", "After spending {k} {obj} on {thing}, {S} {has|had} {v} {obj} left.",
       "money", op="-"),
    _t("change+state", "{S} {earns|earned} {k} more {obj} {job}, so {pos} savings {grow|grew} to "
       "{v} {obj}.", "money", op="+"),
    _t("groups+state", "{S} {buys|bought} {g} {cs} with {s} {obj} in each, which {brings|brought} "
       "{pos} total to {v} {obj}.", "items", op="+"),
    _t("groups+state", "After buying {g} {item} at {s} {obj} each, {S} {has|had} {v} {obj} left.",
       "money", op="-"),
    _t("groups+state", "After working {g} hours at {s} {obj} per hour, {S} {has|had} {v} {obj}.",
       "money", op="+"),
    _t("groups+state", "After giving {g} friends {s} {obj} each, {S} {has|had} {v} {obj} left.",
       op="-"),
    _t("relation", "{S} {has|had} {k} more {obj} than {O}.", op="more"),
    _t("relation", "{S} {has|had} {k} fewer {obj} than {O}.", op="fewer"),
    _t("relation", "Compared with {O}, {S} {has|had} {k} more {obj}.", op="more"),
    _t("relation", "Compared with {O}, {S} {has|had} {k} fewer {obj}.", op="fewer"),
    _t("relation", "{S} {has|had} {times} as many {obj} as {O}.", op="times"),
    _t("relation", "{S} {has|had} half as many {obj} as {O}.", op="half"),
    _t("compare", "Now {S} {has|had} {v} more {obj} than {O}.", op="more"),
    _t("compare", "Now {S} {has|had} {v} fewer {obj} than {O}.", op="fewer"),
    _t("compare", "At this point, {S} {has|had} {v} {obj} more than {O}.", op="more"),
    _t("compare", "Together {S} and {O} {have|had} {v} {obj}.", op="sum"),
    _t("compare", "{S} and {O} {have|had} {v} {obj} in total.", op="sum"),
    _t("compare", "Between them, {S} and {O} {have|had} {v} {obj}.", op="sum"),
    _t("split", "{S} {puts|put} all of {pos} {obj} into {g} {cs} with the same number in each."),
    _t("split", "{S} {sorts|sorted} {pos} {obj} equally into {g} {cs}."),
    _t("part", "Each {c} {holds|held} {v} {obj}."),
    _t("part", "There {are|were} {v} {obj} in each {c}."),
    _t("part", "Every {c} {gets|got} {v} {obj}."),
    _t("split+part", "{S} {puts|put} {pos} {obj} into {g} equal {cs}, so each {c} {holds|held} {v} "
       "{obj}."),
    # Exercises: the question names what the answer states; `op` is the derived fact's kind.
    _t("ask", "How many {obj} does {S} have now?", op="state"),
    _t("ask", "How many {obj} does {S} have?", op="state"),
    _t("ask", "How many {obj} do {S} and {O} have together?", op="sum"),
    _t("ask", "How many more {obj} does {S} have than {O}?", op="more"),
    _t("ask", "How many {obj} are in each {c}?", op="part"),
    _t("ask", "How many {obj} does {S} have after {day}?", op="after"),
    _t("cue", "Answer:"),
    _t("answer", "The answer is {v}."),
)
QUESTION_LEAD = "Question: "   # the first sentence of an exercise starts with it

_NAME_RE = "|".join(sorted(FEMALE + MALE, key=len, reverse=True))
_SLOT_RE = {
    "S": rf"(?P<S>{_NAME_RE}|[Ss]he|[Hh]e)",
    "O": rf"(?P<O>{_NAME_RE}|her|him)",
    "P": rf"(?P<P>(?:{_NAME_RE})'s|[Hh]er|[Hh]is)",
    "pos": r"(?:[Hh]er|[Hh]is)",
    "obj": rf"(?P<obj>{'|'.join(OBJECTS)}|dollars)",
    "c": rf"(?P<c>{'|'.join(sorted(_PLURAL_TO_SINGULAR.values()))})",
    "cs": rf"(?P<cs>{'|'.join(sorted(_PLURAL_TO_SINGULAR))})",
    "rel": rf"(?:{'|'.join(_RELATIVES)})",
    "item": rf"(?:{'|'.join(_ITEMS)})",
    "thing": rf"(?:{'|'.join(_THINGS)})",
    "job": rf"(?:{'|'.join(_JOBS)})",
    "times": rf"(?P<times>{'|'.join(_TIMES)})",
    "day": rf"(?P<day>{'|'.join(DAYS)})",
    **{n: rf"(?P<{n}>\d+)" for n in "nkgsv"},
}
_PIECE = re.compile(r"(\{[^{}]*\})")


def _compile(tpl: _Template) -> re.Pattern:
  out, seen = [], set()
  for piece in _PIECE.split(tpl.text):
    if not (piece.startswith("{") and piece.endswith("}")):
      out.append(re.escape(piece))
    elif "|" in piece:
      out.append("(?:" + "|".join(map(re.escape, piece[1:-1].split("|"))) + ")")
    elif piece[1:-1] in seen:  # a slot repeated in one template must repeat the same word
      out.append(f"(?P={piece[1:-1]})")
    else:
      seen.add(piece[1:-1])
      out.append(_SLOT_RE[piece[1:-1]])
  body = "".join(out)
  if tpl.connective:
    body = "(?:" + "|".join(map(re.escape, _CONNECTIVES)) + ")?" + body
  if tpl.kinds == ("change",):  # an exercise's changes are dated
    body = "(?:" + "|".join(map(re.escape, _DAY_LEADS)) + ")?" + body
  return re.compile(body)


_COMPILED = tuple((tpl, _compile(tpl)) for tpl in _TEMPLATES)



def _pieces(tpl: _Template) -> tuple[tuple[str, ...], ...]:
  """The template as (literal,) / (present, past) / (slot name, "") pieces, for rendering."""
  out = []
  for piece in _PIECE.split(tpl.text):
    if not (piece.startswith("{") and piece.endswith("}")):
      out.append((piece,))
    elif "|" in piece:
      out.append(tuple(piece[1:-1].split("|")))
    else:
      out.append((piece[1:-1], ""))
  return tuple(out)


_PIECES = {tpl: _pieces(tpl) for tpl in _TEMPLATES}


def _render(tpl: _Template, slots: dict[str, str], past: bool, connective: str = "") -> str:
  out = [connective]
  for piece in _PIECES[tpl]:
    if len(piece) == 1:
      out.append(piece[0])
    elif piece[1]:
      out.append(piece[int(past)])
    else:
      out.append(slots[piece[0]])
  text = "".join(out)
  return text[0].upper() + text[1:]


# ------------------------------------------------------------------------------------- parsing

ANSWER_CUE = "\nAnswer:"
# What `config.*.chunking.break_after` names for exercises: a chunk ends after the answer cue.
ANSWER_BREAK = r"\nAnswer:"
assert re.fullmatch(ANSWER_BREAK, ANSWER_CUE)
_SENTENCE_END = re.compile(rf"[.!?](?=\s)|(?<={ANSWER_BREAK})(?=\s)")


def split_sentences(text: str) -> list[str]:
  """Sentences of a story; whitespace travels with the following sentence (DESIGN.md §3).

  An exercise's answer cue ("\nAnswer:") is a sentence of its own.
  """
  cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
  return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def _match(sentence: str) -> tuple[_Template, dict[str, str]] | None:
  """The template a sentence was written from, and its slot values (None: not a story line)."""
  sentence = sentence.strip()
  if sentence.startswith(QUESTION_LEAD):
    sentence = sentence[len(QUESTION_LEAD):]
  found = None
  for tpl, regex in _COMPILED:
    m = regex.fullmatch(sentence)
    if m:
      if found is not None:
        raise AssertionError(f"ambiguous templates for {sentence!r}: {found[0].text!r} and "
                             f"{tpl.text!r}")
      found = (tpl, {k: v for k, v in m.groupdict().items() if v is not None})
  return found


def _person_token(token: str) -> tuple[str | None, str | None]:
  """(name, None) for a name or "Name's"; (None, gender) for a pronoun."""
  name = token[:-2] if token.endswith("'s") else token
  if name in _GENDER:
    return name, None
  return None, "f" if token.lower() in ("she", "her") else "m"


def _resolve(token: str | None, index: int, names: list[list[str]]) -> str | None:
  """A pronoun names the nearest earlier person of its gender, else the first later one."""
  if token is None:
    return None
  name, gender = _person_token(token)
  if name is not None:
    return name
  earlier = [n for row in names[:index + 1] for n in row if _GENDER[n] == gender]
  if earlier:
    return earlier[-1]
  later = [n for row in names[index + 1:] for n in row if _GENDER[n] == gender]
  return later[0] if later else None


def _facts_from_match(tpl: _Template, slots: dict[str, str], who: str | None,
                      other: str | None) -> tuple[Fact, ...]:
  obj = slots.get("obj")
  unit = slots.get("c") or _PLURAL_TO_SINGULAR.get(slots.get("cs", ""))
  facts = []
  for kind in tpl.kinds:
    if kind in ("mention", "cue"):
      continue
    if kind == "ask":
      facts.append(Fact("ask", who, obj, (), tpl.op, other, unit, slots.get("day")))
      continue
    if kind == "answer":
      facts.append(Fact("answer", None, None, (int(slots["v"]),)))
      continue
    if kind == "relation":
      if tpl.op in ("more", "fewer"):
        nums = (int(slots["k"]),)
      else:
        nums = (_TIMES[slots["times"]] if tpl.op == "times" else 2,)
      facts.append(Fact("relation", who, obj, nums, tpl.op, other))
      continue
    names = {"init": "n", "change": "k", "groups": "gs", "split": "g"}.get(kind, "v")
    values = tuple(int(slots[n]) for n in names)
    op = tpl.op if kind in ("change", "groups", "compare") else ""
    facts.append(Fact(kind, None if kind == "part" else who, obj, values, op,
                      other if kind == "compare" else None,
                      unit if kind in ("split", "part") else None))
  return tuple(facts)


def parse_sentences(sentences: Sequence[str]) -> list[tuple[Fact, ...]]:
  """Facts stated by each sentence (pronouns resolved across all of `sentences`)."""
  matches = [_match(s) for s in sentences]
  names = []
  for m in matches:
    row = []
    for slot in ("S", "O", "P"):
      if m is not None and slot in m[1]:
        name, _ = _person_token(m[1][slot])
        if name:
          row.append(name)
    names.append(row)
  out = []
  for i, m in enumerate(matches):
    if m is None:
      out.append(())
      continue
    tpl, slots = m
    who = _resolve(slots.get(tpl.who), i, names)
    other = _resolve(slots.get(tpl.other), i, names) if tpl.other != tpl.who else None
    out.append(_facts_from_match(tpl, slots, who, other))
  return _answered(out)


def _answered(rows: list[tuple[Fact, ...]]) -> list[tuple[Fact, ...]]:
  """An exercise's answer states the derived fact its question asked for; the question itself
  states nothing."""
  out, asked = [], None
  for row in rows:
    new = []
    for f in row:
      if f.kind == "ask":
        asked = f
      elif f.kind == "answer":
        if asked is not None:
          new.append(_answer_fact(asked, f.nums[0]))
        asked = None
      else:
        new.append(f)
    out.append(tuple(new))
  return out


def _answer_fact(ask: Fact, value: int) -> Fact:
  if ask.op == "state":
    return Fact("state", ask.who, ask.obj, (value,))
  if ask.op == "after":
    return Fact("state", ask.who, ask.obj, (value,), day=ask.day)
  if ask.op == "part":
    return Fact("part", None, ask.obj, (value,), unit=ask.unit)
  return Fact("compare", ask.who, ask.obj, (value,), ask.op, ask.other)


# ------------------------------------------------------------------------------- the working


def _eq(a: int, op: str, b: int, c: int) -> str:
  return f"{a} {op} {b} = {c}."


@dataclasses.dataclass
class _Quantity:
  value: int | None            # last known value (None: not recoverable from the text read)
  obj: str | None
  # Given changes since `value`: (fact, None, sentence) or, for a relation, (fact, (ref
  # working, ref value), sentence) with the other person's value taken when the relation was
  # stated.
  pending: list[tuple[Fact, Any, str]] = dataclasses.field(default_factory=list)


class _Replay:
  """Replays facts in order and writes the working of each derived fact.

  With `restate` (exercises), the working is a sequence of one-step problems worked out as the
  pretraining corpus works them: the number a step starts from ("Leo has 8 cards."), the
  sentence it reads (the change, the relation, the split, the question asked), the equation,
  and the number it reaches ("8 + 4 = 12. Leo has 12 cards."), which the next step starts from.
  """

  def __init__(self, restate: bool = False):
    self.restate = restate
    self.people: dict[str, _Quantity] = {}
    self.split: tuple[str | None, int, str] | None = None
    self.asked = ""

  def _resolve(self, name: str | None, until: str | None = None
               ) -> tuple[list[str], int | None]:
    """Applies `name`'s pending changes (through the one dated `until`, if given, leaving the
    later ones pending); returns the working and the value reached."""
    q = self.people.get(name) if name else None
    if q is None:
      return [], None
    if not q.pending:
      return ([f"{name} has {q.value} {q.obj}."] if q.value is not None else []), q.value
    lines, cur = [], q.value
    if cur is not None:
      lines.append(f"{name} {'has' if self.restate else 'had'} {cur} {q.obj}.")
    pending, rest = q.pending, []
    if until is not None:
      stop = next((i for i, (_, _, text) in enumerate(pending)
                   if text.startswith(f"On {until},")), len(pending) - 1)
      pending, rest = pending[:stop + 1], pending[stop + 1:]
    reached = [f"{name} has {{}} {q.obj}."] if self.restate else []
    for f, ref, text in pending:
      if f.kind == "relation":
        ref_lines, r = ref
        if r is None or (f.op == "half" and r % 2):
          cur = None
          break
        k = f.nums[0]
        cur, eq = {"more": (r + k, (r, "+", k)), "fewer": (r - k, (r, "-", k)),
                   "times": (k * r, (k, "*", r)), "half": (r // 2, (r, "/", 2))}[f.op]
        lines += ref_lines + ([text] if self.restate else []) + [_eq(*eq, cur)]
        lines += [line.format(cur) for line in reached]
        continue
      if cur is None:
        break
      if self.restate:
        lines.append(text)
      if f.kind == "groups":
        k = f.nums[0] * f.nums[1]
        lines.append(_eq(f.nums[0], "*", f.nums[1], k))
      else:
        k = f.nums[0]
      new = cur + k if f.op == "+" else cur - k
      lines.append(_eq(cur, f.op, k, new))
      lines += [line.format(new) for line in reached]
      cur = new
    q.pending = rest
    q.value = cur
    return (lines, cur) if cur is not None else ([], None)

  def step(self, fact: Fact, text: str = "") -> str | None:
    """Updates the replay with `fact` (stated by the sentence `text`); returns its working if
    it is a recoverable derived fact."""
    if fact.kind == "init":
      self.people[fact.who] = _Quantity(fact.nums[0], fact.obj)
    elif fact.kind in ("change", "groups"):
      self.people.setdefault(fact.who, _Quantity(None, fact.obj)).pending.append(
          (fact, None, text))
    elif fact.kind == "relation":
      self.people[fact.who] = _Quantity(None, fact.obj,
                                        [(fact, self._resolve(fact.other), text)])
    elif fact.kind == "split":
      self.split = (fact.who, fact.nums[0], text)
    elif fact.kind == "state":
      q = self.people.get(fact.who)
      lines, value = (self._resolve(fact.who, fact.day) if q is not None and q.pending
                      else ([], None))
      rest = q.pending if q is not None and fact.day else []
      self.people[fact.who] = _Quantity(fact.nums[0], fact.obj, rest)
      return " ".join(lines) if lines and value == fact.nums[0] else None
    elif fact.kind == "compare":
      la, a = self._resolve(fact.who)
      lb, b = self._resolve(fact.other)
      if a is None or b is None:
        return None
      x, o, y, z = {"more": (a, "-", b, a - b), "fewer": (b, "-", a, b - a),
                    "sum": (a, "+", b, a + b)}[fact.op]
      if z != fact.nums[0]:
        return None
      asked = [self.asked] if self.restate and self.asked else []
      return " ".join(la + lb + asked + [_eq(x, o, y, z)])
    elif fact.kind == "part" and self.split is not None:
      lines, value = self._resolve(self.split[0])
      g = self.split[1]
      if value is not None and value == g * fact.nums[0]:
        split = [self.split[2]] if self.restate and self.split[2] else []
        return " ".join(lines + split + [_eq(value, "/", g, fact.nums[0])])
    return None


def _restates(sentences: Sequence[str]) -> bool:
  """Exercises (text that opens with QUESTION_LEAD) get restating working (_Replay)."""
  return bool(sentences) and sentences[0].lstrip().startswith(QUESTION_LEAD)


def _thoughts(facts: Sequence[Sequence[Fact]], sentences: Sequence[str] | None = None
              ) -> list[str | None]:
  """The working of each row of facts; with the sentences that stated them, an exercise's
  working restates the sentences it reads."""
  replay = _Replay(restate=sentences is not None and _restates(sentences))
  out = []
  texts = ([_bare(t) for t in sentences] if sentences is not None else [""] * len(facts))
  for row, text in zip(facts, texts):
    if text.endswith("?"):
      replay.asked = text
    parts = [t for t in (replay.step(f, text) for f in row) if t]
    # Restating working starts with a space, as the text after the answer cue does: its
    # tokens are then those of a worked answer (" Mia has 5 cards." ...).
    lead = " " if replay.restate else ""
    out.append(lead + " ".join(parts) if parts else None)
  return out


def _bare(sentence: str) -> str:
  """A sentence without surrounding whitespace and without the question lead."""
  sentence = sentence.strip()
  return sentence[len(QUESTION_LEAD):] if sentence.startswith(QUESTION_LEAD) else sentence


def sentence_thoughts(sentences: Sequence[str]) -> list[str | None]:
  """The oracle working for each sentence of a story (None where nothing is derived)."""
  return _thoughts(parse_sentences(sentences), sentences)


def oracle_thought(prefix: str, suffix: str) -> str | None:
  """The oracle teacher: the working behind the derived quantities stated in `suffix`.

  Args:
    prefix: the text before the chunk (may be empty, or only the last few chunks).
    suffix: a chunk of one or more whole sentences of a story.
  Returns:
    Concise declarative working, e.g. "Mia had 52 marbles. 52 - 5 = 47.", the per-sentence
    workings joined by spaces; None if the suffix derives nothing. Facts are recovered from
    prefix + suffix alone: with the whole preceding story as prefix the result does not depend
    on how the story was chunked; a derived quantity whose inputs lie before a truncated prefix
    gets no working.
  """
  before = split_sentences(prefix)
  chunk = split_sentences(suffix)
  thoughts = sentence_thoughts(before + chunk)[len(before):]
  parts = [t for t in thoughts if t]
  return " ".join(parts) if parts else None


def oracle_cot(prefix: str, suffix: str) -> str:
  """The oracle's WRAP-CoT rewrite of `suffix`: each sentence that states a derived quantity is
  preceded by its working ("52 - 5 = 47. Now she has 47 marbles."); other sentences are kept.

  Sentences keep their original spacing, so with no derived quantity the result is `suffix`.
  """
  before = split_sentences(prefix)
  chunk = split_sentences(suffix)
  thoughts = sentence_thoughts(before + chunk)[len(before):]
  out = []
  for sentence, thought in zip(chunk, thoughts):
    if thought:
      lead = sentence[:len(sentence) - len(sentence.lstrip())]
      sentence = f"{lead}{thought.strip()} {sentence.lstrip()}"
    out.append(sentence)
  return "".join(out)


def derived_numbers(sentences: Sequence[str]) -> list[int | None]:
  """The derived number stated by each sentence (None for sentences of given facts only)."""
  out = []
  for row in parse_sentences(sentences):
    derived = [f.nums[0] for f in row if f.kind in DERIVED]
    out.append(derived[-1] if derived else None)
  return out


# Looser than _EQUATION (the oracle's exact form): sampled thoughts need not keep its spacing.
_ANY_EQUATION = re.compile(r"(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)")


def thought_arithmetic(thoughts: Iterable[str | None]) -> dict[str, Any]:
  """How many of the equations "a op b = c" written in `thoughts` are right.

  A diagnostic of thought quality on this corpus (the oracle's thoughts score 1.0): thoughts
  whose working is wrong cannot make the derived numbers of the text predictable. Division
  counts as right when b * c == a (the corpus divides evenly).
  """
  total = correct = 0
  for thought in thoughts:
    for a, op, b, c in _ANY_EQUATION.findall(thought or ""):
      a, b, c = int(a), int(b), int(c)
      right = {"+": a + b == c, "-": a - b == c, "*": a * b == c,
               "/": b != 0 and b * c == a}[op]
      total += 1
      correct += right
  return {"equations": total, "correct": correct,
          "fraction": correct / total if total else None}


def _equations(text: str | None) -> list[tuple[int, str, int, int]]:
  return [(int(a), op, int(b), int(c)) for a, op, b, c in _ANY_EQUATION.findall(text or "")]


def _right(a: int, op: str, b: int, c: int) -> bool:
  return {"+": a + b == c, "-": a - b == c, "*": a * b == c, "/": b != 0 and b * c == a}[op]


def _normal(eq: tuple[int, str, int, int]) -> tuple[int, str, int, int]:
  """An equation with the operands of + and * in order, so "7 + 5" and "5 + 7" are one."""
  a, op, b, c = eq
  return (min(a, b), op, max(a, b), c) if op in "+*" else eq


def explains(sentences: Sequence[str], start: int, stop: int, thought: str | None
             ) -> bool | None:
  """Whether `thought` is the right working of the derived numbers that sentences[start:stop]
  state (None when they state none): every equation it writes is right, it writes every
  equation of the oracle's working (either operand order for + and *), and its last
  equation's result is the last derived number stated. Wrong arithmetic, working that skips a
  step, or an equation that merely ends at the stated number do not count."""
  derived = [v for v in derived_numbers(sentences)[start:stop] if v is not None]
  if not derived:
    return None
  eqs = _equations(thought)
  if not eqs or not all(_right(*eq) for eq in eqs) or eqs[-1][3] != derived[-1]:
    return False
  oracle = sentence_thoughts(sentences)[start:stop]
  needed = collections.Counter(_normal(eq) for t in oracle for eq in _equations(t))
  return not needed - collections.Counter(_normal(eq) for eq in eqs)


def chunk_verdicts(doc: Sequence[tuple[str, str | None]]) -> list[bool | None] | None:
  """`explains` for every chunk of one document, given as (text, thought) pairs in order whose
  texts joined give the document: True / False per chunk that states a derived number, None
  for a chunk that states none; None for the whole document when its chunks do not end at
  sentence ends."""
  sentences = split_sentences("".join(text for text, _ in doc))
  per_chunk = [len(split_sentences(text)) for text, _ in doc]
  if sum(per_chunk) != len(sentences):
    return None
  out, start = [], 0
  for (_, thought), n in zip(doc, per_chunk):
    out.append(explains(sentences, start, start + n, thought))
    start += n
  return out


def thought_explains(documents: Iterable[Sequence[tuple[str, str | None]]]) -> dict[str, Any]:
  """How many chunks that state derived numbers have a thought that is their right working.

  `documents`: per document, its chunks in order as (text, thought); the texts joined give the
  document. A chunk counts when its sentences state at least one derived number, and is
  explained when `explains` says so: right arithmetic throughout, the oracle's equations all
  written, the last result the number stated. The oracle teacher scores 1.0. Documents whose
  chunks do not end at sentence ends are left out and counted.
  """
  chunks = explained = unaligned = 0
  for doc in documents:
    verdicts = chunk_verdicts(doc)
    if verdicts is None:
      unaligned += 1
      continue
    for ok in verdicts:
      if ok is not None:
        chunks += 1
        explained += ok
  return {"chunks": chunks, "explained": explained, "unaligned_docs": unaligned,
          "fraction": explained / chunks if chunks else None}


# ---------------------------------------------------------------------------------- generation

_NUMBER = re.compile(r"\d+")
_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


_BY_KIND: dict[tuple[str, str], list[_Template]] = {}
for _tpl in _TEMPLATES:
  for _frame in _tpl.frames:
    _BY_KIND.setdefault(("+".join(_tpl.kinds), _frame), []).append(_tpl)


def _objects(cfg: CorpusConfig) -> tuple[str, ...]:
  return OBJECTS[:cfg.n_objects] if cfg.n_objects else OBJECTS


def _people(cfg: CorpusConfig, rng: random.Random) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(names of the first person's gender, of the second's), limited to cfg.n_names each."""
  female, male = (FEMALE[:cfg.n_names], MALE[:cfg.n_names]) if cfg.n_names else (FEMALE, MALE)
  return (female, male) if rng.random() < 0.5 else (male, female)


class _Story:
  """Builds one story sentence by sentence, tracking true values and unresolved working."""

  def __init__(self, rng: random.Random, cfg: CorpusConfig):
    self.rng, self.cfg = rng, cfg
    self.frame = "money" if rng.random() < 0.3 else "items"
    self.past = rng.random() < 0.5 and not cfg.plain
    self.obj = "dollars" if self.frame == "money" else rng.choice(_objects(cfg))
    self.container = rng.choice(_CONTAINERS[self.frame])
    first, second = _people(cfg, rng)
    # Opposite genders: "she" / "he" always name one person.
    self.p, self.q = rng.choice(first), rng.choice(second)
    self.sentences: list[str] = []
    self.facts: list[tuple[Fact, ...]] = []
    self.value: dict[str, int] = {}
    self.cost: dict[str, int] = {}      # equations needed to state each person's value now
    self.last_op: dict[str, str] = {}
    self.seen: set[int] = set()         # numbers written so far
    self.subject: str | None = None
    self.split_done = self.compared = False
    self.day: int | None = None         # exercises: the day of the next change (DAYS index)

  # -- rendering

  def _person(self, name: str, form: str, pronoun_ok: bool) -> str:
    female = _GENDER[name] == "f"
    if (pronoun_ok and name == self.subject and not self.cfg.plain
        and self.rng.random() < 0.6):
      return {"S": "she" if female else "he", "O": "her" if female else "him",
              "P": "her" if female else "his"}[form]
    return name + "'s" if form == "P" else name

  def _template(self, kinds: str, op: str = "", who: str | None = None) -> _Template:
    after_sub = self.last_op.get(who) == "-"
    options = [t for t in _BY_KIND[kinds, self.frame]
               if (not op or t.op == op) and (after_sub or not t.after_sub)]
    if self.cfg.plain:
      return options[0]
    return self.rng.choice(options)

  def _emit(self, tpl: _Template, facts: Sequence[Fact], who: str, other: str | None = None,
            connective: str = "", **numbers: int) -> None:
    rng = self.rng
    slots = {k: str(v) for k, v in numbers.items()}
    # "Together she and Tom have" reads badly: two-person sentences name both.
    slots[tpl.who] = self._person(who, tpl.who, pronoun_ok=other is None)
    if other is not None:
      slots[tpl.other] = self._person(other, tpl.other, pronoun_ok=False)
    slots.update(pos="her" if _GENDER[who] == "f" else "his", obj=self.obj,
                 c=self.container[0], cs=self.container[1])
    for slot, words in (("rel", _RELATIVES), ("item", _ITEMS), ("thing", _THINGS),
                        ("job", _JOBS)):
      if "{" + slot + "}" in tpl.text:
        slots[slot] = words[0] if self.cfg.plain else rng.choice(words)
    if "f" in numbers:
      slots["times"] = next(w for w, f in _TIMES.items() if f == numbers["f"])
    conn = connective or ("" if self.cfg.plain or not tpl.connective or rng.random() >= 0.3
                          else rng.choice(_CONNECTIVES))
    text = _render(tpl, slots, self.past, conn)
    self.sentences.append((" " if self.sentences else "") + text)
    self.facts.append(tuple(facts))
    self.seen.update(int(x) for x in _NUMBER.findall(text))
    self.subject = who

  # -- number choices

  def _fresh(self, value: int) -> bool:
    """A value that may be stated as derived: in range and not already written."""
    return 1 < value <= self.cfg.max_value and value not in self.seen

  def _change(self, name: str, groups: bool) -> tuple[str, tuple[int, ...], int] | None:
    """(op, numbers, new value) for a change of `name`'s quantity, or None if none fits."""
    cur, cfg, rng = self.value[name], self.cfg, self.rng
    for _ in range(20):
      op = rng.choice("+-")
      if groups:
        nums = (rng.randint(2, 6), rng.randint(2, 9))
        delta = nums[0] * nums[1]
      else:
        hi = min(cfg.change_cap, cfg.max_value - cur if op == "+" else cur - 2)
        if hi < 2:
          continue
        delta = rng.randint(2, hi)
        nums = (delta,)
      new = cur + delta if op == "+" else cur - delta
      if self._fresh(new) and new not in nums:
        return op, nums, new
    return None

  # -- actions (each returns False when it does not fit the story so far)

  def init(self, name: str) -> bool:
    n = self.rng.randint(5, self.cfg.max_operand)
    self.value[name], self.cost[name] = n, 0
    self._emit(self._template("init"), [Fact("init", name, self.obj, (n,))], name, n=n)
    return True

  def mention(self, name: str) -> bool:
    self._emit(self._template("mention"), [], name)
    return True

  def event(self, name: str, with_state: bool = False, groups_ok: bool = True,
            cap: int | None = None) -> bool:
    cap = self.cfg.max_steps if cap is None else cap
    groups = (groups_ok and self.cost[name] + 2 <= cap and self.rng.random() < 0.4)
    if self.cost[name] + 1 + groups > cap:
      return False
    change = self._change(name, groups)
    if change is None:
      return False
    op, nums, new = change
    kind = "groups" if groups else "change"
    facts = [Fact(kind, name, self.obj, nums, op)]
    numbers = dict(zip("gs", nums)) if groups else {"k": nums[0]}
    self.value[name], self.cost[name] = new, self.cost[name] + 1 + groups
    self.last_op[name] = op
    if with_state:
      facts.append(Fact("state", name, self.obj, (new,)))
      self.cost[name] = 0
      self._emit(self._template(kind + "+state", op), facts, name, v=new, **numbers)
    else:
      day = ""
      if self.day is not None:
        day, self.day = _DAY_LEADS[self.day % len(DAYS)], self.day + 1
      self._emit(self._template(kind, op), facts, name, connective=day, **numbers)
    return True

  def state(self, name: str) -> bool:
    v = self.value[name]
    if not self.cost[name] or not self._fresh(v):
      return False
    self.cost[name] = 0
    self._emit(self._template("state", who=name), [Fact("state", name, self.obj, (v,))], name,
               v=v)
    return True

  def introduce(self, relation: bool = False) -> bool:
    """Introduces the second person: a given value, or (always with `relation`) one relative
    to the first person's current value, whose working then includes that value's."""
    p, q, rng, cfg = self.p, self.q, self.rng, self.cfg
    if not relation and (rng.random() < 0.35 or self.cost[p]):
      self.value[q], self.cost[q] = rng.randint(5, cfg.max_operand), 0
      self._emit(self._template("init"), [Fact("init", q, self.obj, (self.value[q],))], q,
                 n=self.value[q])
      return True
    ref = self.value[p]
    op = rng.choice(["more", "fewer", "times", "half"])
    if op == "more":
      top = min(cfg.max_operand, cfg.max_value - ref)
      k = rng.randint(2, top) if top >= 2 else 0
      v = ref + k
    elif op == "fewer":
      k = rng.randint(2, ref - 2) if ref >= 4 else 0
      v = ref - k
    elif op == "times":
      k = rng.choice([f for f in _TIMES.values() if f * ref <= cfg.max_value] or [0])
      v = k * ref
    else:
      k, v = (2, ref // 2) if ref % 2 == 0 else (0, 0)
    if not k or not self._fresh(v) or v == k or self.cost[p] + 1 > cfg.max_steps:
      return False
    self.value[q], self.cost[q] = v, self.cost[p] + 1
    numbers = {"f": k} if op in ("times", "half") else {"k": k}
    self._emit(self._template("relation", op), [Fact("relation", q, self.obj, (k,), op, p)], q,
               other=p, **numbers)
    return True

  def compare(self) -> bool:
    p, q = self.p, self.q
    if self.compared or self.cost[p] + self.cost[q] + 1 > self.cfg.max_steps:
      return False
    a, b = self.value[p], self.value[q]
    ops = [o for o, v in (("sum", a + b), ("diff", abs(a - b))) if self._fresh(v)]
    if not ops:
      return False
    op = self.rng.choice(ops)
    if op == "diff":
      op = self.rng.choice(["more", "fewer"])
      who, other = (p, q) if (a > b) == (op == "more") else (q, p)
    else:
      who, other = (p, q) if self.rng.random() < 0.5 else (q, p)
    v = a + b if op == "sum" else abs(a - b)
    self.cost[p] = self.cost[q] = 0
    self.compared = True
    self._emit(self._template("compare", op), [Fact("compare", who, self.obj, (v,), op, other)],
               who, other=other, v=v)
    return True

  def split(self) -> bool:
    p, v = self.p, self.value[self.p]
    if self.split_done or self.cost[p] + 1 > self.cfg.max_steps:
      return False
    options = [g for g in range(2, 10) if v % g == 0 and v // g >= 2 and g != v // g
               and self._fresh(v // g) and v // g not in (g, v)]
    if not options:
      return False
    g = self.rng.choice(options)
    unit = self.container[0]
    split = Fact("split", p, self.obj, (g,), unit=unit)
    part = Fact("part", None, self.obj, (v // g,), unit=unit)
    self.cost[p], self.split_done = 0, True
    if self.rng.random() < 0.4:
      self._emit(self._template("split+part"), [split, part], p, g=g, v=v // g)
    else:
      self._emit(self._template("split"), [split], p, g=g)
      self._emit(self._template("part"), [part], p, v=v // g)
    return True

  def ask(self, op: str, value: int, who: str, other: str | None = None,
          day: str | None = None) -> bool:
    """An exercise's end: the question, the answer cue on a new line, and the bare answer."""
    if not self._fresh(value):
      return False
    self._emit(self._template("ask", op), [], who, other=other,
               **({"day": day} if day else {}))
    self.sentences.append(ANSWER_CUE)
    self.facts.append(())
    unit = self.container[0] if op == "part" else None
    self._emit(self._template("answer"),
               [_answer_fact(Fact("ask", who, self.obj, (), op, other, unit, day), value)],
               who, v=value)
    return True


# The kinds of question, with how often each is asked: exercises and held-out questions alike.
KIND_WEIGHTS = {"chain": 4, "relation": 2, "sum": 1, "difference": 1, "split": 1}


def _build_exercise(rng: random.Random, cfg: CorpusConfig, kind: str | None = None,
                    steps: int | None = None) -> Document | None:
  """One attempt at an exercise of `kind` (None: random, KIND_WEIGHTS) whose answer takes
  `steps` equations (None: min_steps to max_steps), one operation each, without groups ("3
  bags of 4"), so that every step is one of the one-step exercises' operations:
    chain       a starting number and `steps` changes ("buys 7 more", "gives away 3")
    relation    `steps - 1` changes, then a second person with more / fewer / times / half
    sum, difference
                both people's numbers after `steps - 1` changes between them, then their sum
                or difference
    split       `steps - 1` changes, then an equal split into containers
  """
  st = _Story(rng, cfg)
  p, q = st.p, st.q
  kind = kind or rng.choices(list(KIND_WEIGHTS), list(KIND_WEIGHTS.values()))[0]
  n = steps if steps is not None else rng.randint(cfg.min_steps, cfg.max_steps)

  def changes(name: str, count: int) -> bool:
    return all(st.event(name, groups_ok=False, cap=st.cost[name] + 1) for _ in range(count))

  st.day = rng.randrange(len(DAYS))
  st.init(p)
  if kind == "chain" and n == 1 and cfg.max_steps > 1:
    # One step: the number after the first dated change, which later changes may follow (up
    # to max_steps changes in all): one operation, found by its day among several.
    first = DAYS[st.day]
    if not changes(p, 1):
      return None
    value = st.value[p]
    ok = changes(p, rng.randint(0, cfg.max_steps - 1))
    later = st.cost[p] > 1
    ok = ok and (st.ask("after", value, p, day=first) if later
                 else st.ask("state", value, p))
  elif kind == "chain":
    ok = changes(p, n) and st.ask("state", st.value[p], p)
  elif kind == "relation":
    ok = (changes(p, n - 1) and st.introduce(relation=True)
          and st.ask("state", st.value[q], q))
  elif kind in ("sum", "difference"):
    first = rng.randint(0, n - 1)
    if not changes(p, first):
      return None
    st.init(q)
    if not changes(q, n - 1 - first):
      return None
    a, b = st.value[p], st.value[q]
    if a == b:
      return None
    if kind == "sum":
      ok = st.ask("sum", a + b, *((p, q) if rng.random() < 0.5 else (q, p)))
    else:
      ok = st.ask("more", abs(a - b), *((p, q) if a > b else (q, p)))
  else:
    if not changes(p, n - 1):
      return None
    v = st.value[p]
    options = [g for g in range(2, 10) if v % g == 0 and v // g >= 2 and g != v // g]
    if not options:
      return None
    g = rng.choice(options)
    st._emit(st._template("split"), [Fact("split", p, st.obj, (g,), unit=st.container[0])], p,
             g=g)
    ok = st.ask("part", v // g, p)
  if not ok:
    return None
  st.sentences[0] = QUESTION_LEAD + st.sentences[0]
  doc = _validated(st, cfg)
  if doc is None or len(_EQUATION.findall(doc.oracle_thoughts[-1] or "")) != n:
    return None
  return doc


def _build_tally(rng: random.Random, cfg: CorpusConfig) -> Document | None:
  """One attempt at a tally story: per person, a starting value, changes, the stated result."""
  st = _Story(rng, cfg)
  for name in (st.p, st.q):
    st.init(name)
    for _ in range(rng.randint(cfg.max_steps - 1, cfg.max_steps)):
      if not st.event(name, groups_ok=False):
        return None
    if not st.state(name):
      return None
  return _validated(st, cfg)


def _build(rng: random.Random, cfg: CorpusConfig, steps: int | None = None) -> Document | None:
  """One attempt at a story; None when it came out too short or breaks a corpus property."""
  if cfg.tally:
    return _build_tally(rng, cfg)
  if cfg.exercises:
    return _build_exercise(rng, cfg, steps=steps)
  st = _Story(rng, cfg)
  p, q = st.p, st.q
  target = rng.randint(4, 9)
  if rng.random() < 0.35 and not cfg.plain:
    st.mention(p)
  st.init(p)
  for _ in range(40):
    if len(st.sentences) >= target:
      break
    cp, has_q = st.cost[p], q in st.value
    actions = [
        (3, lambda: st.event(p)),
        # Favour letting changes pile up: multi-step working is where thoughts help most.
        ((0, 1.5, 4, 6, 8)[min(cp, 4)], lambda: st.state(p)),
        (1.5, lambda: st.event(p, with_state=True)),
        (0 if has_q else 2, st.introduce),
        (4 if has_q and st.cost[q] else 0, lambda: st.state(q)),
        (1 if has_q else 0, lambda: st.event(q)),
        (2 if has_q and not st.compared else 0, st.compare),
        (0 if st.split_done else 1, st.split),
    ]
    weights = [w for w, _ in actions]
    rng.choices([a for _, a in actions], weights)[0]()
  for name in (p, q):
    if st.cost.get(name):
      st.state(name)
  if len(st.sentences) < 10 and rng.random() < 0.15 and not cfg.plain:
    st.mention(p)
  return _validated(st, cfg)


def _validated(st: _Story, cfg: CorpusConfig) -> Document | None:
  n = len(st.sentences)
  words = sum(len(s.split()) for s in st.sentences)
  if not 4 <= n <= (12 if cfg.tally else 10) or not (12 if cfg.exercises else 35) <= words <= 150:
    return None
  thoughts = _thoughts(st.facts, st.sentences)
  seen: set[int] = set()
  for sentence, facts, thought in zip(st.sentences, st.facts, thoughts):
    derived = [f.nums[0] for f in facts if f.kind in DERIVED]
    numbers = [int(x) for x in _NUMBER.findall(sentence)]
    if bool(derived) != (thought is not None):
      return None
    if derived:
      # Compressed text: the derived number is new, and it is what the working computes.
      if derived[-1] in seen or derived[-1] in numbers[:-1] or numbers[-1] != derived[-1]:
        return None
      eqs = _EQUATION.findall(thought)
      if len(eqs) > cfg.max_steps or int(eqs[-1][3]) != derived[-1]:
        return None
      if any(int(x) > cfg.max_value for eq in eqs for x in eq[::2] + (eq[3],)):
        return None
    seen.update(numbers)
  return Document("".join(st.sentences), list(st.sentences), thoughts, list(st.facts))


def generate_document(rng: random.Random, cfg: CorpusConfig | None = None,
                      steps: int | None = None) -> Document:
  """A random story (deterministic given the state of `rng`); for exercises, `steps` fixes
  the equations of the answer's working (None: min_steps to max_steps)."""
  cfg = cfg or CorpusConfig()
  for _ in range(1000):
    doc = _build(rng, cfg, steps)
    if doc is not None:
      return doc
  raise RuntimeError(f"no valid story in 1000 attempts for {cfg}")


# ------------------------------------------------------------------------ question answering
# Held-out evaluation in a different surface form: a question with an exact integer answer.

_QA_CLAUSES = {
    ("items", "+"): ("found {k} more", "bought {k} more", "got {k} more", "was given {k} more"),
    ("items", "-"): ("gave away {k}", "lost {k}", "gave {k} to a friend", "sold {k}"),
    ("items", "g+"): ("bought {g} {cs} with {s} {obj} in each",),
    ("items", "g-"): ("gave {g} friends {s} {obj} each",),
    ("money", "+"): ("earned {k} dollars", "was given {k} dollars"),
    ("money", "-"): ("spent {k} dollars", "paid {k} dollars for {thing}"),
    ("money", "g+"): ("worked {g} hours for {s} dollars an hour", "sold {g} {item} for {s} dollars "
                      "each"),
    ("money", "g-"): ("bought {g} {item} for {s} dollars each",),
}
QUESTION_KINDS = tuple(KIND_WEIGHTS)


def _question(rng: random.Random, cfg: CorpusConfig, kind: str) -> dict[str, Any] | None:
  """One question of `kind`: {"question", "solution", "answer", "steps"}, or None (retry)."""
  frame = "money" if rng.random() < 0.3 else "items"
  obj = "dollars" if frame == "money" else rng.choice(_objects(cfg))
  c, cs = rng.choice(_CONTAINERS[frame])
  first, second = _people(cfg, rng)
  p, q = rng.choice(first), rng.choice(second)
  pron = "she" if _GENDER[p] == "f" else "he"
  lo, hi = 5, cfg.max_operand
  eqs: list[tuple[int, str, int, int]] = []
  if kind == "chain" or (kind == "relation" and rng.random() < 0.5):
    # A chain of changes to p's quantity; a relation question may start with a one-step chain.
    steps = rng.randint(2, cfg.max_steps) if kind == "chain" else 1
    cur = rng.randint(lo, hi)
    body = f"{p} had {cur} {obj}"
    clauses = []
    while len(eqs) < steps:
      groups = len(eqs) + 2 <= steps and rng.random() < 0.5
      op = rng.choice("+-")
      if groups:
        g, s = rng.randint(2, 6), rng.randint(2, 9)
        delta = g * s
      else:
        top = min(cfg.change_cap, cfg.max_value - cur if op == "+" else cur - 2)
        if top < 2:
          return None
        delta = rng.randint(2, top)
        g = s = 0
      new = cur + delta if op == "+" else cur - delta
      if not 1 < new <= cfg.max_value:
        return None
      if groups:
        eqs.append((g, "*", s, delta))
      eqs.append((cur, op, delta, new))
      clause = rng.choice(_QA_CLAUSES[frame, ("g" if groups else "") + op])
      clauses.append(clause.format(k=delta, g=g, s=s, obj=obj, cs=cs, item=rng.choice(_ITEMS),
                                   thing=rng.choice(_THINGS)))
      cur = new
    body += f" and {clauses[0]}." + "".join(f" Then {pron} {cl}." for cl in clauses[1:])
    if kind == "chain":
      body += f" How many {obj} does {p} have now?"
  if kind == "relation":
    chained = bool(eqs)
    a = eqs[-1][3] if chained else rng.randint(lo, hi)
    op = rng.choice(["more", "fewer", "times", "half"] if a % 2 == 0 or not chained
                    else ["more", "fewer", "times"])
    if op == "more":
      k = rng.randint(2, max(2, min(hi, cfg.max_value - a)))
      eqs.append((a, "+", k, a + k))
      rel = f"{k} more {obj} than {p}"
    elif op == "fewer":
      k = rng.randint(2, max(2, a - 2))
      eqs.append((a, "-", k, a - k))
      rel = f"{k} fewer {obj} than {p}"
    elif op == "times":
      word, k = rng.choice(list(_TIMES.items()))
      eqs.append((k, "*", a, k * a))
      rel = f"{word} as many {obj} as {p}"
    else:
      a -= a % 2
      eqs.append((a, "/", 2, a // 2))
      rel = f"half as many {obj} as {p}"
    if chained:
      body += f" {q} has {rel} has now. How many {obj} does {q} have?"
    else:
      body = f"{p} has {a} {obj}. {q} has {rel}. How many {obj} does {q} have?"
  elif kind in ("sum", "difference"):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if kind == "sum":
      eqs.append((a, "+", b, a + b))
      ask = f"How many {obj} do they have together?"
    else:
      a, b = max(a, b), min(a, b)
      eqs.append((a, "-", b, a - b))
      ask = f"How many more {obj} does {p} have than {q}?"
    body = f"{p} has {a} {obj} and {q} has {b} {obj}. {ask}"
  elif kind == "split":
    g = rng.randint(2, min(9, cfg.max_operand // 2))
    part = rng.randint(2, cfg.max_operand // g)
    eqs.append((g * part, "/", g, part))
    body = (f"{p} has {g * part} {obj} and puts them into {g} {cs} with the same number in "
            f"each. How many {obj} are in each {c}?")
  answer = eqs[-1][3]
  if not 1 < answer <= cfg.max_value or any(x > cfg.max_value for e in eqs for x in e[::2]):
    return None
  if str(answer) in _NUMBER.findall(body):  # the answer must be computed, not copied
    return None
  working = " ".join(_eq(*e) for e in eqs)
  return {"question": f"Question: {body}\nAnswer:",
          "solution": f"{working} The answer is {answer}.", "answer": str(answer),
          "steps": len(eqs)}


def exercise_question(doc: Document) -> dict[str, Any]:
  """An exercise as a question record: the text up to "Answer:" is the question, the oracle's
  equations and "The answer is N." the solution."""
  working = " ".join(_eq(int(a), op, int(b), int(c))
                     for a, op, b, c in _EQUATION.findall(doc.oracle_thoughts[-1]))
  answer = derived_numbers(doc.sentences)[-1]
  return {"question": "".join(doc.sentences[:-1]), "solution": f"{working} The answer is {answer}.",
          "answer": str(answer), "steps": len(_EQUATION.findall(working))}


def generate_question(rng: random.Random, cfg: CorpusConfig | None = None,
                      kind: str | None = None, steps: int | None = None) -> dict[str, Any]:
  """A question record {"question", "solution", "answer", "steps"}; `kind` in QUESTION_KINDS.

  The question ends with "\\nAnswer:"; the solution shows the working, one operation per
  equation, and ends "The answer is N." (the few-shot exemplar format); `answer` is str(N).
  For exercises, `steps` fixes the equations of the working (None: min_steps to max_steps).
  """
  cfg = cfg or CorpusConfig()
  if kind is not None and kind not in QUESTION_KINDS:
    raise ValueError(f"question kind {kind!r} is not one of {list(QUESTION_KINDS)}")
  for _ in range(1000):
    k = kind or rng.choices(QUESTION_KINDS, list(KIND_WEIGHTS.values()))[0]
    if cfg.exercises:
      doc = _build_exercise(rng, cfg, k, steps)
      record = exercise_question(doc) if doc is not None else None
    else:
      record = _question(rng, cfg, k)
    if record is not None:
      return record
  raise RuntimeError(f"no valid question of kind {kind!r} in 1000 attempts")


# ------------------------------------------------------------------------------------ splits

TEXT_SPLITS = ("warmstart", "bootstrap", "validation", "fresh", "pretrain")
QA_SPLITS = ("fewshot", "dev", "eval")


def _pretrain_config(cfg: CorpusConfig) -> tuple[CorpusConfig, int | None]:
  """(the corpus settings, the equations per exercise) of the `pretrain` split: with
  `pretrain_steps`, starting values span the whole range (max_operand = max_value), so the
  one-step problems hold every step a multi-step exercise takes."""
  if not cfg.pretrain_steps:
    return cfg, None
  return (dataclasses.replace(cfg, max_operand=cfg.max_value, max_change=cfg.change_cap),
          cfg.pretrain_steps)


def question_of(text: str) -> str:
  """An exercise's question: its text through the answer cue."""
  return text[:text.rfind(ANSWER_CUE) + len(ANSWER_CUE)]


def make_splits(cfg: CorpusConfig | Any = None) -> dict[str, list[dict[str, Any]]]:
  """The corpus: story splits of {"id", "text"}, question splits of question records.

  Returns {"warmstart", "bootstrap", "validation", "fresh", "pretrain", "pretrain_cot",
  "pretrain_questions": [{"id", "text"}], "fewshot", "dev", "eval": [{"id", "question",
  "solution", "answer", "steps"}]}. Each split has its own random stream (seeded by cfg.seed
  and its name), so resizing one split leaves the others' contents unchanged; no text or
  question appears in two splits or twice in one (an exercise's question counts as its text).
  `pretrain_cot` is `pretrain` with the working written in (`oracle_cot`): text in the spirit
  of worked solutions, for a base model that already knows the working's form;
  `pretrain_questions` (exercises) holds questions alone, without cue or answer.
  """
  cfg = config_lib.from_config(CorpusConfig, cfg if cfg is not None else {}, "config.corpus")
  splits: dict[str, list[dict[str, Any]]] = {}
  seen: set[str] = set()
  for name in TEXT_SPLITS + ("pretrain_questions",):
    rng = random.Random(f"latent_em.mathcorpus/{cfg.seed}/{name}")
    split_cfg, steps = _pretrain_config(cfg) if name == "pretrain" else (cfg, None)
    rows = splits[name] = []
    while len(rows) < getattr(cfg, f"n_{name}"):
      text = generate_document(rng, split_cfg, steps).text
      question = question_of(text) if cfg.exercises else text
      if text not in seen and question not in seen:
        seen.update((text, question))
        if name == "pretrain_questions":
          text = question[:-len(ANSWER_CUE)]
        rows.append({"id": f"{name}-{len(rows):06d}", "text": text})
  splits["pretrain_cot"] = [{"id": f"pretrain_cot-{i:06d}", "text": oracle_cot("", r["text"])}
                            for i, r in enumerate(splits["pretrain"])]
  for name in QA_SPLITS:
    rng = random.Random(f"latent_em.mathcorpus/{cfg.seed}/{name}")
    rows = splits[name] = []
    while len(rows) < getattr(cfg, f"n_{name}"):
      # Few-shot exemplars cycle through the kinds so that every kind is demonstrated.
      kind = QUESTION_KINDS[len(rows) % len(QUESTION_KINDS)] if name == "fewshot" else None
      record = generate_question(rng, cfg, kind)
      if record["question"] not in seen:
        seen.add(record["question"])
        rows.append({"id": f"{name}-{len(rows):06d}", **record})
  return splits


def write_jsonl(splits: dict[str, list[dict[str, Any]]], out_dir: str) -> dict[str, str]:
  """Writes OUT_DIR/<split>.jsonl for every split (atomically); returns split -> path."""
  paths = {}
  for name, rows in splits.items():
    paths[name] = os.path.join(out_dir, f"{name}.jsonl")
    io_utils.write_jsonl(paths[name], rows)
  return paths


def corpus_stats(splits: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
  """Per split: docs, words, characters; for stories also sentences, the fraction of sentences
  that state a derived quantity and the mean equations per derived quantity; for questions the
  mean equations per answer."""
  out = {}
  for name, rows in splits.items():
    texts = [r["text"] if "text" in r else r["question"] for r in rows]
    stats = {"docs": len(rows), "words": sum(len(t.split()) for t in texts),
             "characters": sum(len(t) for t in texts)}
    if rows and "text" in rows[0]:
      thoughts = [t for text in texts for t in sentence_thoughts(split_sentences(text))]
      derived = [t for t in thoughts if t]
      stats.update(sentences=len(thoughts),
                   derived_fraction=len(derived) / max(len(thoughts), 1),
                   equations_per_derived=sum(len(_EQUATION.findall(t)) for t in derived)
                   / max(len(derived), 1))
    elif rows:
      stats["equations_per_answer"] = sum(r["steps"] for r in rows) / len(rows)
    out[name] = stats
  return out
