"""Tests for latent_em.data.mathcorpus: the built-in compressed math stories and their oracle."""
import collections
import dataclasses
import json
import operator
import os
import random
import re

import hypothesis
import pytest
from hypothesis import strategies as st

from latent_em import config_lib
from latent_em.data import chunking
from latent_em.data import mathcorpus as mc

SMALL = mc.CorpusConfig(n_warmstart=60, n_bootstrap=120, n_validation=40, n_eval=60, n_fewshot=8,
                        n_fresh=20, n_pretrain=30)
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
RECALL = re.compile(r"([A-Z][a-z]+) ha[sd] (\d+) ([a-z]+)\.")
NUMBER = re.compile(r"\d+")


@pytest.fixture(scope="module")
def splits():
  return mc.make_splits(SMALL)


@pytest.fixture(scope="module")
def docs():
  rng = random.Random(1234)
  return [mc.generate_document(rng) for _ in range(400)]


def _numbers(text):
  return [int(x) for x in NUMBER.findall(text)]


def _word_numbers(text):
  """Factors written as words ("twice as many", "half as many")."""
  words = {"twice": 2, "three times": 3, "four times": 4, "half": 2}
  return {v for w, v in words.items() if w in text}


# ------------------------------------------------------------------------------- config


def test_config_rejects_bad_values_with_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"config\.corpus\.max_steps"):
    mc.CorpusConfig(max_steps=7)
  with pytest.raises(config_lib.ConfigError, match=r"config\.corpus\.n_bootstrap"):
    mc.CorpusConfig(n_bootstrap=-1)
  with pytest.raises(config_lib.ConfigError, match=r"config\.corpus\.max_operand"):
    mc.CorpusConfig(max_operand=120, max_value=99)
  with pytest.raises(config_lib.ConfigError, match=r"config\.corpus\.max_change"):
    mc.CorpusConfig(max_operand=10, max_value=20, max_change=12)
  with pytest.raises(config_lib.ConfigError, match=r"did you mean config\.corpus\.n_eval"):
    mc.make_splits({"n_evals": 3})
  with pytest.raises(ValueError, match="not one of"):
    mc.generate_question(random.Random(0), kind="riddle")


# ------------------------------------------------------------------------------- splits


def test_splits_are_deterministic_and_seeded(splits):
  assert mc.make_splits(SMALL) == splits
  other = mc.make_splits(mc.CorpusConfig(**{**SMALL.__dict__, "seed": 1}))
  for name in (n for n in splits if splits[n]):
    assert [r.get("text", r.get("question")) for r in other[name]] != \
           [r.get("text", r.get("question")) for r in splits[name]], name
  # Each split has its own stream: resizing one leaves the others as they were.
  resized = mc.make_splits(mc.CorpusConfig(**{**SMALL.__dict__, "n_warmstart": 10}))
  assert resized["warmstart"] == splits["warmstart"][:10]
  assert resized["bootstrap"] == splits["bootstrap"]
  assert resized["eval"] == splits["eval"]


def test_splits_sizes_fields_and_disjointness(splits):
  assert {k: len(v) for k, v in splits.items()} == {
      "warmstart": 60, "bootstrap": 120, "validation": 40, "fresh": 20, "pretrain": 30,
      "pretrain_cot": 30, "pretrain_questions": 0, "fewshot": 8, "dev": 0, "eval": 60}
  texts = [r["text"] for name in mc.TEXT_SPLITS for r in splits[name]]
  questions = [r["question"] for name in mc.QA_SPLITS for r in splits[name]]
  assert len(set(texts)) == len(texts)
  assert len(set(questions)) == len(questions)
  ids = [r["id"] for rows in splits.values() for r in rows]
  assert len(set(ids)) == len(ids)
  for name in mc.TEXT_SPLITS:
    assert all(set(r) == {"id", "text"} for r in splits[name])
  for name in mc.QA_SPLITS:
    assert all(set(r) == {"id", "question", "solution", "answer", "steps"} for r in splits[name])
  # pretrain_cot: the pretraining stories with the oracle's working before each derived
  # sentence; taking the working out gives the story back.
  for story, worked in zip(splits["pretrain"], splits["pretrain_cot"]):
    sentences = mc.split_sentences(story["text"])
    workings = [t for t in mc.sentence_thoughts(sentences) if t]
    assert workings and worked["text"] != story["text"]
    stripped = worked["text"]
    for w in workings:
      assert w + " " in stripped
      stripped = stripped.replace(w + " ", "", 1)
    assert stripped == story["text"]
  # Every question kind is demonstrated in the few-shot exemplars.
  asks = [r["question"].rsplit(". ", 1)[-1] for r in splits["fewshot"]]
  assert any("do they have together" in a for a in asks)
  assert any("in each" in a for a in asks)
  assert any("How many more" in a for a in asks)


def test_write_jsonl_round_trips_atomically(splits, tmp_path):
  paths = mc.write_jsonl(splits, str(tmp_path / "corpus"))
  assert set(paths) == set(splits)
  for name, path in paths.items():
    with open(path, encoding="utf-8") as f:
      assert [json.loads(line) for line in f] == splits[name]
  assert sorted(os.listdir(tmp_path / "corpus")) == sorted(f"{n}.jsonl" for n in splits)


def test_corpus_stats_counts(splits):
  stats = mc.corpus_stats(splits)
  rows = splits["validation"]
  assert stats["validation"]["docs"] == len(rows)
  assert stats["validation"]["words"] == sum(len(r["text"].split()) for r in rows)
  assert stats["validation"]["characters"] == sum(len(r["text"]) for r in rows)
  n_sent = sum(len(chunking.split_units(r["text"], "sentence")) for r in rows)
  assert stats["validation"]["sentences"] == n_sent
  assert 0.25 < stats["validation"]["derived_fraction"] < 0.6
  assert 1.2 < stats["validation"]["equations_per_derived"] <= SMALL.max_steps
  assert stats["eval"]["equations_per_answer"] == pytest.approx(
      sum(r["steps"] for r in splits["eval"]) / len(splits["eval"]))


# ------------------------------------------------------------------------------- stories


def test_story_shape(docs):
  for doc in docs:
    assert "".join(doc.sentences) == doc.text
    # The project's sentence chunker (DESIGN §3) sees the same sentences.
    assert chunking.split_units(doc.text, "sentence") == doc.sentences
    assert len(doc.oracle_thoughts) == len(doc.facts) == len(doc.sentences)
    assert 4 <= len(doc.sentences) <= 10
    assert 35 <= len(doc.text.split()) <= 150
  # Surface variety: many distinct openings and sentence shapes, not a handful of strings.
  shapes = {re.sub(r"\d+", "N", s.strip()) for doc in docs for s in doc.sentences}
  assert len(shapes) > 800
  assert len({doc.sentences[0] for doc in docs}) > 0.9 * len(docs)


def test_parser_recovers_the_generated_facts(docs):
  """The story grammar is unambiguous: parsing the text gives back exactly the facts."""
  for doc in docs:
    assert mc.parse_sentences(doc.sentences) == [tuple(r) for r in doc.facts], doc.text


def test_oracle_arithmetic_is_correct(docs):
  n_eq = 0
  for doc in docs:
    for thought in doc.oracle_thoughts:
      if thought is None:
        continue
      # A thought is recalled facts and equations, nothing else.
      assert not RECALL.sub("", EQUATION.sub("", thought)).strip(), thought
      eqs = EQUATION.findall(thought)
      assert 1 <= len(eqs) <= mc.CorpusConfig().max_steps
      for a, op, b, c in eqs:
        a, b, c = int(a), int(b), int(c)
        assert OPS[op](a, b) == c, thought
        if op == "/":
          assert a % b == 0, thought
        assert max(a, b, c) <= mc.CorpusConfig().max_value
        n_eq += 1
  assert n_eq > 800


def test_thought_arithmetic_scores_equations(docs):
  oracle = mc.thought_arithmetic(t for doc in docs for t in doc.oracle_thoughts)
  assert oracle["equations"] > 800 and oracle["fraction"] == 1.0
  got = mc.thought_arithmetic(["Mia had 52 marbles. 52 - 5 = 47.", None, "",
                               "3 * 4 = 12. 12 / 4 = 3. 10+10=10.", "5 / 0 = 0. 7 / 2 = 3."])
  assert (got["equations"], got["correct"]) == (6, 3)
  assert mc.thought_arithmetic(["no working here"])["fraction"] is None


def test_thought_explains_counts_chunks_whose_thought_computes_their_numbers(docs):
  """The oracle's working explains every chunk that states a derived number; the working of
  another chunk (right arithmetic, wrong quantities) explains almost none."""
  chunked = []
  for doc in docs[:100]:
    chunks = ["".join(doc.sentences[i:i + 2]) for i in range(0, len(doc.sentences), 2)]
    chunked.append([(c, mc.oracle_thought("".join(chunks[:k]), c))
                    for k, c in enumerate(chunks)])
  oracle = mc.thought_explains(chunked)
  assert oracle["chunks"] > 200 and oracle["fraction"] == 1.0 and oracle["unaligned_docs"] == 0
  assert mc.thought_arithmetic(t for doc in chunked for _, t in doc)["fraction"] == 1.0
  shifted = [[(c, doc[k - 1][1]) for k, (c, _) in enumerate(doc)] for doc in chunked]
  assert mc.thought_arithmetic(t for doc in shifted for _, t in doc)["fraction"] == 1.0
  assert mc.thought_explains(shifted)["fraction"] < 0.2
  none = mc.thought_explains([[(c, None) for c, _ in doc] for doc in chunked])
  assert none["chunks"] == oracle["chunks"] and none["explained"] == 0
  # A chunk cut inside a sentence: that document is counted, not scored.
  text = "".join(docs[0].sentences)
  cut = mc.thought_explains([[(text[:7], None), (text[7:], None)]])
  assert (cut["unaligned_docs"], cut["chunks"], cut["fraction"]) == (1, 0, None)


def test_text_is_compressed_and_the_thought_supplies_the_working(docs):
  """Each derived number is absent from everything written before it, and the thought computes
  it with equations whose operands all come from earlier text or earlier working."""
  n_derived = 0
  for doc in docs:
    before = []            # numbers of the raw text so far
    worked = set()         # numbers written by the previous thoughts
    for i, (sentence, facts, thought) in enumerate(
        zip(doc.sentences, doc.facts, doc.oracle_thoughts)):
      numbers = _numbers(sentence)
      derived = [f for f in facts if f.kind in mc.DERIVED]
      assert bool(derived) == (thought is not None), sentence
      if derived:
        n_derived += 1
        value = derived[-1].nums[0]
        assert numbers[-1] == value
        assert value not in before and value not in numbers[:-1], (doc.text, sentence)
        available = (set(before) | set(numbers[:-1]) | worked
                     | _word_numbers("".join(doc.sentences[:i + 1])))
        for name, v, _ in RECALL.findall(thought):
          assert int(v) in available, (doc.text, thought)
        for a, _, b, c in EQUATION.findall(thought):
          assert int(a) in available and int(b) in available, (doc.text, thought)
          available.add(int(c))
        assert int(EQUATION.findall(thought)[-1][3]) == value
        worked |= set(_numbers(thought))
      before += numbers
  assert n_derived > 0.3 * sum(len(d.sentences) for d in docs)


def test_thoughts_make_derived_numbers_predictable(docs, splits):
  """No neural net: count/copy predictors of each derived number, with and without thoughts.

  A copy model (predict the most recent number in context) never gets a derived number from
  the raw text, and always gets it when the thought precedes the sentence (the prior form).
  The best constant guess (unigram of derived numbers on other stories) is rarely right.
  """
  train = collections.Counter()
  for row in splits["warmstart"] + splits["bootstrap"]:
    sentences = mc.split_sentences(row["text"])
    train.update(n for n in mc.derived_numbers(sentences) if n is not None)
  unigram_guess = train.most_common(1)[0][0]
  hits = collections.Counter()
  total = 0
  for doc in docs:
    context_raw, context_thought = "", ""
    for sentence, thought, value in zip(doc.sentences, doc.oracle_thoughts,
                                        mc.derived_numbers(doc.sentences)):
      if value is not None:
        total += 1
        raw = _numbers(context_raw)
        head = sentence[:sentence.rindex(str(value))]  # the sentence up to the derived number
        hits["copy_raw"] += bool(raw) and raw[-1] == value
        hits["copy_any_raw"] += value in raw + _numbers(head)
        hits["copy_thought"] += _numbers(context_thought + thought)[-1] == value
        hits["unigram"] += value == unigram_guess
      context_raw += sentence
      context_thought += (thought or "") + sentence
  assert total > 500
  assert hits["copy_raw"] == hits["copy_any_raw"] == 0
  assert hits["copy_thought"] == total
  assert hits["unigram"] / total < 0.1


# ------------------------------------------------------------------------------- the oracle


def test_oracle_on_hand_written_text():
  prefix = "Mia has 52 marbles. She gives 5 marbles to her brother."
  assert mc.oracle_thought(prefix, " Now she has 47 marbles.") == "Mia had 52 marbles. 52 - 5 = 47."
  assert mc.oracle_thought("", prefix) is None  # given facts only
  text = ("Mia has 52 marbles. She gives 5 marbles to her brother. Then she buys 3 bags of "
          "marbles with 6 marbles in each bag. So she has 65 marbles. Tom has 12 fewer marbles "
          "than Mia. That means nothing. So Tom has 53 marbles. Together Mia and Tom have 118 "
          "marbles. Mia puts all of her marbles into 5 jars with the same number in each. Each "
          "jar holds 13 marbles.")
  # An unparsed sentence ("That means nothing.") carries no facts and breaks nothing.
  sentences = mc.split_sentences(text)
  assert mc.sentence_thoughts(sentences) == [
      None, None, None, "Mia had 52 marbles. 52 - 5 = 47. 3 * 6 = 18. 47 + 18 = 65.", None,
      None, "Mia has 65 marbles. 65 - 12 = 53.",
      "Mia has 65 marbles. Tom has 53 marbles. 65 + 53 = 118.", None,
      "Mia has 65 marbles. 65 / 5 = 13."]
  # A chunk of several sentences gets the workings of all of them, in order.
  assert mc.oracle_thought("".join(sentences[:3]), "".join(sentences[3:8])) == (
      "Mia had 52 marbles. 52 - 5 = 47. 3 * 6 = 18. 47 + 18 = 65. Mia has 65 marbles. "
      "65 - 12 = 53. Mia has 65 marbles. Tom has 53 marbles. 65 + 53 = 118.")
  # The start value lies before a truncated prefix: no working rather than wrong working.
  assert mc.oracle_thought(sentences[1], sentences[2] + sentences[3]) is None
  # A stated number that contradicts the facts gets no working either.
  assert mc.oracle_thought(prefix, " Now she has 46 marbles.") is None


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.booleans(), min_size=9,
                                                                   max_size=9))
def test_oracle_does_not_depend_on_chunking(seed, cuts):
  """With the whole story before a chunk as prefix, the oracle gives the chunk the workings of
  its sentences, however the sentences are grouped; with a truncated prefix, each sentence's
  working is either the same or absent, never different."""
  doc = mc.generate_document(random.Random(seed))
  chunks, current = [], doc.sentences[0]
  for sentence, cut in zip(doc.sentences[1:], cuts):
    if cut:
      chunks.append(current)
      current = ""
    current += sentence
  chunks.append(current)
  i = 0
  for k, chunk in enumerate(chunks):
    n = len(chunking.split_units(chunk, "sentence"))
    want = [t for t in doc.oracle_thoughts[i:i + n] if t]
    got = mc.oracle_thought("".join(chunks[:k]), chunk)
    assert got == (" ".join(want) if want else None)
    # Teacher prompts with one previous chunk as prefix (DESIGN §3): sentence by sentence, the
    # working is the full one or missing.
    before = chunking.split_units("".join(chunks[max(0, k - 1):k]), "sentence")
    short = mc.sentence_thoughts(before + chunking.split_units(chunk, "sentence"))[len(before):]
    for piece, full in zip(short, doc.oracle_thoughts[i:i + n]):
      assert piece is None or piece == full
    i += n


# ------------------------------------------------------------------------------- evaluation

# An independent reader of the question surface form: verbs decide the sign of each change
# (selling loses items but earns money; buying gains items but spends money).
_PLUS = {"items": ("found", "bought", "got", "was given"),
         "money": ("earned", "was given", "worked", "sold")}
_MINUS = {"items": ("gave", "lost", "sold"), "money": ("spent", "paid", "bought")}


def _solve(question):
  body = question[len("Question: "):question.index("\nAnswer:")]
  m = re.match(r"(\w+) has (\d+) \w+ and (\w+) has (\d+) \w+\. How many (more )?", body)
  if m:
    a, b = int(m.group(2)), int(m.group(4))
    return a - b if m.group(5) else a + b
  m = re.match(r"\w+ has (\d+) \w+ and puts them into (\d+) ", body)
  if m:
    return int(m.group(1)) // int(m.group(2))
  sentences = re.split(r"(?<=\.) ", body)
  m = re.match(r"\w+ ha[sd] (\d+) \w+", sentences[0])
  value = int(m.group(1))
  for clause in re.split(r" and |\. Then (?:she|he) |\. ", " ".join(sentences[:-1]))[1:]:
    clause = clause.rstrip(".")
    if " has " in clause:  # the relation to the other person
      k = _numbers(clause)
      if "twice" in clause or "three times" in clause or "four times" in clause:
        value *= {"twice": 2, "three times": 3, "four times": 4}[
            re.search(r"twice|three times|four times", clause).group(0)]
      elif "half" in clause:
        value //= 2
      else:
        value += k[0] if "more" in clause else -k[0]
      continue
    nums = _numbers(clause)
    if not nums:
      continue
    delta = nums[0] * nums[1] if len(nums) == 2 else nums[0]
    frame = "money" if " dollars" in sentences[0] else "items"
    if clause.startswith(_MINUS[frame]):
      value -= delta
    else:
      assert clause.startswith(_PLUS[frame]), clause
      value += delta
  return value


def test_eval_answers_are_correct(splits):
  for row in splits["eval"] + splits["fewshot"]:
    assert row["question"].startswith("Question: ") and row["question"].endswith("\nAnswer:")
    assert int(row["answer"]) == _solve(row["question"]), row
    eqs = EQUATION.findall(row["solution"])
    assert len(eqs) == row["steps"] <= SMALL.max_steps
    for a, op, b, c in eqs:
      assert OPS[op](int(a), int(b)) == int(c)
    assert row["solution"] == " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in eqs) + \
        f" The answer is {row['answer']}."
    # The answer has to be computed: it is not written in the question.
    assert row["answer"] not in NUMBER.findall(row["question"])
  steps = collections.Counter(r["steps"] for r in splits["eval"])
  assert set(steps) == set(range(1, SMALL.max_steps + 1))


def test_entity_pools_limit_names_and_objects():
  cfg = mc.CorpusConfig(n_warmstart=40, n_bootstrap=0, n_validation=0, n_eval=30, n_fewshot=0,
                        n_names=2, n_objects=3)
  splits = mc.make_splits(cfg)
  allowed_names = set(mc.FEMALE[:2] + mc.MALE[:2])
  allowed_objects = set(mc.OBJECTS[:3]) | {"dollars"}
  for text in [r["text"] for r in splits["warmstart"]] + [r["question"] for r in splits["eval"]]:
    words = set(text.replace(".", " ").replace(",", " ").replace("'s", " ").split())
    assert not (words & (set(mc.FEMALE + mc.MALE) - allowed_names)), text
    assert not (words & (set(mc.OBJECTS) - allowed_objects)), text
  # The oracle still explains every story.
  assert all(mc.oracle_thought("", r["text"]) for r in splits["warmstart"])


def test_plain_stories_use_one_wording_and_keep_every_property():
  cfg = mc.CorpusConfig(plain=True, max_operand=10, max_value=20, max_steps=2)
  rng, rng_default = random.Random(5), random.Random(5)
  docs = [mc.generate_document(rng, cfg) for _ in range(80)]
  default = [mc.generate_document(rng_default, dataclasses.replace(cfg, plain=False))
             for _ in range(80)]
  words = lambda ds: {w for d in ds for w in re.sub(r"[.,]", " ", d.text).split()}
  # Present tense, names for people, no side remarks or connectives.
  for forbidden in ("had", "She", "He", "she", "he", "Then", "Later", "collecting", "proud"):
    assert forbidden not in words(docs), forbidden
  entity = re.compile(r"\b(%s)\b" % "|".join(mc.FEMALE + mc.MALE + mc.OBJECTS + ("dollars",)))
  shapes = lambda ds: {entity.sub("X", re.sub(r"\d+", "N", s.strip()))
                       for d in ds for s in d.sentences}
  assert len(shapes(docs)) < 0.5 * len(shapes(default))
  for doc in docs:
    # Plain stories still parse back into their facts, and the oracle's working computes
    # every derived number.
    assert mc.parse_sentences(doc.sentences) == [tuple(r) for r in doc.facts], doc.text
    for number, thought in zip(mc.derived_numbers(doc.sentences), doc.oracle_thoughts):
      assert (number is None) == (thought is None)
      if number is not None:
        assert int(EQUATION.findall(thought)[-1][3]) == number


@pytest.mark.parametrize("max_steps,max_change", [(3, 0), (4, 0), (4, 4)])
def test_tally_stories_derive_only_multi_step_totals(max_steps, max_change):
  cfg = mc.CorpusConfig(plain=True, tally=True, max_operand=10, max_value=30,
                        max_steps=max_steps, max_change=max_change)
  rng = random.Random(3)
  docs = [mc.generate_document(rng, cfg) for _ in range(60)]
  changes = [f.nums[0] for doc in docs for row in doc.facts for f in row if f.kind == "change"]
  # Every change is within the cap, and the cap binds: without it, larger changes occur.
  assert max(changes) == (max_change or 10) and min(changes) == 2
  questions = [mc.generate_question(rng, cfg, "chain") for _ in range(40)]
  # (A change by groups, "3 bags of 5", is a product: not capped.)
  deltas = [int(eq[2]) for q in questions if "*" not in q["solution"]
            for eq in EQUATION.findall(q["solution"])]
  assert max(deltas) == (max_change or 10)
  for doc in docs:
    assert mc.parse_sentences(doc.sentences) == [tuple(r) for r in doc.facts], doc.text
    kinds = [tuple(f.kind for f in row) for row in doc.facts]
    # Per person: a starting value, max_steps - 1 or max_steps plain changes, the stated total.
    assert kinds[0] == ("init",) and kinds[-1] == ("state",), doc.text
    states = [i for i, k in enumerate(kinds) if k == ("state",)]
    assert len(states) == 2 and kinds[states[0] + 1] == ("init",), doc.text
    for start, end in ((0, states[0]), (states[0] + 1, states[1])):
      assert set(kinds[start + 1:end]) == {("change",)}
      assert max_steps - 1 <= end - start - 1 <= max_steps
      who = doc.facts[start][0].who
      assert {row[0].who for row in doc.facts[start:end + 1]} == {who}
      # The working replays every change from the stated start to the stated total.
      thought = doc.oracle_thoughts[end]
      eqs = EQUATION.findall(thought)
      assert len(eqs) == end - start - 1
      assert int(eqs[0][0]) == doc.facts[start][0].nums[0]
      assert int(eqs[-1][3]) == doc.facts[end][0].nums[0]
      assert all(int(x) <= cfg.max_value for eq in eqs for x in eq[::2] + (eq[3],))
    assert [t is None for t in doc.oracle_thoughts] == [k != ("state",) for k in kinds]


# ------------------------------------------------------------------------------- exercises

EXERCISES = mc.CorpusConfig(exercises=True, plain=True, max_operand=10, max_value=20,
                            min_steps=2, max_steps=4, n_names=4, n_objects=4, n_warmstart=80,
                            n_bootstrap=80, n_validation=20, n_eval=60, n_dev=40, n_fewshot=8,
                            n_pretrain=40, pretrain_steps=1, n_pretrain_questions=40)
_FACTORS = {"twice": 2, "three times": 3, "four times": 4}
_TAKE = re.compile(r"\b(gives \d+|gives away|loses|sells|uses|spends|pays)\b")
_DAY = re.compile(r"On (%s), " % "|".join(mc.DAYS))


def _solve_exercise(question):
  """Solves a plain exercise from its words alone (independent of the generator's facts)."""
  body = question[len("Question: "):question.index("\nAnswer:")]
  value, split, after = {}, None, {}
  for s in re.findall(r"[^.?]+[.?]", body):
    day = _DAY.match(s.strip())
    s = _DAY.sub("", s.strip())
    who, nums = s.split()[0], _numbers(s)
    if m := re.fullmatch(r"How many \w+ does (\w+) have after (\w+)\?", s):
      return after[m[2]]
    if m := re.fullmatch(r"(\w+) has (\d+) \w+\.", s):
      value[who] = int(m[2])
    elif m := re.fullmatch(r"\w+ has \d+ (more|fewer) \w+ than (\w+)\.", s):
      value[who] = value[m[2]] + (nums[0] if m[1] == "more" else -nums[0])
    elif m := re.fullmatch(r"\w+ has (twice|three times|four times|half) as many \w+ as (\w+)\.",
                           s):
      value[who] = value[m[2]] // 2 if m[1] == "half" else value[m[2]] * _FACTORS[m[1]]
    elif m := re.fullmatch(r"How many \w+ do (\w+) and (\w+) have together\?", s):
      return value[m[1]] + value[m[2]]
    elif m := re.fullmatch(r"How many more \w+ does (\w+) have than (\w+)\?", s):
      return value[m[1]] - value[m[2]]
    elif re.fullmatch(r"How many \w+ are in each \w+\?", s):
      return value[split[0]] // split[1]
    elif m := re.fullmatch(r"How many \w+ does (\w+) have(?: now)?\?", s):
      return value[m[1]]
    elif "puts all of" in s:
      split = (who, nums[0])
    elif m := re.fullmatch(r"(?:[Hh]is|[Hh]er) \w+ gives (\w+) (\d+) \w+\.", s):
      value[m[1]] += int(m[2])
    else:  # a change of the subject's number: these verbs take away, the others add
      value[who] += -nums[0] if _TAKE.search(s) else nums[0]
    if day:
      after[day[1]] = value[who]
  raise AssertionError(f"no question in {question!r}")


def test_exercises_are_answer_keys_the_oracle_works_out():
  rng = random.Random(7)
  docs = [mc.generate_document(rng, EXERCISES) for _ in range(300)]
  asks, steps = collections.Counter(), collections.Counter()
  for doc in docs:
    question, cue, answer = doc.text.rpartition("\nAnswer:")
    assert doc.text.startswith("Question: ") and cue and re.fullmatch(r" The answer is \d+\.",
                                                                       answer), doc.text
    assert mc.split_sentences(doc.text) == doc.sentences
    assert mc.parse_sentences(doc.sentences) == [tuple(r) for r in doc.facts], doc.text
    value = int(_numbers(answer)[0])
    # The answer is computed, never copied: it is written nowhere in the question.
    assert value == _solve_exercise(question + cue) and value not in _numbers(question)
    # Only the answer is derived; its working is min_steps to max_steps right equations.
    assert [t is None for t in doc.oracle_thoughts] == [True] * (len(doc.sentences) - 1) + [False]
    thought = doc.oracle_thoughts[-1]
    eqs = EQUATION.findall(thought)
    steps[len(eqs)] += 1
    assert EXERCISES.min_steps <= len(eqs) <= EXERCISES.max_steps and int(eqs[-1][3]) == value
    assert all(OPS[op](int(a), int(b)) == int(c) for a, op, b, c in eqs)
    # The working is one-step problems in a row: each restates the number it starts from,
    # the sentence it reads, computes, and states the number it reaches; it starts with a
    # space, as a worked answer after the cue does.
    assert thought.startswith(" ") and not thought.startswith("  ")
    sentences = [mc._bare(s) for s in doc.sentences]
    words = [s.strip() for s in re.findall(r"[^.?]+[.?]", EQUATION.sub("", thought))]
    reached = {int(c) for *_, c in eqs}
    for w in words:
      m = re.fullmatch(r"(\w+) has (\d+) \w+\.", w)
      assert w in sentences or (m and int(m[2]) in reached), (w, doc.text)
    for (a, _, _, c), nxt in zip(eqs, eqs[1:]):
      assert f"{c}. " in thought
    # Changes are dated by consecutive days.
    days = _DAY.findall(question)
    assert all(mc.DAYS.index(b) == (mc.DAYS.index(a) + 1) % 7 for a, b in zip(days, days[1:]))
    asks[re.sub(r"\b(%s)\b" % "|".join(mc.FEMALE + mc.MALE + mc.OBJECTS + ("dollars",)), "X",
                re.sub(r"each \w+\?", "each C?", doc.sentences[-3].strip()))] += 1
    # Chunked as the quickstart chunks: the question is context (no thought), the answer the
    # one chunk the oracle works out.
    cfg = {"min_units": 12, "avg_units": 12, "max_units": 12, "break_after": mc.ANSWER_BREAK,
           "context_until": mc.ANSWER_BREAK}
    pairs = chunking.chunk_pairs(doc.text, cfg, prefix_chunks=1)
    assert [(p.context, p.suffix) for p in pairs] == [(True, question + cue), (False, answer)]
    assert mc.oracle_thought(pairs[1].prefix, pairs[1].suffix) == thought
    assert mc.oracle_thought("", pairs[0].suffix) is None
  # Every kind of question is asked, most often how many one person has now; every number
  # of steps occurs.
  assert set(asks) == {"How many X does X have now?", "How many X do X and X have together?",
                       "How many more X does X have than X?", "How many X are in each C?"}, asks
  assert asks.most_common(1)[0][0] == "How many X does X have now?"
  assert set(steps) == {2, 3, 4}


def test_exercise_splits_evaluate_held_out_questions():
  splits = mc.make_splits(EXERCISES)
  assert {k: len(v) for k, v in splits.items()} == {
      "warmstart": 80, "bootstrap": 80, "validation": 20, "fresh": 0, "pretrain": 40,
      "pretrain_cot": 40, "pretrain_questions": 40, "fewshot": 8, "dev": 40, "eval": 60}
  training = [r["text"] for name in mc.TEXT_SPLITS + ("pretrain_cot", "pretrain_questions")
              for r in splits[name]]
  bodies = [mc.question_of(t)[len("Question: "):-len("\nAnswer:")]
            if "\nAnswer:" in t else t[len("Question: "):] for t in training]
  held_out = splits["eval"] + splits["dev"] + splits["fewshot"]
  assert len({r["question"] for r in held_out}) == len(held_out)
  for row in held_out:
    # No held-out question is in any training split, the base's included, as a question or
    # inside a document.
    body = row["question"][len("Question: "):-len("\nAnswer:")]
    assert row["question"].endswith("\nAnswer:")
    assert body not in bodies and not any(body in t for t in training)
    assert int(row["answer"]) == _solve_exercise(row["question"])
    eqs = EQUATION.findall(row["solution"])
    assert len(eqs) == row["steps"] and all(OPS[op](int(a), int(b)) == int(c)
                                            for a, op, b, c in eqs)
    assert EXERCISES.min_steps <= row["steps"] <= EXERCISES.max_steps
    assert row["solution"].endswith(f"{eqs[-1][3]}. The answer is {row['answer']}.")
  # The base's corpus: one-step problems with their working written after the cue, and
  # multi-step questions alone.
  for plain, worked in zip(splits["pretrain"], splits["pretrain_cot"]):
    eqs = EQUATION.findall(worked["text"])
    assert len(eqs) == 1 and worked["text"].startswith(mc.question_of(plain["text"]))
    assert re.search(r"\nAnswer: .*\d+ [-+*/] \d+ = (\d+)\.(?: \w+ has \1 \w+\.)? "
                     r"The answer is \1\.$", worked["text"]), worked["text"]
    assert int(eqs[0][3]) == _solve_exercise(mc.question_of(plain["text"]))
  for row in splits["pretrain_questions"]:
    assert row["text"].startswith("Question: ") and row["text"].endswith("?")
    assert "Answer" not in row["text"] and len(_DAY.findall(row["text"])) >= 1 or "has" in row["text"]
  # One-step problems start anywhere in the range: every value a multi-step exercise reaches.
  starts = {int(_numbers(r["text"])[0]) for r in splits["pretrain"]}
  assert max(starts) > EXERCISES.max_operand
  with pytest.raises(config_lib.ConfigError, match=r"config\.corpus\.exercises"):
    mc.CorpusConfig(exercises=True, tally=True)
  with pytest.raises(config_lib.ConfigError, match=r"config\.corpus\.min_steps"):
    mc.CorpusConfig(exercises=True, min_steps=5, max_steps=4)
  with pytest.raises(config_lib.ConfigError, match=r"config\.corpus\.pretrain_steps"):
    mc.CorpusConfig(pretrain_steps=1)


def test_thought_explains_counts_only_right_working_that_ends_at_the_answer():
  """An exercise's answer is explained by the oracle's working (either operand order for + and
  *, with or without restated sentences), not by working with a wrong step, a skipped step, an
  equation that merely ends at the answer, or the right working of another exercise."""
  rng = random.Random(3)
  docs = [mc.generate_document(rng, EXERCISES, steps=3) for _ in range(40)]
  for doc, other in zip(docs, docs[1:] + docs[:1]):
    question, answer = doc.text[:doc.text.rindex(" The answer")], doc.text[
        doc.text.rindex(" The answer"):]
    thought = doc.oracle_thoughts[-1]
    eqs = EQUATION.findall(thought)
    short = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in eqs)
    swapped = " ".join(f"{b} {op} {a} = {c}." if op in "+*" else f"{a} {op} {b} = {c}."
                       for a, op, b, c in eqs)
    final = int(eqs[-1][3])
    wrong_step = short.replace(f"= {eqs[0][3]}.", f"= {int(eqs[0][3]) + 1}.", 1)
    skipped = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in eqs[1:])
    shortcut = f"{final - 1} + 1 = {final}."
    cases = {thought: True, short: True, swapped: True, wrong_step: False, skipped: False,
             shortcut: False, other.oracle_thoughts[-1]: False, None: False}
    for t, want in cases.items():
      got = mc.thought_explains([[(question, None), (answer, t)]])
      assert got["chunks"] == 1 and got["explained"] == want, (doc.text, t)
