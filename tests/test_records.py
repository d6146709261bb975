"""Tests for latent_em.data.records: TFRecord/JSONL round trips, atomic writes, tf.data parsing."""
import glob
import json
import os

import hypothesis
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import strategies as st

from latent_em.data import records as R


def _records():
  """Records that cover unicode, CRLF, None vs "" thoughts, empty lists and an empty document."""
  return [
      R.DocRecord(
          doc_id="doc-0",
          text="Première phrase.\r\n数学は楽しい。 Emoji 🤔 here.",
          chunks=[
              R.ChunkRecord(prefix="", suffix="Première phrase.", thought="Une pensée: ∀x∈ℝ.",
                            log_weights=[-1.5, -2.25, -0.125, -40.0], thought_len=12,
                            ended=True, elbo={"1": -1.5, "2": -0.75, "4": -0.5},
                            suffix_tokens=5, cut_tokens=0, source="estep"),
              R.ChunkRecord(prefix="Première phrase.", suffix="\r\n数学は楽しい。",
                            thought=None, log_weights=[], thought_len=-1, ended=False, elbo={},
                            suffix_tokens=7, cut_tokens=2, source="teacher"),
              R.ChunkRecord(prefix="\r\n数学は楽しい。", suffix=" Emoji 🤔 here.", thought="",
                            log_weights=[0.5], thought_len=0, ended=False, elbo={"1": 3.0},
                            suffix_tokens=4, cut_tokens=0, source="wrap:qa"),
          ],
          meta={"source": "napkin", "nested": {"k": [1, 2.5, None, "ü"]}}),
      R.DocRecord(doc_id="doc-empty", text="", chunks=[], meta={}),
      R.DocRecord(doc_id="doc-2 ✓", text="Only one.",
                  chunks=[R.ChunkRecord(prefix="", suffix="Only one.", thought="t\x00nul",
                                        source="teacher")],
                  meta={"split": "bootstrap"}),
  ]


def _by_id(recs):
  return {r.doc_id: r for r in recs}


def test_shard_paths():
  assert R.shard_paths("/d/out", 3) == ["/d/out-00000-of-00003.tfrecord",
                                        "/d/out-00001-of-00003.tfrecord",
                                        "/d/out-00002-of-00003.tfrecord"]
  with pytest.raises(ValueError, match="num_shards"):
    R.shard_paths("/d/out", 0)


def test_shard_round_trip(tmp_path):
  path = str(tmp_path / "sub" / "x-00000-of-00001.tfrecord")
  recs = _records()
  assert R.write_shard(recs, path) == len(recs)
  assert os.listdir(tmp_path / "sub") == ["x-00000-of-00001.tfrecord"]
  assert list(R.read_records(path)) == recs
  assert list(R.read_records(str(tmp_path / "sub" / "x-*.tfrecord"))) == recs


def test_tfrecord_jsonl_round_trip(tmp_path):
  recs = _records()
  R.write_shard(recs, str(tmp_path / "a-00000-of-00001.tfrecord"))
  jsonl = str(tmp_path / "a.jsonl")
  assert R.to_jsonl(str(tmp_path / "a-*.tfrecord"), jsonl) == len(recs)
  with open(jsonl, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert len(lines) == len(recs)
  assert "数学は楽しい" in lines[0]  # readable unicode, not \u escapes
  assert json.loads(lines[0])["chunks"][1]["thought"] is None
  assert json.loads(lines[0])["chunks"][2]["thought"] == ""

  assert R.from_jsonl(jsonl, str(tmp_path / "b"), num_shards=2) == len(recs)
  shards = R.shard_paths(str(tmp_path / "b"), 2)
  assert all(os.path.exists(p) for p in shards)
  # Round-robin: shard 0 has records 0 and 2, shard 1 has record 1.
  assert [r.doc_id for r in R.read_records(shards[0])] == ["doc-0", "doc-2 ✓"]
  back = list(R.read_records(str(tmp_path / "b-*-of-*.tfrecord")))
  assert _by_id(back) == _by_id(recs) and len(back) == len(recs)
  assert not glob.glob(str(tmp_path / "*.tmp-*"))


def test_float32_storage_is_stable(tmp_path):
  rec = R.DocRecord("d", "x", [R.ChunkRecord("", "x", "z", log_weights=[0.1, -123.456789],
                                             elbo={"1": 1 / 3})])
  back = R.from_example(R.to_example(rec).SerializeToString())
  # Values come back as the shortest decimals of their float32 value ...
  assert back.chunks[0].log_weights == [0.1, -123.45679]
  assert np.float32(back.chunks[0].elbo["1"]) == np.float32(1 / 3)
  # ... so a second write stores exactly the same bytes.
  assert R.to_example(back).SerializeToString() == R.to_example(rec).SerializeToString()


f32 = st.floats(width=32, allow_nan=False)
chunk_st = st.builds(
    R.ChunkRecord, prefix=st.text(), suffix=st.text(),
    thought=st.one_of(st.none(), st.text()), log_weights=st.lists(f32, max_size=5),
    thought_len=st.integers(-1, 2**40), ended=st.booleans(),
    elbo=st.dictionaries(st.sampled_from(["1", "2", "4", "8"]), f32),
    suffix_tokens=st.integers(-1, 2**40), cut_tokens=st.integers(0, 2**40), source=st.text())
doc_st = st.builds(R.DocRecord, doc_id=st.text(), text=st.text(),
                   chunks=st.lists(chunk_st, max_size=4),
                   meta=st.dictionaries(st.text(max_size=5), st.one_of(st.text(), st.integers(
                       -2**53, 2**53), st.booleans(), st.none())))


def _f32(rec):
  """rec with every float rounded to float32, for comparison."""
  chunks = [R.ChunkRecord(**{**c.__dict__,
                             "log_weights": [np.float32(w) for w in c.log_weights],
                             "elbo": {k: np.float32(v) for k, v in c.elbo.items()}})
            for c in rec.chunks]
  return R.DocRecord(rec.doc_id, rec.text, chunks, rec.meta)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(doc_st)
def test_example_and_json_round_trip(rec):
  back = R.from_example(R.to_example(rec).SerializeToString())
  assert _f32(back) == _f32(rec)
  again = R.from_json_dict(json.loads(json.dumps(R.to_json_dict(back), ensure_ascii=False)))
  assert again == back


def test_atomic_write_leaves_nothing_when_writer_fails(tmp_path):
  path = str(tmp_path / "s-00000-of-00001.tfrecord")

  def failing():
    yield from _records()[:2]
    raise RuntimeError("E-step crashed")

  with pytest.raises(RuntimeError, match="E-step crashed"):
    R.write_shard(failing(), path)
  assert os.listdir(tmp_path) == []
  # A failed rewrite keeps the previous shard intact.
  R.write_shard(_records()[:1], path)
  with pytest.raises(RuntimeError):
    R.write_shard(failing(), path)
  assert os.listdir(tmp_path) == ["s-00000-of-00001.tfrecord"]
  assert list(R.read_records(path)) == _records()[:1]
  # The same holds for a sharded write: no shard appears.
  with pytest.raises(RuntimeError):
    R.write_sharded(failing(), str(tmp_path / "m"), 3)
  assert os.listdir(tmp_path) == ["s-00000-of-00001.tfrecord"]


def _write_jsonl(path, objs):
  with open(path, "w", encoding="utf-8") as f:
    for o in objs:
      f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")


GOOD = {"doc_id": "a", "text": "x y", "chunks": [{"prefix": "", "suffix": "x"},
                                                 {"prefix": "x", "suffix": " y"}]}


@pytest.mark.parametrize("bad, message", [
    ('{"doc_id": "b", "text": ', r"bad\.jsonl:2: not valid JSON"),
    ({"doc_id": "b", "chunks": []}, r"bad\.jsonl:2: missing field 'text'"),
    ({"doc_id": "b", "text": "x", "chunks": [{"prefix": ""}, {"prefix": ""}]},
     r"bad\.jsonl:2: chunks\[0\]: missing field 'suffix'; every chunk needs"),
    ({"doc_id": "b", "text": "x", "chunks": [{"prefix": "", "suffix": "x", "thoughts": "z"}]},
     r"bad\.jsonl:2: chunks\[0\]: unknown field 'thoughts'"),
    ({"doc_id": "b", "text": "x", "chunks": [{"prefix": "", "suffix": "x", "thought_len": "5"}]},
     r"bad\.jsonl:2: chunks\[0\]\.thought_len: '5' should be an integer"),
    ({"doc_id": 7, "text": "x", "chunks": []}, r"bad\.jsonl:2: field 'doc_id' is 7, it should be"),
    ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
  path = str(tmp_path / "bad.jsonl")
  _write_jsonl(path, [GOOD, bad, GOOD])
  with pytest.raises(ValueError, match=message):
    R.from_jsonl(path, str(tmp_path / "out"), num_shards=2)
  assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_jsonl_defaults_and_blank_lines(tmp_path):
  path = str(tmp_path / "in.jsonl")
  _write_jsonl(path, [GOOD, "", GOOD])
  recs = list(R.read_jsonl(path))
  assert len(recs) == 2
  assert recs[0].chunks[1] == R.ChunkRecord(prefix="x", suffix=" y", thought=None,
                                            log_weights=[], thought_len=-1, ended=False,
                                            elbo={}, suffix_tokens=-1, cut_tokens=0, source="")
  assert recs[0].meta == {}


def test_read_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no file matches"):
    list(R.read_records(str(tmp_path / "nothing-*.tfrecord")))
  recs = _records()
  R.write_sharded(recs, str(tmp_path / "set"), 3)
  os.remove(R.shard_paths(str(tmp_path / "set"), 3)[1])
  with pytest.raises(FileNotFoundError, match=r"set-00001-of-00003\.tfrecord is missing"):
    list(R.read_records(str(tmp_path / "set-*")))
  # Explicit paths read a subset on purpose.
  assert len(list(R.read_records([R.shard_paths(str(tmp_path / "set"), 3)[0]]))) == 1

  path = str(tmp_path / "t-00000-of-00001.tfrecord")
  R.write_shard(recs, path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) - 20])
  with pytest.raises(ValueError, match=r"t-00000-of-00001\.tfrecord: corrupt"):
    list(R.read_records(path))


def test_tf_parse_fn_in_tf_data(tmp_path):
  recs = _records()
  R.write_sharded(recs, str(tmp_path / "p"), 2)
  paths = R.shard_paths(str(tmp_path / "p"), 2)
  ds = tf.data.TFRecordDataset(paths).map(R.tf_parse_fn(), num_parallel_calls=2)
  spec = ds.element_spec
  assert spec["suffix"].dtype == tf.string and spec["suffix"].shape.as_list() == [None]
  assert isinstance(spec["log_weights"], tf.RaggedTensorSpec)
  parsed = list(ds)
  expected = list(R.read_records(paths))
  assert [e.doc_id for e in expected] == ["doc-0", "doc-2 ✓", "doc-empty"]
  for got, rec in zip(parsed, expected):
    assert got["doc_id"].numpy().decode() == rec.doc_id
    assert got["text"].numpy().decode() == rec.text
    assert json.loads(got["meta"].numpy().decode()) == rec.meta
    assert int(got["num_chunks"]) == len(rec.chunks)
    dec = lambda t: [v.decode() for v in t.numpy().tolist()]
    assert dec(got["prefix"]) == [c.prefix for c in rec.chunks]
    assert dec(got["suffix"]) == [c.suffix for c in rec.chunks]
    assert dec(got["source"]) == [c.source for c in rec.chunks]
    thoughts = [t if h else None for t, h in zip(dec(got["thought"]), got["has_thought"].numpy())]
    assert thoughts == [c.thought for c in rec.chunks]
    assert got["ended"].numpy().tolist() == [c.ended for c in rec.chunks]
    assert got["thought_len"].numpy().tolist() == [c.thought_len for c in rec.chunks]
    assert got["suffix_tokens"].numpy().tolist() == [c.suffix_tokens for c in rec.chunks]
    assert got["cut_tokens"].numpy().tolist() == [c.cut_tokens for c in rec.chunks]
    assert got["log_weights"].to_list() == [c.log_weights for c in rec.chunks]
    elbos = [dict(zip([k.decode() for k in ks], vs))
             for ks, vs in zip(got["elbo_k"].to_list(), got["elbo"].to_list())]
    assert elbos == [c.elbo for c in rec.chunks]
  batch = next(iter(ds.ragged_batch(3)))
  assert batch["suffix"].shape.as_list()[0] == 3
  assert batch["log_weights"].to_list()[0] == [[-1.5, -2.25, -0.125, -40.0], [], [0.5]]


def test_bad_record_names_doc_id(tmp_path):
  rec = R.DocRecord("doc-bad", "x", [R.ChunkRecord("", "x", thought_len="5")])
  with pytest.raises(ValueError, match="doc_id='doc-bad' cannot be encoded"):
    R.write_shard([rec], str(tmp_path / "x.tfrecord"))
  assert os.listdir(tmp_path) == []
