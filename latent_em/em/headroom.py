r"""Where a run's nats go on the built-in corpus, and how much a right thought could save.

  python -m latent_em.em.headroom --config=configs/quickstart.py --workdir=/tmp/bolt_quickstart

For every finished run of an EM workdir, scores the first `--docs` validation stories sentence
by sentence and reports, per token of raw text:
  nll_per_token           -log p(sentence | BOS, earlier sentences), averaged over all tokens
  derived_tokens          the tokens that spell derived quantities (the numbers the text states
                          without the working, e.g. "47" in "Now she has 47 marbles."; one token
                          per digit, or one per number when the tokenizer keeps numbers whole):
                          their count, NLL per token and share of all nats — the most a thought
                          could remove
  derived_tokens_given_thought
                          NLL per derived-number token when the oracle working is placed before the
                          sentence in prior form (`... SoL PRIOR z EoL sentence`): how much the
                          run *uses* a right thought (thought-trained runs; the working's own
                          cost is not counted)
  oracle_layout           every story laid out as in training, the oracle working before each
                          sentence that states a derived number (prior form, `SoL PRIOR z EoL`):
                          nll_per_token (its raw tokens, the working given free),
                          nll_per_token_without (the same stories without any working),
                          thought_nats_per_token (the working's own nats, per raw token; of
                          them format_nats_per_token are the format's markers SoL PRIOR ... EoL,
                          which include the `random` format's prior / posterior coin) and
                          joint_per_token = -log p(x, z*) per raw token: the negative ELBO of a
                          posterior that always proposes the oracle working z* (log q(z*) = 0),
                          sentence by sentence with every earlier working in context (the
                          E-step's chunks hold ~2 sentences and may find cheaper thoughts)
  story_layout            the whole story as one chunk, its whole oracle working first
                          (`SoL PRIOR z* EoL x`, the layout of whole-story chunks):
                          thought_nats_per_token (z* with its markers), nll_per_token (x given
                          z*) and joint_per_token = -log p(x, z*) per raw token
Writes WORKDIR/headroom.json (atomically) and prints a table.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from typing import Any, Sequence

import numpy as np

from latent_em import formats, io_utils
from latent_em.data import mathcorpus, sources
from latent_em.sampling import scoring

OUTPUT = "headroom.json"


@dataclasses.dataclass(frozen=True)
class Sentence:
  """One sentence of a story: the ids before it, its own ids, where its derived numbers are."""
  prefix: str                   # the earlier sentences
  text: str                     # the sentence
  context: list[int]            # BOS + ids of `prefix`
  target: list[int]             # the sentence's tokens
  numbers: list[int]            # positions in `target` of derived-number tokens
  thought: str | None           # the oracle working (None: nothing derived, or not recoverable)


def _tail(tokenizer, context_text: str, text: str, context: list[int]) -> list[int] | None:
  """The ids `text` adds after `context_text`, or None if tokenizing them together would not
  keep `context` as a prefix (then the sentence cannot be scored on its own)."""
  ids = tokenizer.encode(context_text + text)
  n = len(context) - 1  # context carries BOS
  return ids[n:] if ids[:n] == context[1:] else None


def _number_positions(tokenizer, target: list[int], values: Sequence[int]) -> list[int]:
  """Positions of the tokens that spell each value as a whole number in `target` (one token per
  digit with a digit-splitting tokenizer; one token when the number is a piece of its own)."""
  pieces = [tokenizer.id_to_piece(t).lstrip("\u2581") for t in target]
  out = []
  for v in values:
    want = str(v)
    for j in range(len(pieces)):
      if j and pieces[j - 1].isdigit():
        continue
      text, k = "", j
      while k < len(pieces) and pieces[k].isdigit() and len(text) < len(want):
        text, k = text + pieces[k], k + 1
      if text == want and (k == len(pieces) or not pieces[k].isdigit()):
        out.extend(range(j, k))
        break
  return out


def story_sentences(tokenizer, text: str) -> tuple[list[Sentence], int]:
  """The scoreable sentences of a story, and how many were left out (tokenization across the
  sentence boundary differs from tokenizing the sentence after its context)."""
  sentences = mathcorpus.split_sentences(text)
  facts = mathcorpus.parse_sentences(sentences)
  thoughts = mathcorpus.sentence_thoughts(sentences)
  out, skipped = [], 0
  prefix = ""
  for s, fs, thought in zip(sentences, facts, thoughts):
    context = [tokenizer.bos_id] + tokenizer.encode(prefix)
    target = _tail(tokenizer, prefix, s, context)
    if not target:
      skipped += 1
    else:
      values = [f.nums[0] for f in fs if f.kind in mathcorpus.DERIVED] if thought else []
      numbers = _number_positions(tokenizer, target, values)
      out.append(Sentence(prefix, s, context, target, numbers, thought))
    prefix += s
  return out, skipped


@dataclasses.dataclass(frozen=True)
class Pairs:
  """What `score` scores for a set of stories, built once and shared by every run."""
  sentences: list[tuple[list[int], list[int]]]   # (context, sentence) per sentence
  numbers: list[tuple[list[int], list[int]]]     # (context + sentence so far, [number token])
  numbers_given_thought: list[tuple[list[int], list[int]]]  # the same after the oracle working
  layout_text: list[tuple[list[int], list[int]]]      # oracle layout: each sentence after the
  layout_thoughts: list[tuple[list[int], list[int]]]  # story so far; each working z likewise
  layout_markers: list[tuple[list[int], list[int]]]   # and its `SoL PRIOR` and `EoL`
  in_layout: list[bool]                               # per sentence: its story is laid out
  layout_docs: int
  story_thoughts: list[tuple[list[int], list[int]]]   # story layout: [BOS] -> SoL PRIOR z* EoL
  story_text: list[tuple[list[int], list[int]]]       # and the story after it
  docs: int
  docs_too_long: int
  sentences_skipped: int


_PairList = list[tuple[list[int], list[int]]]


def oracle_layout(tokenizer, sentences: Sequence[Sentence], row_len: int
                  ) -> tuple[_PairList, _PairList, _PairList]:
  """(sentence pairs, working pairs, marker pairs) of one story laid out with its oracle working
  in prior form (`SoL PRIOR z EoL`: the markers `SoL PRIOR` and `EoL` apart from z), each scored
  after everything before it; ([], [], []) if the layout does not fit one row or tokenizes
  differently across a boundary."""
  text_pairs, thought_pairs, marker_pairs = [], [], []
  ids = tokenizer.latent_ids
  head, tail = [ids[formats.SOL], ids[formats.PRIOR]], [ids[formats.EOL]]
  layout = ""
  context = [tokenizer.bos_id]
  for s in sentences:
    segments = [(s.text, False)]
    if s.thought:
      segments.insert(0, (formats.prior_chunk(s.thought, ""), True))
    for segment, is_thought in segments:
      target = _tail(tokenizer, layout, segment, context)
      if not target or len(context) + len(target) > row_len:
        return [], [], []
      if not is_thought:
        text_pairs.append((context, target))
      else:
        n = len(target)
        if n < 4 or target[:2] != head or target[-1:] != tail:
          return [], [], []
        marker_pairs += [(context, head), (context + target[:n - 1], tail)]
        thought_pairs.append((context + head, target[2:n - 1]))
      layout += segment
      context = context + target
  return text_pairs, thought_pairs, marker_pairs


def pairs(tokenizer, texts: Sequence[str], row_len: int) -> Pairs:
  """The scoring pairs of `texts`; stories longer than a row are counted and left out."""
  sentences, skipped, too_long = [], 0, 0
  layout_text, layout_thoughts, layout_markers, in_layout, laid_out = [], [], [], [], 0
  story_thoughts, story_text = [], []
  for text in texts:
    if 1 + len(tokenizer.encode(text)) > row_len:
      too_long += 1   # scored only whole, from BOS, like the validation NLL: no room to do so
      continue
    s, k = story_sentences(tokenizer, text)
    sentences += s
    skipped += k
    lt, lz, lm = oracle_layout(tokenizer, s, row_len) if not k else ([], [], [])
    layout_text += lt
    layout_thoughts += lz
    layout_markers += lm
    in_layout += [bool(lt)] * len(s)
    laid_out += bool(lt)
    z = mathcorpus.oracle_thought("", text)
    if z:
      thought = formats.prior_chunk(z, "")
      context = [tokenizer.bos_id] + tokenizer.encode(thought)
      tail = _tail(tokenizer, thought, text, context)
      if tail and len(context) + len(tail) <= row_len:
        story_thoughts.append((context[:1], context[1:]))
        story_text.append((context, tail))
  # One pair per derived-number token: the sentence up to that token, then the token.
  plain, given = [], []
  for s in sentences:
    if not s.numbers:
      continue
    thought_ctx_text = s.prefix + formats.SOL + formats.PRIOR + s.thought + formats.EOL
    thought_ctx = [tokenizer.bos_id] + tokenizer.encode(thought_ctx_text)
    same = _tail(tokenizer, thought_ctx_text, s.text, thought_ctx) == s.target
    for j in s.numbers:
      plain.append((s.context + s.target[:j], [s.target[j]]))
      if same and len(thought_ctx) + j <= row_len:  # fits one row
        given.append((thought_ctx + s.target[:j], [s.target[j]]))
  return Pairs([(s.context, s.target) for s in sentences], plain, given, layout_text,
               layout_thoughts, layout_markers, in_layout, laid_out, story_thoughts,
               story_text, len(texts) - too_long, too_long, skipped)


def score(logprob_fn, params: Any, p: Pairs, *, row_len: int, rows: int = 16) -> dict[str, Any]:
  """The module docstring's numbers for one model."""
  run = lambda ps: (scoring.score(logprob_fn, params, ps, row_len, rows_per_batch=rows)
                    if ps else np.zeros(0))
  total, number_lp, given_lp = run(p.sentences), run(p.numbers), run(p.numbers_given_thought)
  text_lp = run(p.layout_text)
  marker_nats = -float(run(p.layout_markers).sum())
  thought_nats = -float(run(p.layout_thoughts).sum()) + marker_nats
  tokens = sum(len(t) for _, t in p.sentences)
  nats = -float(total.sum())
  mean_nll = lambda lp: -float(lp.mean()) if lp.size else float("nan")
  layout_tokens = sum(len(t) for _, t in p.layout_text)
  per_token = lambda x: x / layout_tokens if layout_tokens else float("nan")
  without = -float(total[np.asarray(p.in_layout, bool)].sum()) if total.size else 0.0
  story_z, story_x = -float(run(p.story_thoughts).sum()), -float(run(p.story_text).sum())
  story_tokens = sum(len(t) for _, t in p.story_text)
  per_story_token = lambda x: x / story_tokens if story_tokens else float("nan")
  return {
      "docs": p.docs, "docs_too_long": p.docs_too_long, "sentences": len(p.sentences),
      "sentences_skipped": p.sentences_skipped,
      "tokens": tokens, "nll_per_token": nats / max(tokens, 1),
      "derived_tokens": {
          "count": len(p.numbers), "nll_per_number_token": mean_nll(number_lp),
          "share_of_nats": -float(number_lp.sum()) / nats if nats else float("nan")},
      "derived_tokens_given_thought": {
          "count": len(p.numbers_given_thought), "nll_per_number_token": mean_nll(given_lp)},
      "oracle_layout": {
          "docs": p.layout_docs,
          "tokens": layout_tokens,
          "thought_tokens": sum(len(t) for _, t in p.layout_thoughts + p.layout_markers),
          "nll_per_token": per_token(-float(text_lp.sum())),
          "nll_per_token_without": per_token(without),
          "thought_nats_per_token": per_token(thought_nats),
          "format_nats_per_token": per_token(marker_nats),
          "joint_per_token": per_token(-float(text_lp.sum()) + thought_nats)},
      "story_layout": {
          "docs": len(p.story_text), "tokens": story_tokens,
          "thought_tokens": sum(len(t) for _, t in p.story_thoughts),
          "nll_per_token": per_story_token(story_x),
          "thought_nats_per_token": per_story_token(story_z),
          "joint_per_token": per_story_token(story_z + story_x)},
  }


def measure(logprob_fn, params: Any, tokenizer, texts: Sequence[str], *, row_len: int,
            rows: int = 16) -> dict[str, Any]:
  """`score` on the pairs of `texts` (one model; `run` builds the pairs once for many)."""
  return score(logprob_fn, params, pairs(tokenizer, texts, row_len), row_len=row_len, rows=rows)


def _runs(workdir: str) -> list[str]:
  runs_dir = os.path.join(workdir, "runs")
  names = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
  return [n for n in names
          if os.path.exists(os.path.join(runs_dir, n, "train", "STAGE_DONE.json"))]


def run(config, workdir: str, docs: int = 120) -> dict[str, Any]:
  """Measures every finished run of the EM workdir; writes WORKDIR/headroom.json."""
  from latent_em import runtime, train  # pylint: disable=g-import-not-at-top
  from latent_em import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "corpus", "validation.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a workdir of an EM job on "
                            "the built-in corpus (run configs/quickstart.py there first)")
  names = _runs(workdir)
  if not names:
    raise FileNotFoundError(f"no finished run under {workdir}/runs/*/train (STAGE_DONE.json)")
  stats = sources.InputStats()
  texts = [t for _, t in itertools.islice(
      sources.read_texts(path, runtime.section(config, "data").text_field, "skip", stats), docs)]
  tokenizer = tok_lib.load(os.path.join(workdir, "tokenizer.model"))
  model_cfg = runtime.model_config(config, tokenizer)
  logprob_fn = scoring.make_token_logprobs(model_cfg)
  row_len = runtime.section(config, "data").seq_len
  shared = pairs(tokenizer, texts, row_len)
  results = {}
  for name in names:
    params = train.load_init_params(os.path.join(workdir, "runs", name, "train"), model_cfg)
    results[name] = score(logprob_fn, params, shared, row_len=row_len)
  io_utils.write_json(os.path.join(workdir, OUTPUT), {"docs": len(texts), "runs": results})
  return results


def table(results: dict[str, Any]) -> str:
  lines = ["| run | NLL/token | derived-number tokens | NLL/number token | share of nats | "
           "NLL/number token given oracle thought | oracle layout: NLL/token without / with "
           "working | working nats/token (of them format markers) | -log p(x, z*)/token | "
           "whole story, z* first: working + text = -log p(x, z*) per token |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    d, g, o = r["derived_tokens"], r["derived_tokens_given_thought"], r["oracle_layout"]
    st = r["story_layout"]
    lines.append(f"| {name} | {r['nll_per_token']:.3f} | {d['count']} "
                 f"| {d['nll_per_number_token']:.2f} | {100 * d['share_of_nats']:.1f}% "
                 f"| {g['nll_per_number_token']:.2f} "
                 f"| {o['nll_per_token_without']:.3f} / {o['nll_per_token']:.3f} "
                 f"| {o['thought_nats_per_token']:.3f} ({o['format_nats_per_token']:.3f}) "
                 f"| {o['joint_per_token']:.3f} "
                 f"| {st['thought_nats_per_token']:.3f} + {st['nll_per_token']:.3f} = "
                 f"{st['joint_per_token']:.3f} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from latent_em import config_lib  # pylint: disable=g-import-not-at-top
  try:
    results = run(_CONFIG.value, flags.FLAGS.workdir, flags.FLAGS.docs)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(table(results))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The EM run's config file[:variant].")
  flags.DEFINE_string("workdir", None, "The EM job's workdir.")
  flags.DEFINE_integer("docs", 120, "Validation stories to score.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
