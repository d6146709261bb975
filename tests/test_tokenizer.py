"""Tokenizer: id layout, latent tokens as single ids, byte-exact round trips, extending a
Llama-style model, agreement with seqio (Python and TF paths), the CLI and its errors."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from latent_em import formats
from latent_em import tokenizer
from latent_em.tools import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k",
                     "train.jsonl")
SOL, EOL, PRIOR, POST = formats.LATENT_TOKENS
VOCAB = 400

TRICKY = [
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "\nleading newline",
    "trailing newlines\n\n",
    "tabs\tand\r\nwindows lines",
    "  x = 12345.678, y=-0.5\n\t\\frac{1}{2} $\\alpha^2$",
    "unicode: é 中文 😀 e\u0301 \ufb01 \uff11\uff12 ½ ≤ ∑",  # NFKC would rewrite several
    f"{SOL}{PRIOR}think{EOL}write",
    f"{SOL}{EOL}chunk{SOL}{POST}why{EOL}",
    f"in{SOL}side{EOL}words and{PRIOR}{POST}adjacent",
    f" {SOL} spaced {EOL} ",
    f"line\n{SOL}\n{EOL}\n",
    " ⁇ <unk> <s> </s> <pad>",  # sentencepiece's unk surface and special piece names as text
]


def _corpus() -> list[str]:
  """A few hundred multi-line GSM8K problems; generated text if shared data is absent."""
  if os.path.exists(GSM8K):
    with open(GSM8K, encoding="utf-8") as f:
      rows = [json.loads(line) for _, line in zip(range(300), f)]
    return [r["question"] + "\n" + r["answer"] for r in rows]
  rng = np.random.default_rng(0)
  words = "the of a number is sum total each apples cost dollars more than twice half".split()
  return [" ".join(rng.choice(words, 30)) + f".\n{i} + {i * 7} = {i * 8}\n#### {i * 8}"
          for i in range(300)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  return _corpus()


@pytest.fixture(scope="module")
def own(tmp_path_factory, corpus) -> tokenizer.Tokenizer:
  path = str(tmp_path_factory.mktemp("own") / "own.model")
  assert tokenizer.train(corpus, path, VOCAB) == path
  return tokenizer.load(path)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, corpus) -> str:
  """A BPE model without latent tokens, with Llama-2's settings (trained directly with spm)."""
  lines = [line for text in corpus for line in text.split("\n") if line]
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=writer, model_type="bpe", vocab_size=VOCAB,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      character_coverage=1.0, minloglevel=2)
  path = tmp_path_factory.mktemp("llama") / "base.model"
  path.write_bytes(writer.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def ext(llama_base) -> tokenizer.Tokenizer:
  out = os.path.join(os.path.dirname(llama_base), "ext.model")
  assert tokenizer.add_latent_tokens(llama_base, out) == out
  return tokenizer.load(out)


def _raw(tok: tokenizer.Tokenizer) -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_file=tok.path)


# ----------------------------------------------------------------------------- trained layout


def test_trained_layout(own):
  sp = _raw(own)
  assert own.vocab_size == sp.get_piece_size() == VOCAB
  assert (own.pad_id, own.eos_id, sp.unk_id(), own.bos_id) == (0, 1, 2, 3)
  assert sp.pad_id() == 0
  assert own.latent_ids == {SOL: 4, EOL: 5, PRIOR: 6, POST: 7}
  assert list(own.latent_ids) == list(formats.LATENT_TOKENS)
  assert [sp.id_to_piece(i) for i in (8, 263)] == ["<0x00>", "<0xFF>"]
  assert all(sp.is_byte(i) for i in range(8, 264))
  proto = sp_pb2.ModelProto.FromString(open(own.path, "rb").read())
  assert proto.normalizer_spec.name == "identity"
  assert not proto.normalizer_spec.add_dummy_prefix
  assert not proto.normalizer_spec.remove_extra_whitespaces
  assert proto.trainer_spec.split_digits and proto.trainer_spec.byte_fallback


def test_training_is_deterministic(own, corpus, tmp_path):
  again = tokenizer.train(corpus, str(tmp_path / "again.model"), VOCAB, seed=0)
  assert open(again, "rb").read() == open(own.path, "rb").read()


def test_multiline_documents_teach_newline(own):
  # Training keeps the newlines of multi-line documents, so "\n" is a learned piece,
  # not a byte-fallback token.
  sp = _raw(own)
  newline = sp.piece_to_id("\n")
  assert newline != sp.unk_id() and not sp.is_byte(newline)
  assert own.encode("a\nb") == own.encode("a") + [newline] + own.encode("b")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab \n\té😀"), max_size=200),
       max_bytes=st.integers(8, 24))
def test_training_sentences_cover_text(text, max_bytes):
  segments = list(tokenizer._training_sentences([text], max_bytes))
  # Joined, the segments give the text, less trailing newlines and with very long newline
  # runs shortened to max_bytes - 4.
  expected = re.sub("\n{%d,}" % (max_bytes - 3), "\n" * (max_bytes - 4), text.rstrip("\n"))
  assert "".join(segments) == expected
  assert all(0 < len(s.encode()) <= max_bytes for s in segments)
  assert all(not s.endswith("\n") for s in segments)  # sentencepiece would drop it


def test_long_lines_are_split_not_dropped(tmp_path):
  # One 20 KB line per document: far beyond max_sentence_length, which sentencepiece would
  # silently skip; after splitting, the frequent word still becomes a piece.
  docs = [" ".join(["theorem"] * 2500)] * 3
  tok = tokenizer.load(tokenizer.train(docs, str(tmp_path / "long.model"), 280,
                                       max_sentence_length=512))
  assert tok.encode(" theorem") == [_raw(tok).piece_to_id("▁theorem")]


def test_digits_are_split(own):
  ids = own.encode("2024 + 31415")
  digits = [i for i in ids if own.decode([i]).strip().isdigit()]
  assert [own.decode([i]) for i in digits] == list("202431415")


def test_unsplit_digits_make_frequent_numbers_pieces(tmp_path):
  docs = [f"Ava has {n} cards. Now she has {n + 7} cards." for n in (10, 11)] * 80
  split = tokenizer.load(tokenizer.train(docs, str(tmp_path / "s.model"), 300))
  whole = tokenizer.load(tokenizer.train(docs, str(tmp_path / "w.model"), 300,
                                         split_digits=False))
  assert [split.decode([i]) for i in split.encode(" 10")] == [" ", "1", "0"]
  assert [whole.decode([i]) for i in whole.encode(" 10")] == [" 10"]
  for tok in (split, whole):
    assert tok.decode(tok.encode("Ava has 2024 cards.")) == "Ava has 2024 cards."


# ----------------------------------------------------------------------------- latent tokens


@pytest.mark.parametrize("which", ["own", "ext"])
def test_latent_tokens_are_single_ids(which, request):
  tok = request.getfixturevalue(which)
  ids = tok.latent_ids
  for t, i in ids.items():
    assert tok.encode(t) == [i]
    assert tok.decode([i]) == t
    for context in [f"word{t}word", f"a {t} b", f"{t}Start", f"end{t}", f"x\n{t}\n", f"1{t}2"]:
      got = tok.encode(context)
      assert got.count(i) == 1, (context, got)
      assert tok.decode(got) == context
      # A string that starts with the token tokenizes the rest exactly as mid-text would.
      rest = context[context.index(t):]
      assert tok.encode(rest) == tok.encode("Q" + rest)[len(tok.encode("Q")):]
  all_four = "".join(formats.LATENT_TOKENS)
  assert tok.encode(all_four) == list(ids.values())
  assert tok.encode(formats.posterior_prompt("P.", "X.")).count(ids[SOL]) == 2


def test_own_tokens_split_text_cleanly(own):
  # No dummy prefix: the text around a latent token tokenizes as if it stood alone.
  for a, b in [("Hello", "world"), ("x = 3", " so y"), ("", "abc"), ("abc", "")]:
    for t, i in own.latent_ids.items():
      assert own.encode(a + t + b) == own.encode(a) + [i] + own.encode(b)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("which", ["own", "ext"])
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(which, text, request):
  tok = request.getfixturevalue(which)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert _raw(tok).unk_id() not in ids  # byte fallback: nothing is unknown
  with_specials = tok.encode(text, bos=True, eos=True)
  assert with_specials == [tok.bos_id] + ids + [tok.eos_id]
  assert tok.decode(with_specials) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text


# U+2581 is sentencepiece's own space symbol: it decodes as " " (documented limitation).
# Lone surrogates (Cs) are not encodable text.
_CHARS = st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))
_TEXT = st.lists(st.one_of(st.text(_CHARS, max_size=12),
                           st.sampled_from(list(formats.LATENT_TOKENS) + [" ", "\n", "  "])),
                 max_size=8).map("".join)


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(_TEXT, min_size=1, max_size=4))
def test_round_trip_property(own, ext, texts):
  for tok in (own, ext):
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts


def test_pickle_and_batch_specials(own):
  clone = pickle.loads(pickle.dumps(own))
  assert clone.encode(TRICKY[9]) == own.encode(TRICKY[9])
  assert clone.latent_ids == own.latent_ids
  assert own.encode_batch(["a", ""], bos=True, eos=True) == [
      own.encode("a", bos=True, eos=True), [own.bos_id, own.eos_id]]


def test_decode_rejects_out_of_range(own):
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 400\)"):
    own.decode([5, own.vocab_size])


# ----------------------------------------------------------------------------- add_latent_tokens


def test_add_latent_tokens_appends_at_end(llama_base, ext, corpus):
  base = spm.SentencePieceProcessor(model_file=llama_base)
  v = base.get_piece_size()
  assert ext.vocab_size == v + 4
  assert list(ext.latent_ids.values()) == [v, v + 1, v + 2, v + 3]
  assert (ext.bos_id, ext.eos_id, ext.pad_id) == (1, 2, 0)
  ext_sp = _raw(ext)
  for i in range(v):  # existing pieces keep their ids
    assert ext_sp.id_to_piece(i) == base.id_to_piece(i)
  # Ordinary text (no latent tokens) encodes exactly as with the base model.
  texts = corpus[:50] + [t for t in TRICKY if formats.contains_latent_token(t) is None]
  assert ext.encode_batch(texts) == base.encode(texts)
  # The dummy prefix is dropped only before a string-initial latent token.
  assert ext.encode(SOL + "Hi") == [v] + ext.encode("Q" + SOL + "Hi")[len(ext.encode("Q")) + 1:]
  assert ext_sp.encode(SOL)[0] == ext_sp.piece_to_id("▁")  # what raw sentencepiece does


def test_matches_hugging_face_llama_tokenizer(ext, corpus, tmp_path):
  # An independent reference for the string-initial latent-token rule: Hugging Face's
  # (non-legacy) Llama tokenizer built from the extended model file.
  transformers = pytest.importorskip("transformers")
  (tmp_path / "hf").mkdir()
  shutil.copy(ext.path, tmp_path / "hf" / "tokenizer.model")
  hf = transformers.LlamaTokenizer.from_pretrained(
      str(tmp_path / "hf"), legacy=False, add_bos_token=False, add_eos_token=False)
  assert hf.convert_tokens_to_ids(list(formats.LATENT_TOKENS)) == list(ext.latent_ids.values())
  # HF adds no dummy space before leading whitespace, sentencepiece (and Llama) does: those
  # strings are left out.
  texts = corpus[:20] + [t for t in TRICKY if t and not t[0].isspace()] + [
      f"{SOL}{PRIOR}think{EOL}Then", f"{POST}x", formats.posterior_prompt("P.", "X.")]
  assert [hf.encode(t, add_special_tokens=False) for t in texts] == ext.encode_batch(texts)


def test_add_latent_tokens_is_idempotent(ext, tmp_path):
  again = tokenizer.add_latent_tokens(ext.path, str(tmp_path / "again.model"))
  assert open(again, "rb").read() == open(ext.path, "rb").read()


def test_add_latent_tokens_rejects_tokens_elsewhere(own, tmp_path):
  with pytest.raises(ValueError, match=r"already has latent tokens at ids .*4"):
    tokenizer.add_latent_tokens(own.path, str(tmp_path / "x.model"))
  assert not os.path.exists(tmp_path / "x.model")


# ----------------------------------------------------------------------------- seqio


@pytest.mark.parametrize("which", ["own", "ext"])
def test_seqio_vocabulary_matches(which, request, corpus):
  import seqio  # pylint: disable=g-import-not-at-top  (pulls in TensorFlow)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tok = request.getfixturevalue(which)
  vocab = tok.vocabulary
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert (vocab.vocab_size, vocab.eos_id, vocab.pad_id) == (tok.vocab_size, tok.eos_id, 0)
  texts = TRICKY + corpus[:20] + [f"{SOL}{PRIOR}z{EOL}x", SOL]
  want = tok.encode_batch(texts)
  assert [list(vocab.encode(t)) for t in texts] == want
  assert [vocab.encode_tf(tf.constant(t)).numpy().tolist() for t in texts] == want
  assert vocab.encode_tf(tf.constant(texts)).to_list() == want
  mapped = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)  # graph mode
  assert [x.numpy().tolist() for x in mapped] == want
  clone = pickle.loads(pickle.dumps(vocab))
  assert type(clone) is type(vocab) and [list(clone.encode(t)) for t in texts] == want


# ----------------------------------------------------------------------------- errors


def test_load_errors(tmp_path, llama_base):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer.load(missing)
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"\x00\x01 this is not a model")
  with pytest.raises(ValueError, match="garbage.model"):
    tokenizer.load(str(garbage))
  with pytest.raises(ValueError, match=r"no user-defined piece.*add_latent_tokens"):
    tokenizer.load(llama_base)


def test_train_errors_and_atomic_output(tmp_path, corpus):
  path = tmp_path / "tok.model"
  path.write_bytes(b"previous")
  with pytest.raises(ValueError, match="leaves no room"):
    tokenizer.train(corpus, str(path), 200)
  with pytest.raises(ValueError, match="no training text"):
    tokenizer.train(["", "\n\n"], str(path), VOCAB)
  with pytest.raises(ValueError, match=r"tok.model.*vocab_size=50000"):
    tokenizer.train(corpus[:5], str(path), 50000)
  assert path.read_bytes() == b"previous"  # failures never touch the output
  tokenizer.train(corpus, str(path), VOCAB)
  assert tokenizer.load(str(path)).vocab_size == VOCAB
  assert os.listdir(tmp_path) == ["tok.model"]  # no temp files left behind


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "latent_em.tools.train_tokenizer", *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_cli_train_and_base_model(tmp_path, corpus, llama_base, ext):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(corpus))
                  + "\n\n", encoding="utf-8")
  out = tmp_path / "cli.model"
  proc = _cli(f"--input={docs}", "--text_field=text", f"--vocab_size={VOCAB}", f"--output={out}",
              "--max_docs=200")
  assert proc.returncode == 0, proc.stderr
  assert "read 200 documents" in proc.stdout
  assert f"vocab_size: {VOCAB}" in proc.stdout
  assert "latent_ids: " + json.dumps({SOL: 4, EOL: 5, PRIOR: 6, POST: 7}) in proc.stdout
  # The same documents through the Python API give the same model, byte for byte.
  direct = tokenizer.train(corpus[:200], str(tmp_path / "direct.model"), VOCAB)
  assert out.read_bytes() == open(direct, "rb").read()

  out = tmp_path / "ext.model"
  proc = _cli(f"--base_model={llama_base}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  assert "latent_ids: " + json.dumps(ext.latent_ids) in proc.stdout
  assert out.read_bytes() == open(ext.path, "rb").read()


def test_cli_errors(tmp_path):
  missing = tmp_path / "missing.jsonl"
  proc = _cli(f"--input={missing}", "--vocab_size=300", f"--output={tmp_path / 'o.model'}")
  assert proc.returncode == 1
  assert "missing.jsonl" in proc.stderr and "does not exist" in proc.stderr
  assert not (tmp_path / "o.model").exists()

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
  proc = _cli(f"--input={bad}", "--vocab_size=300", f"--output={tmp_path / 'o.model'}")
  assert proc.returncode == 1
  assert f"{bad}:3: not valid JSON" in proc.stderr


def test_jsonl_reader_errors(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"docs.jsonl:2: no field 'text' \(found \['body'\]\)"):
    list(train_tokenizer.read_jsonl_texts([str(path)], "text"))
  path.write_text('{"text": 3}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"docs.jsonl:1: field 'text' is a int"):
    list(train_tokenizer.read_jsonl_texts([str(path)], "text"))
  path.write_text('["a"]\n{"text": "b"}\n{"text": "c"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="docs.jsonl:1: no field"):
    list(train_tokenizer.read_jsonl_texts([str(path)], "text"))
  path.write_text('{"text": "b"}\n{"text": "c"}\n{"text": "d"}\n', encoding="utf-8")
  assert list(train_tokenizer.read_jsonl_texts([str(path), str(path)], "text", 4)) == [
      "b", "c", "d", "b"]


def test_cli_usage_errors(tmp_path, llama_base):
  from absl import app  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match="--output"):
    train_tokenizer.run(output="", inputs=["a.jsonl"], vocab_size=VOCAB)
  with pytest.raises(app.UsageError, match="either --base_model"):
    train_tokenizer.run(output=str(tmp_path / "o.model"), inputs=["a.jsonl"],
                        base_model=llama_base)
  with pytest.raises(app.UsageError, match="--vocab_size"):
    train_tokenizer.run(output=str(tmp_path / "o.model"), inputs=["a.jsonl"])
  assert not (tmp_path / "o.model").exists()
