"""SentencePiece tokenizers that know the four latent tokens (DESIGN.md §2).

Two kinds of model files are supported, both plain sentencepiece `.model` files:

1. Tokenizers trained here (`train`). Id layout:
     0        <pad>   seqio pads with 0, so padding must be id 0 (a control piece: never
                      produced by encode, decodes to "").
     1        </s>    EOS, 2 <unk>: the T5/seqio convention (0 = PAD, 1 = EOS, 2 = UNK).
     3        <s>     BOS.
     4..7     SoL, EoL, PRIOR, POST (formats.LATENT_TOKENS order), user-defined pieces: the
              encoder matches them before any merge, so each is one id wherever it appears
              (inside words, next to each other, at string start).
     8..263   the 256 byte pieces <0x00>..<0xFF> (byte_fallback: any UTF-8 text encodes, no
              <unk>).
     264..    characters and BPE merges.
   Text round-trips byte for byte: identity normalisation (NFKC would rewrite characters),
   no dummy prefix and no whitespace collapsing, so leading spaces and newlines survive.
   Digits are split one per token, which helps arithmetic. One exception to exact round
   trips, in both kinds of model: U+2581 ("▁") in the input is sentencepiece's own space
   symbol and decodes as " ".

2. A pretrained tokenizer (e.g. TinyLlama's / Llama-2's) extended by `add_latent_tokens`:
   its V pieces keep their ids (so the pretrained embedding rows still match) and the four
   latent tokens are appended as ids V..V+3, the rows that `hf.load_llama(extra_vocab=4)`
   appends. Llama has no pad piece; `pad_id` is then 0 (<unk>, which byte fallback never
   produces), which is what seqio pads with anyway; padded positions are masked by the loss.
   Llama adds a dummy-prefix space ("▁") in front of every string, so sentencepiece alone
   would encode a string that starts with a latent token as ["▁", SoL, ...]. `Tokenizer.encode`
   and `Tokenizer.vocabulary` (the seqio vocabulary, Python and TF paths) drop that lone "▁", so
   a latent token is one id at string start too, as in the middle of a document (the same
   rule as Hugging Face's non-legacy Llama tokenizer). Build seqio vocabularies only through
   `Tokenizer.vocabulary` so the data pipeline and the E-step agree token for token.
"""
from __future__ import annotations

import functools
import io
import os
import re
import tempfile
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from latent_em import formats

if TYPE_CHECKING:
  import seqio

_PIECE = sp_pb2.ModelProto.SentencePiece
_SPACE = "\u2581"  # sentencepiece's visible space "▁"
# Our trained layout (module docstring): pad, eos, unk, bos.
_PAD_ID, _EOS_ID, _UNK_ID, _BOS_ID = 0, 1, 2, 3
_NUM_BYTES = 256
_FIX_LATENT = ("add them with latent_em.tokenizer.add_latent_tokens(base, out) or "
               "`python -m latent_em.tools.train_tokenizer --base_model=BASE --output=OUT`")


def _is_remote(path: str) -> bool:
  return "://" in path


def _read_bytes(path: str) -> bytes:
  """Reads a local file, or a remote one (gs://...) through tf.io.gfile."""
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy; remote paths only)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer model {path!r} does not exist; train one with "
        "`python -m latent_em.tools.train_tokenizer --input=DOCS.jsonl --vocab_size=N "
        f"--output={path}` or point the config at an existing .model file")
  with open(path, "rb") as f:
    return f.read()


def _write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to a temp file next to `path`, then renames it over `path`."""
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _parse_model(data: bytes, path: str) -> sp_pb2.ModelProto:
  try:
    proto = sp_pb2.ModelProto.FromString(data)
  except Exception as e:  # protobuf raises DecodeError and friends
    raise ValueError(f"{path!r} is not a sentencepiece model ({e}); expected a .model file "
                     "written by sentencepiece or latent_em.tokenizer") from e
  if not proto.pieces:
    raise ValueError(f"{path!r} is not a sentencepiece model (no pieces); expected a .model "
                     "file written by sentencepiece or latent_em.tokenizer")
  return proto


def _fix_leading_latent(text: str, ids: list[int], dummy_prefix: bool,
                        space_id: int) -> list[int]:
  """Drops the dummy-prefix "▁" that sentencepiece puts before a string-initial latent token."""
  if dummy_prefix and len(ids) > 1 and ids[0] == space_id and text.startswith(
      formats.LATENT_TOKENS):
    return ids[1:]
  return ids


class Tokenizer:
  """A loaded sentencepiece model plus the latent-token ids; build it with `load(path)`.

  Attributes:
    path: the .model file.
    vocab_size: number of pieces, the four latent tokens included.
    pad_id, bos_id, eos_id: special ids (pad is 0; see the module docstring).
    latent_ids: {token string: id} for formats.LATENT_TOKENS, in that order.
  """

  def __init__(self, path: str, model_proto: bytes):
    self.path = path
    self._model_proto = model_proto
    proto = sp_pb2.ModelProto.FromString(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size: int = self._sp.get_piece_size()
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    # seqio pads with 0 whatever the model says; load() rejects a pad piece elsewhere.
    self.pad_id: int = 0
    self.latent_ids: dict[str, int] = {t: self._sp.piece_to_id(t) for t in formats.LATENT_TOKENS}
    # Only models that prepend "▁" to every string need the leading-latent fix.
    self._dummy_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    self._space_id = self._sp.piece_to_id(_SPACE)

  def __getstate__(self):
    return {"path": self.path, "model_proto": self._model_proto}

  def __setstate__(self, state):
    self.__init__(state["path"], state["model_proto"])

  def __repr__(self) -> str:
    return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Text -> ids [T]; BOS/EOS ids are added only when asked for."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
    ids = _fix_leading_latent(text, self._sp.encode(text), self._dummy_prefix, self._space_id)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], *, bos: bool = False,
                   eos: bool = False) -> list[list[int]]:
    """Encodes many texts (multi-threaded in sentencepiece); one id list per text."""
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"Tokenizer.encode_batch: item {i} is a {type(text).__name__}, not str")
    head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
    return [head + _fix_leading_latent(t, ids, self._dummy_prefix, self._space_id) + tail
            for t, ids in zip(texts, self._sp.encode(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids [T] (list, numpy or jax array) -> text; special ids (pad/bos/eos) decode to ""."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"decode: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}) "
                       f"of {self.path!r}; mask padded embedding rows out before sampling")
    return self._sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  @functools.cached_property
  def vocabulary(self) -> "seqio.SentencePieceVocabulary":
    """The seqio vocabulary for tasks' output features; encodes exactly like `encode`."""
    return _make_vocabulary(self.path, self._dummy_prefix, self._space_id)


@functools.cache
def _vocabulary_class():
  """Defines the seqio subclass lazily: importing seqio pulls in TensorFlow."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  class LatentSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """seqio.SentencePieceVocabulary with Tokenizer.encode's leading-latent rule."""

    def __init__(self, path: str, *, dummy_prefix: bool, space_id: int):
      super().__init__(path)
      self._dummy_prefix = dummy_prefix
      self._space_id = space_id

    def __reduce__(self):  # the class is local; pickle through the module-level factory
      return _make_vocabulary, (self.sentencepiece_model_file, self._dummy_prefix,
                                self._space_id)

    def _encode(self, s: str) -> Sequence[int]:
      return _fix_leading_latent(s, list(super()._encode(s)), self._dummy_prefix, self._space_id)

    def _encode_tf(self, s):
      """s: string scalar -> int32 [T], or string [B] -> ragged int32 [B, (T)]."""
      ids = super()._encode_tf(s)
      if not self._dummy_prefix:
        return ids
      starts = functools.reduce(tf.logical_or, [
          tf.equal(tf.strings.substr(s, 0, len(t.encode())), t) for t in formats.LATENT_TOKENS])
      if isinstance(ids, tf.RaggedTensor):
        first_is_space = tf.reduce_any(tf.equal(ids[:, :1], self._space_id), axis=1)
        drop_first = tf.logical_and(starts, first_is_space)  # [B]
        positions = tf.ragged.range(ids.row_lengths())
        keep = tf.logical_or(positions > 0, tf.logical_not(drop_first)[:, None])
        return tf.ragged.boolean_mask(ids, keep)
      first_is_space = tf.reduce_any(tf.equal(ids[:1], self._space_id))
      return ids[tf.cast(tf.logical_and(starts, first_is_space), tf.int32):]

  return LatentSentencePieceVocabulary


def _make_vocabulary(path: str, dummy_prefix: bool,
                     space_id: int) -> "seqio.SentencePieceVocabulary":
  return _vocabulary_class()(path, dummy_prefix=dummy_prefix, space_id=space_id)


def load(path: str) -> Tokenizer:
  """Loads a .model file and checks that each latent token encodes to one id.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: not a sentencepiece model, no BOS/EOS, a pad piece at an id other than 0, or
      a latent token that is missing or not a single piece.
  """
  data = _read_bytes(path)
  proto = _parse_model(data, path)
  try:
    tok = Tokenizer(path, data)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"sentencepiece cannot load {path!r}: {e}") from e
  sp = tok._sp  # pylint: disable=protected-access
  if tok.bos_id < 0 or tok.eos_id < 0:
    raise ValueError(f"{path!r} defines no BOS or EOS piece (bos_id={tok.bos_id}, "
                     f"eos_id={tok.eos_id}); documents are wrapped in BOS/EOS, so both are needed")
  if sp.pad_id() not in (-1, 0):
    raise ValueError(f"{path!r} has its pad piece at id {sp.pad_id()}, but seqio pads with id 0; "
                     "retrain it with latent_em.tokenizer.train (pad_id=0)")
  for token, i in tok.latent_ids.items():
    if sp.id_to_piece(i) != token or proto.pieces[i].type != _PIECE.USER_DEFINED:
      raise ValueError(f"{path!r} has no user-defined piece {token!r}; {_FIX_LATENT}")
  latent = list(tok.latent_ids.values())
  probes = {t: [tok.latent_ids[t]] for t in formats.LATENT_TOKENS}
  probes["".join(formats.LATENT_TOKENS)] = latent
  for text, want in probes.items():
    # Alone (string start), inside a word and after a space: always exactly the latent ids.
    for context in (text, f"ab{text}cd", f"x {text} y"):
      ids = tok.encode(context)
      if (ids if context == text else [i for i in ids if i in latent]) != want:
        raise ValueError(f"{path!r}: {context!r} encodes to {ids}, not to the single latent "
                         f"ids {want}; {_FIX_LATENT}")
  return tok


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  r"""Splits documents into sentencepiece training sentences of at most `max_bytes` bytes.

  sentencepiece skips sentences longer than max_sentence_length and drops a trailing newline,
  so each document is cut before every run of newlines: the newlines lead the next line
  ("a\n\nb" -> "a", "\n\nb") and stay in the training text, so "\n" is learned as a piece
  instead of always costing a byte token. Over-long lines are cut before a space; newline
  runs longer than max_bytes - 4 are shortened (only for training).
  """
  max_lead = max_bytes - 4  # room for the newlines plus one character of up to 4 bytes
  for n, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"training text {n} is a {type(text).__name__}, not str")
    for seg in re.findall(r"\n*[^\n]+", text):
      lead = len(seg) - len(seg.lstrip("\n"))
      if lead > max_lead:
        seg, lead = seg[lead - max_lead:], max_lead
      while len(seg.encode("utf-8")) > max_bytes:
        head = seg.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        cut = head.rfind(" ", lead + 1)  # the space travels with the following piece
        cut = cut if cut > lead else len(head)
        yield seg[:cut]
        seg, lead = seg[cut:], 0
      yield seg


def train(
    texts: Iterable[str],
    output_path: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    seed: int = 0,
    max_sentence_length: int = 4192,
    input_sentence_size: int = 0,
    split_digits: bool = True,
) -> str:
  """Trains a tokenizer with the layout of the module docstring and writes `output_path`.

  Args:
    texts: documents; newlines and latent tokens inside them are fine.
    output_path: the .model file to write (atomically).
    vocab_size: total pieces, including 4 specials, 4 latent tokens and 256 bytes.
    model_type: "bpe" or "unigram".
    character_coverage: fraction of characters given their own piece (the rest fall back
      to bytes).
    seed: sentencepiece's random seed (used when sampling `input_sentence_size` sentences).
    max_sentence_length: longest training sentence in bytes; longer lines are cut.
    input_sentence_size: train on a random sample of this many sentences (0 = all).
    split_digits: one piece per digit (numbers of any length share ten pieces); False lets
      frequent numbers become pieces of their own.

  Returns:
    output_path.
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type={model_type!r}: use 'bpe' or 'unigram'")
  if max_sentence_length < 64:
    raise ValueError(f"max_sentence_length={max_sentence_length} is too small; use >= 64 bytes")
  reserved = 4 + len(formats.LATENT_TOKENS) + _NUM_BYTES
  if vocab_size <= reserved:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces: {reserved} ids "
                     "go to pad/eos/unk/bos, the latent tokens and the 256 byte pieces")
  sentences = list(_training_sentences(texts, max_sentence_length))
  if not sentences:
    raise ValueError(f"no training text for {output_path!r}: all documents are empty")
  spm.set_random_generator_seed(seed)
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        pad_id=_PAD_ID, eos_id=_EOS_ID, unk_id=_UNK_ID, bos_id=_BOS_ID,
        user_defined_symbols=list(formats.LATENT_TOKENS),
        byte_fallback=True,
        split_digits=split_digits,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # runs of spaces (indentation) become pieces
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"sentencepiece could not train {output_path!r} with vocab_size="
                     f"{vocab_size}: {e}. A small corpus supports only a small vocabulary: "
                     "lower vocab_size or add text") from e
  _write_atomic(output_path, writer.getvalue())
  load(output_path)  # the written file must pass the same checks as any other
  return output_path


def add_latent_tokens(base_model_path: str, output_path: str) -> str:
  """Appends the 4 latent tokens to a pretrained model as ids V..V+3; writes `output_path`.

  Existing pieces keep their ids and ordinary text encodes exactly as before. If the base
  model already ends with the four tokens (in formats.LATENT_TOKENS order), it is copied
  unchanged.

  Returns:
    output_path.
  """
  data = _read_bytes(base_model_path)
  proto = _parse_model(data, base_model_path)
  pieces = [p.piece for p in proto.pieces]
  tokens = list(formats.LATENT_TOKENS)
  n = len(tokens)
  present = [t for t in tokens if t in pieces]
  if present:
    if pieces[-n:] != tokens or any(p.type != _PIECE.USER_DEFINED for p in proto.pieces[-n:]):
      where = {t: pieces.index(t) for t in present}
      raise ValueError(
          f"{base_model_path!r} already has latent tokens at ids {where}, but not as the last "
          f"{n} user-defined pieces in the order {tokens}; start from the original base model")
  else:
    for token in tokens:
      proto.pieces.add(piece=token, score=0.0, type=_PIECE.USER_DEFINED)
    data = proto.SerializeToString()
  _write_atomic(output_path, data)
  load(output_path)
  return output_path
