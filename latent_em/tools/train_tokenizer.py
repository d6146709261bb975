r"""Trains a tokenizer with the latent tokens, or adds them to a pretrained one.

  # Train on JSONL documents (one JSON object per line, text in --text_field):
  python -m latent_em.tools.train_tokenizer --input=a.jsonl,b.jsonl --text_field=text \
      --vocab_size=8000 --output=/tmp/tok.model [--max_docs=100000]

  # Append the 4 latent tokens (ids V..V+3) to a pretrained model, e.g. TinyLlama's:
  python -m latent_em.tools.train_tokenizer --base_model=tokenizer.model --output=tok.model

Prints the vocabulary size and the latent-token ids.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterator, Sequence

from absl import app
from absl import flags

from latent_em import tokenizer


def _define_flags() -> None:
  """Defined only when run as a program, so importing read_jsonl_texts adds no global flags."""
  flags.DEFINE_list("input", [], "JSONL files with the training documents.")
  flags.DEFINE_string("text_field", "text", "JSON field holding a document's text.")
  flags.DEFINE_integer("vocab_size", 0, "Pieces in the trained model (all ids).")
  flags.DEFINE_string("output", "", "The .model file to write.")
  flags.DEFINE_integer("max_docs", 0, "Read at most this many documents (0 = all).")
  flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "sentencepiece model type.")
  flags.DEFINE_float("character_coverage", 1.0,
                     "Fraction of characters with their own piece; the rest use bytes.")
  flags.DEFINE_integer("seed", 0, "sentencepiece random seed.")
  flags.DEFINE_string("base_model", "",
                      "Instead of training: append the latent tokens to this .model file.")


def read_jsonl_texts(paths: Sequence[str], text_field: str, max_docs: int = 0) -> Iterator[str]:
  """Yields `text_field` of every JSON line of `paths`, in order; blank lines are skipped.

  Raises:
    FileNotFoundError: a file does not exist.
    ValueError: a line is not a JSON object with a string `text_field`; names file:line.
  """
  n = 0
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--input file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                           "each line must be one JSON object") from None
        if not isinstance(record, dict) or text_field not in record:
          keys = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise ValueError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); "
                           "pass --text_field=NAME") from None
        text = record[text_field]
        if not isinstance(text, str):
          raise ValueError(f"{path}:{lineno}: field {text_field!r} is a "
                           f"{type(text).__name__}, not a string")
        yield text
        n += 1
        if max_docs and n >= max_docs:
          return


def run(*, output: str, inputs: Sequence[str] = (), text_field: str = "text",
        vocab_size: int = 0, max_docs: int = 0, model_type: str = "bpe",
        character_coverage: float = 1.0, seed: int = 0,
        base_model: str = "") -> tokenizer.Tokenizer:
  """Trains a model on `inputs`, or extends `base_model`; prints and returns it loaded."""
  if not output:
    raise app.UsageError("--output=PATH.model is required")
  if base_model:
    if inputs:
      raise app.UsageError("pass either --base_model (add latent tokens) or --input (train)")
    path = tokenizer.add_latent_tokens(base_model, output)
  else:
    if not inputs:
      raise app.UsageError("--input=FILE.jsonl[,FILE2...] is required (or --base_model)")
    if vocab_size <= 0:
      raise app.UsageError("--vocab_size=N is required when training")
    texts = list(read_jsonl_texts(inputs, text_field, max_docs))
    print(f"read {len(texts)} documents from {len(inputs)} file(s)")
    path = tokenizer.train(texts, output, vocab_size, model_type=model_type,
                           character_coverage=character_coverage, seed=seed)
  tok = tokenizer.load(path)
  print(f"wrote {path}")
  print(f"vocab_size: {tok.vocab_size}")
  print(f"pad_id: {tok.pad_id} bos_id: {tok.bos_id} eos_id: {tok.eos_id}")
  print("latent_ids: " + json.dumps(tok.latent_ids))
  return tok


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    run(output=f.output, inputs=f.input, text_field=f.text_field, vocab_size=f.vocab_size,
        max_docs=f.max_docs, model_type=f.model_type, character_coverage=f.character_coverage,
        seed=f.seed, base_model=f.base_model)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
