"""Raw-text pipeline: bad-input policy, seqio tasks, packed layout, determinism, resume and
per-host sharding, checked against the tokenizer's own (Python sentencepiece) encoding."""
from __future__ import annotations

import collections
import gzip
import json
import random
import re

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from latent_em import config_lib
from latent_em import formats
from latent_em import tokenizer as tok_lib
from latent_em.data import pipeline
from latent_em.data import sources
from latent_em.data import tasks

SEQ = 64
WORDS = ("the sum of two primes is even when both are odd so we add four and nine to get "
         "thirteen then divide by x squared plus one").split()


def _docs(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  out = []
  for i in range(n):
    k = rng.choice([3, 6, 10, 18, 40])  # the 40-word ones exceed SEQ tokens and get split
    out.append(f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(k)) + ".")
  return out


def _write_jsonl(path, docs) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"text": d, "meta": {"n": len(d)}}) + "\n")
  return str(path)


def _example(**features) -> bytes:
  feats = {}
  for k, v in features.items():
    if isinstance(v, int):
      feats[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    else:
      vals = v if isinstance(v, list) else [v]
      feats[k] = tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[x.encode() if isinstance(x, str) else x for x in vals]))
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _write_tfrecord(path, records: list[bytes]) -> str:
  with tf.io.TFRecordWriter(str(path)) as w:
    for r in records:
      w.write(r)
  return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  docs = _docs(40)
  tok = tok_lib.load(tok_lib.train(docs * 3, str(root / "tok.model"), 340))
  good = _write_jsonl(root / "good.jsonl", docs)
  # Four files, one of them a TFRecord, for file-level sharding and mixed formats.
  parts = [_write_jsonl(root / f"part{i}.jsonl", docs[i * 10:(i + 1) * 10]) for i in range(3)]
  parts.append(_write_tfrecord(root / "part3.tfrecord",
                               [_example(text=d, n=1) for d in docs[30:]]))
  tasks.register_raw_task("test_pipe_good", {"train": [good]}, tok.vocabulary,
                          shuffle_buffer_size=16)
  tasks.register_raw_task("test_pipe_multi", {"train": [str(root / "part*")]}, tok.vocabulary)
  return {"root": root, "docs": docs, "tok": tok, "good": good}


def _expected_pieces(tok, docs) -> list[tuple[int, ...]]:
  pieces = []
  for d in docs:
    ids = tok.encode(d, eos=True)
    pieces += [tuple(ids[i:i + SEQ]) for i in range(0, len(ids), SEQ)]
  return pieces


def test_packed_layout_matches_tokenizer(env):
  tok, docs = env["tok"], env["docs"]
  batches = list(pipeline.iterate_eval("test_pipe_good", "train", SEQ, 4, bos_id=tok.bos_id,
                                       shard_id=0, num_shards=1))
  expected = _expected_pieces(tok, docs)
  assert any(len(tok.encode(d)) + 1 > SEQ for d in docs)  # some documents really get split
  got, multi_segment_rows, weight_sum = [], 0, 0.0
  for b in batches:
    assert b["inputs"].dtype == np.int32 and b["loss_weights"].dtype == np.float32
    for row in range(b["targets"].shape[0]):
      t, x, w, s, p = (b[k][row] for k in ("targets", "inputs", "loss_weights", "segment_ids",
                                           "positions"))
      np.testing.assert_array_equal(w, (s > 0).astype(np.float32))
      np.testing.assert_array_equal(w, (t != 0).astype(np.float32))
      n = int((s > 0).sum())
      assert (s[n:] == 0).all() and (s[:n] > 0).all()  # padding only at the end
      assert (t[n:] == 0).all() and (x[n:] == 0).all() and (p[n:] == 0).all()
      ids = [i for i in np.unique(s) if i > 0]
      multi_segment_rows += len(ids) > 1
      for seg in ids:
        (idx,) = np.nonzero(s == seg)
        assert idx[-1] - idx[0] + 1 == len(idx)  # contiguous
        piece = t[idx]
        np.testing.assert_array_equal(x[idx], [tok.bos_id] + list(piece[:-1]))
        np.testing.assert_array_equal(p[idx], np.arange(len(idx)))
        got.append(tuple(int(v) for v in piece))
      weight_sum += float(w.sum())
  assert collections.Counter(got) == collections.Counter(expected)
  assert sum(1 for g in got if g[-1] == tok.eos_id) == len(docs)
  assert multi_segment_rows > 0
  # Nothing is lost by packing or splitting: weights count every target token once.
  direct = sum(len(tok.encode(d)) + 1 for d in docs)
  assert weight_sum == direct
  assert pipeline.count_tokens("test_pipe_good", "train") == direct
  # The last batch is padded to full size with zero-weight rows.
  assert all(b["targets"].shape[0] == 4 for b in batches)


def test_shuffle_is_seeded_and_resume_is_exact(env):
  bos = env["tok"].bos_id

  def dataset_fn(seed=7):
    return pipeline.get_dataset("test_pipe_good", "train", SEQ, 4, bos_id=bos, seed=seed,
                                shard_id=0, num_shards=1, shuffle_buffer=8)

  def assert_same(got, want):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])

  it = pipeline.BatchIterator(dataset_fn)
  first = [next(it) for _ in range(5)]  # 5 x 4 rows of 64 tokens: more than one epoch
  assert it.get_state() == {"batches_consumed": 5}
  # Same seed, a new run: the same batches.
  for got, want in zip(pipeline.BatchIterator(dataset_fn), first):
    assert_same(got, want)
  # Resume after batch 3 (as from a checkpoint): batches 3 and 4 again.
  resumed = pipeline.BatchIterator.from_state(dataset_fn, {"batches_consumed": 3})
  for want in first[3:]:
    assert_same(next(resumed), want)
  assert resumed.get_state() == {"batches_consumed": 5}
  # Another seed: another order.
  other = pipeline.BatchIterator(lambda: dataset_fn(seed=8))
  assert any(not np.array_equal(next(other)["targets"], want["targets"]) for want in first[:3])
  with pytest.raises(ValueError, match="batches_consumed"):
    pipeline.BatchIterator.from_state(dataset_fn, {"step": 3})


def _docs_of_pass(tok, batches) -> list[str]:
  """Unpacked rows in order -> documents (split documents span consecutive rows)."""
  stream = []
  for b in batches:
    for row, w in zip(b["targets"], b["loss_weights"]):
      stream += [int(v) for v in row[w > 0]]
  out, cur = [], []
  for v in stream:
    if v == tok.eos_id:
      out.append(tok.decode(cur))
      cur = []
    else:
      cur.append(v)
  assert not cur
  return out


@pytest.mark.parametrize("task", ["test_pipe_good", "test_pipe_multi"])
def test_per_host_shards_are_disjoint_and_cover(env, task):
  tok = env["tok"]
  shards = []
  for shard_id in range(2):
    batches = list(pipeline.iterate_eval(task, "train", SEQ, 4, bos_id=tok.bos_id,
                                         shard_id=shard_id, num_shards=2, pack=False))
    assert all(b["targets"].shape == (2, SEQ) for b in batches)  # host batch = 4 / 2
    for b in batches:  # unpacked rows: one segment, positions count up from 0
      np.testing.assert_array_equal(b["segment_ids"], (b["targets"] != 0).astype(np.int32))
      np.testing.assert_array_equal(b["positions"], np.arange(SEQ) * b["segment_ids"])
    shards.append(_docs_of_pass(tok, batches))
  a, b = shards
  assert a and b and not set(a) & set(b)
  assert sorted(a + b) == sorted(env["docs"])


def test_batch_size_must_divide_across_hosts(env):
  with pytest.raises(ValueError, match=r"config\.data\.batch_size=5 .* multiple of 2"):
    pipeline.get_dataset("test_pipe_good", "train", SEQ, 5, bos_id=env["tok"].bos_id, seed=0,
                         shard_id=0, num_shards=2)


# --------------------------------------------------------------------------- bad input

SOL = formats.LATENT_TOKENS[0]
# category -> (raw JSONL line, a phrase the fail message must contain)
BAD_JSONL = {
    "malformed_json": (b'{"text": "unterminated', "not valid JSON"),
    "malformed_json_list": (b'["text"]', "not an object"),
    "missing_field": (b'{"body": "hello"}', "config.data.text_field"),
    "non_string_field": (b'{"text": 5}', "is int"),
    "non_string_field_null": (b'{"text": null}', "is NoneType"),
    "empty": (b'{"text": ""}', "empty"),
    "empty_whitespace": (b'{"text": "  \\n\\t "}', "whitespace"),
    "invalid_utf8": (b'{"text": "caf\xe9 au lait"}', "not valid UTF-8"),
    "invalid_utf8_surrogate": (b'{"text": "half \\ud800 pair"}', "surrogate"),
    "too_long": (json.dumps({"text": "x" * 500}).encode(), "config.data.max_doc_chars=100"),
    "latent_token": (json.dumps({"text": f"a {SOL} b"}).encode(), "latent token"),
}


def _category(case: str) -> str:
  return next(c for c in sources.CATEGORIES if case.startswith(c))


def _bad_file(root, name, lines: list[bytes]) -> str:
  path = root / name
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def test_bad_jsonl_skip_counts_every_category(env):
  good = [json.dumps({"text": "first good"}).encode(), json.dumps({"text": "last good"}).encode()]
  lines = [good[0]] + [v[0] for v in BAD_JSONL.values()] + [b"", good[1]]  # b"": blank line
  path = _bad_file(env["root"], "bad.jsonl", lines)
  stats = sources.InputStats()
  got = list(sources.read_jsonl_texts(path, "text", "skip", stats, max_doc_chars=100))
  assert got == [(f"{path}:1", "first good"), (f"{path}:{len(lines)}", "last good")]
  want = collections.Counter(_category(c) for c in BAD_JSONL)
  summary = stats.summary()
  for c in sources.CATEGORIES:
    assert summary[c] == want.get(c, 0), c
  assert summary["docs_read"] == len(lines) - 1 and summary["docs_kept"] == 2
  assert summary["skipped"] == len(BAD_JSONL)

  # Through the seqio task: the same records are skipped and only good tokens remain.
  task = tasks.register_raw_task("test_pipe_bad_skip", {"train": [path]}, env["tok"].vocabulary,
                                 max_doc_chars=100)
  assert pipeline.count_tokens(task, "train") == sum(
      len(env["tok"].encode(t)) + 1 for t in ("first good", "last good"))
  assert task.source.stats.summary()["skipped"] == len(BAD_JSONL)


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_fail_names_file_and_line(env, case):
  line, phrase = BAD_JSONL[case]
  path = _bad_file(env["root"], f"fail_{case}.jsonl", [b'{"text": "fine"}', line])
  with pytest.raises(sources.BadInputError) as e:
    list(sources.read_jsonl_texts(path, "text", "fail", sources.InputStats(),
                                  max_doc_chars=100))
  msg = str(e.value)
  assert msg.startswith(f"{path}:2: ") and phrase in msg, msg
  assert 'config.data.on_bad_input="skip"' in msg


def test_bad_input_fail_through_the_pipeline(env):
  path = _bad_file(env["root"], "fail_pipe.jsonl",
                   [b'{"text": "fine"}', b'{"text": "also fine"}', b'{"oops": 1}'])
  tasks.register_raw_task("test_pipe_bad_fail", {"train": [path]}, env["tok"].vocabulary,
                          policy="fail")
  # tf.data wraps the generator's exception; the pipeline re-raises the original.
  with pytest.raises(sources.BadInputError, match=re.escape(f"{path}:3: no field 'text'")):
    list(pipeline.iterate_eval("test_pipe_bad_fail", "train", SEQ, 2,
                               bos_id=env["tok"].bos_id, shard_id=0, num_shards=1))
  with pytest.raises(sources.BadInputError, match=re.escape(f"{path}:3")):
    pipeline.count_tokens("test_pipe_bad_fail", "train")


def test_bad_tfrecord_records(env):
  records = [
      _example(text="good one"),
      _example(body="no text"),                      # missing_field
      _example(text=3),                              # non_string_field (int64)
      _example(text=["two", "values"]),              # non_string_field
      _example(text=b"\xff\xfe"),                    # invalid_utf8
      _example(text="   "),                          # empty
      _example(text=f"x{SOL}"),                      # latent_token
      b"\xff\xff not a proto",                       # malformed_record
  ]
  path = _write_tfrecord(env["root"] / "bad.tfrecord", records)
  stats = sources.InputStats()
  assert list(sources.read_tfrecord_texts(path, "text", "skip", stats)) == [
      (f"{path}:1", "good one")]
  s = stats.summary()
  assert (s["missing_field"], s["non_string_field"], s["invalid_utf8"], s["empty"],
          s["latent_token"], s["malformed_record"], s["docs_read"]) == (1, 2, 1, 1, 1, 1, 8)
  for i in range(1, len(records)):
    p = _write_tfrecord(env["root"] / f"bad{i}.tfrecord", [records[0], records[i]])
    with pytest.raises(sources.BadInputError, match=re.escape(f"{p}:2: ")):
      list(sources.read_tfrecord_texts(p, "text", "fail", sources.InputStats()))


def test_read_docs_ids_do_not_depend_on_location(tmp_path):
  """The same files in two folders give the same doc ids (they seed per-document choices)."""
  ids = []
  for where in ("a", "b/deeper"):
    root = tmp_path / where
    (root / "sub").mkdir(parents=True)
    (root / "one.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    (root / "sub" / "two.jsonl").write_text('{"text": "z"}\n')
    files = [str(root / "one.jsonl"), str(root / "sub" / "two.jsonl")]
    ids.append(list(sources.read_docs(files, "text", "fail", sources.InputStats())))
  assert ids[0] == ids[1] == [("one.jsonl:1", "x"), ("one.jsonl:3", "y"), ("sub/two.jsonl:1", "z")]
  single = str(tmp_path / "a" / "one.jsonl")
  assert [i for i, _ in sources.read_docs([single], "text", "fail", sources.InputStats())] == [
      "one.jsonl:1", "one.jsonl:3"]


def test_gzip_jsonl_and_missing_files(env, tmp_path):
  path = tmp_path / "docs.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(json.dumps({"text": "zipped"}) + "\n")
  assert list(sources.read_jsonl_texts(str(path), "text", "fail", sources.InputStats())) == [
      (f"{path}:1", "zipped")]
  cfg = sources.InputConfig(train_files=(str(tmp_path / "missing.jsonl"),))
  with pytest.raises(FileNotFoundError, match=r"config\.data\.train_files\[0\]="):
    tasks.register_from_config("test_pipe_missing", cfg, env["tok"].vocabulary)
  with pytest.raises(FileNotFoundError, match=r"config\.data\.validation_files\[0\]"):
    sources.expand_files((str(tmp_path / "none-*.jsonl"),), "config.data.validation_files")


def test_input_config_validation():
  cfg = config_lib.from_config(sources.InputConfig, {"train_files": ["a.jsonl", "b.tfrecord"],
                                                     "on_bad_input": "fail"}, "config.data")
  assert cfg.train_files == ("a.jsonl", "b.tfrecord") and cfg.on_bad_input == "fail"
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.on_bad_input"):
    config_lib.from_config(sources.InputConfig, {"on_bad_input": "ignore"}, "config.data")
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.train_files\[1\]"):
    config_lib.from_config(sources.InputConfig, {"train_files": ["a.jsonl", "b.txt"]},
                           "config.data")
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.max_doc_chars"):
    config_lib.from_config(sources.InputConfig, {"max_doc_chars": -1}, "config.data")
  assert sources.parse_tfds_spec("tfds:corpus/cfg:1.0.0:train") == ("corpus/cfg:1.0.0", "train")


# --------------------------------------------------------------------------- TFDS source


class LatentEmTestPipelineText(tfds.core.GeneratorBasedBuilder):
  """A three-document TFDS dataset (one of them whitespace only) for the tfds: source."""
  VERSION = tfds.core.Version("1.0.0")
  DOCS = ("tfds doc one.", "   ", "tfds doc three is longer than the others.")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"body": tfds.features.Text(), "n": tf.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, d in enumerate(self.DOCS):
      yield i, {"body": d, "n": i}


def test_tfds_source(env, tmp_path):
  tok = env["tok"]
  LatentEmTestPipelineText(data_dir=str(tmp_path)).download_and_prepare()
  spec = "tfds:latent_em_test_pipeline_text:train"
  task = tasks.register_raw_task("test_pipe_tfds", {"train": [spec]}, tok.vocabulary,
                                 text_field="body", tfds_data_dir=str(tmp_path))
  batches = pipeline.iterate_eval(task, "train", SEQ, 2, bos_id=tok.bos_id, shard_id=0,
                                  num_shards=1, pack=False)
  assert sorted(_docs_of_pass(tok, batches)) == sorted(
      d for d in LatentEmTestPipelineText.DOCS if d.strip())
  assert task.source.stats.summary()["empty"] == 1
  tasks.register_raw_task("test_pipe_tfds_fail", {"train": [spec]}, tok.vocabulary,
                          text_field="body", policy="fail", tfds_data_dir=str(tmp_path))
  # The spec is pinned to the prepared version, so every host reads the same data.
  pinned = "tfds:latent_em_test_pipeline_text:1.0.0:train"
  with pytest.raises(sources.BadInputError, match=re.escape(pinned) + ".*empty"):
    pipeline.count_tokens("test_pipe_tfds_fail", "train")
  tasks.register_raw_task("test_pipe_tfds_field", {"train": [spec]}, tok.vocabulary,
                          tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"no feature 'text'.*config\.data\.text_field"):
    pipeline.count_tokens("test_pipe_tfds_field", "train")
  with pytest.raises(FileNotFoundError, match="files\\['train'\\]"):
    tasks.register_raw_task("test_pipe_tfds_missing", {"train": ["tfds:no_such_dataset:train"]},
                            tok.vocabulary, tfds_data_dir=str(tmp_path))


def test_reregistering_a_task_replaces_it(env):
  tok = env["tok"]
  one = _write_jsonl(env["root"] / "one.jsonl", ["only document"])
  tasks.register_raw_task("test_pipe_rereg", {"train": [env["good"]]}, tok.vocabulary)
  tasks.register_raw_task("test_pipe_rereg", {"train": [one]}, tok.vocabulary)
  assert pipeline.count_tokens("test_pipe_rereg", "train") == len(tok.encode("only document")) + 1


def _docs_of_length(tok, lengths: set[int], n: int, seed: int = 0) -> list[str]:
  """n documents whose token count (EOS included) is in `lengths`."""
  rng, out = random.Random(seed), []
  while len(out) < n:
    d = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
    if len(tok.encode(d)) + 1 in lengths:
      out.append(d)
  return out


def test_count_rows_is_rows_of_one_packed_pass(env):
  tok, root = env["tok"], env["root"]
  # Half-row documents fill every row exactly; documents over half a row never share one.
  half = _write_jsonl(root / "half.jsonl", _docs_of_length(tok, {SEQ // 2}, 10))
  big = _write_jsonl(root / "big.jsonl", _docs_of_length(tok, set(range(SEQ // 2 + 1, SEQ + 1)), 7))
  for name, path, rows in (("test_rows_half", half, 5), ("test_rows_big", big, 7)):
    tasks.register_raw_task(name, {"train": [path]}, tok.vocabulary)
    assert pipeline.count_rows(name, "train", SEQ, bos_id=tok.bos_id, seed=3) == rows
  # Mixed lengths (long ones split): the rows one pass of the training pipeline yields, enough
  # of them to hold every loss-bearing token and more than a perfect packing would need.
  got = pipeline.count_rows("test_pipe_good", "train", SEQ, bos_id=tok.bos_id, seed=3)
  ds = pipeline.get_dataset("test_pipe_good", "train", SEQ, 1, bos_id=tok.bos_id, seed=3,
                            repeat=False, shard_id=0, num_shards=1, drop_remainder=False)
  rows = [b for b in ds.as_numpy_iterator()]
  assert got == len(rows)
  tokens = pipeline.count_tokens("test_pipe_good", "train")
  assert sum(float(b["loss_weights"].sum()) for b in rows) == tokens
  assert got > tokens / SEQ
  mixture = seqio.Mixture("test_rows_mix", [("test_pipe_good", 1.0)])
  with pytest.raises(ValueError, match="mixture"):
    pipeline.count_rows(mixture, "train", SEQ, bos_id=tok.bos_id, seed=3)
