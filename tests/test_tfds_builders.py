"""Tests for the TFDS builders in latent_em.data.tfds, built offline from the real data files."""
import collections
import gzip
import hashlib
import io
import json
import os
import re
import socket
import tarfile

import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

from latent_em.data import tfds as latent_tfds  # pylint: disable=g-import-not-at-top
from latent_em.data.tfds import math_dataset, text_corpus  # pylint: disable=g-import-not-at-top

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA),
                                reason=f"shared data folder {os.path.abspath(DATA)} is missing")
N_LINES = 200  # lines copied per file: enough for every subject, fast to build


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Every test here must work offline: downloads and sockets raise."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r} {kwargs!r}")
  monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", refuse)
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  tfds.disable_progress_bar()


def _lines(rel: str) -> list[str]:
  with open(os.path.join(DATA, rel), encoding="utf-8") as f:
    return [line for line in f if line.strip()]


def _write(path, lines) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(lines)


def _examples(ds) -> list[dict]:
  return [{k: v.decode("utf-8") if isinstance(v, bytes) else int(v) for k, v in ex.items()}
          for ex in tfds.as_numpy(ds)]


# ------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------


@needs_data
def test_gsm8k_from_manual_dir_matches_source_lines(tmp_path):
  manual = tmp_path / "gsm8k"
  manual.mkdir()
  source = {}
  for split in ("train", "test"):
    lines = _lines(f"gsm8k/{split}.jsonl")[:N_LINES]
    _write(manual / f"{split}.jsonl", lines)
    source[split] = [json.loads(line) for line in lines]
  data_dir = str(tmp_path / "data")

  builder = latent_tfds.prepare("latent_em_gsm8k", data_dir, manual_dir=str(manual))
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
      "train": N_LINES, "test": N_LINES}
  for split in ("train", "test"):
    got = _examples(latent_tfds.load_split("latent_em_gsm8k", split, data_dir))
    # The last line of every GSM8K solution is "#### <answer>".
    want = [(r["question"], r["answer"], r["answer"].split("\n")[-1][len("#### "):])
            for r in source[split]]
    assert sorted((e["question"], e["answer"], e["final_answer"]) for e in got) == sorted(want)
  test = _examples(latent_tfds.load_split("latent_em_gsm8k", "test", data_dir))
  janet = [e for e in test if e["question"].startswith("Janet\u2019s ducks lay 16 eggs")]
  assert [e["final_answer"] for e in janet] == ["18"]
  # Thousands separators are kept as written.
  assert any("," in e["final_answer"] for e in test)


@needs_data
def test_gsm8k_partial_manual_dir_is_an_error(tmp_path):
  _write(tmp_path / "train.jsonl", _lines("gsm8k/train.jsonl")[:3])
  with pytest.raises(FileNotFoundError, match=r"not \['test.jsonl'\]"):
    latent_tfds.prepare("latent_em_gsm8k", str(tmp_path / "data"), manual_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------
# MATH
# ------------------------------------------------------------------------------------------

# Train problems with an unknown level ("Level ?") or an empty \boxed{} upstream.
_ODD_IDS = ("train/geometry/377.json", "train/geometry/471.json",
            "train/number_theory/7115.json", "train/number_theory/7117.json")


def _math_subset(split: str) -> list[str]:
  """N_LINES lines spread over the file (it is sorted by subject), then the odd problems."""
  lines = _lines(f"math/{split}.jsonl")
  keep = lines[::len(lines) // N_LINES][:N_LINES]
  keep += [l for l in lines if json.loads(l)["unique_id"] in _ODD_IDS and l not in keep]
  return keep


def _check_math_examples(got: list[dict], source: list[dict]) -> None:
  by_id = {e["unique_id"]: e for e in got}
  assert len(by_id) == len(got) == len(source)
  for r in source:
    e = by_id[r["unique_id"]]
    assert (e["problem"], e["solution"], e["subject"]) == (r["problem"], r["solution"],
                                                           r["subject"])
    assert e["level"] == (-1 if r["level"] is None else r["level"])
    # The data's own `answer` was extracted separately when the files were made.
    assert e["answer"] == r["answer"].strip()


@needs_data
def test_math_from_manual_dir_matches_source_lines(tmp_path):
  manual = tmp_path / "math"
  manual.mkdir()
  source = {}
  for split in ("train", "test", "math500"):
    lines = _math_subset(split)
    _write(manual / f"{split}.jsonl", lines)
    source[split] = [json.loads(line) for line in lines]
  data_dir = str(tmp_path / "data")

  for split in ("train", "test", "math500"):
    got = _examples(latent_tfds.load_split("latent_em_math", split, data_dir,
                                           manual_dir=str(manual)))
    _check_math_examples(got, source[split])
  train = {e["unique_id"]: e for e in
           _examples(latent_tfds.load_split("latent_em_math", "train", data_dir))}
  assert len(train) == N_LINES + len(_ODD_IDS)
  assert train["train/geometry/377.json"]["level"] == -1
  assert train["train/number_theory/7117.json"]["answer"] == ""
  assert {e["subject"] for e in train.values()} == {
      "Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra",
      "Number Theory", "Prealgebra", "Precalculus"}
  assert collections.Counter(e["level"] for e in train.values()) == collections.Counter(
      -1 if r["level"] is None else r["level"] for r in source["train"])
  builder = tfds.builder("latent_em_math", data_dir=data_dir)
  assert builder.info.features["level"].dtype.name == "int32"
  with pytest.raises(ValueError, match=r"no split 'validation'; its splits are "
                                       r"\['math500', 'test', 'train'\]"):
    latent_tfds.load_split("latent_em_math", "validation", data_dir)


def _raw_release_tar(path, records: dict[str, list[dict]]) -> None:
  """A MATH.tar laid out like the original release: MATH/SPLIT/SUBJECT_DIR/N.json."""
  with tarfile.open(path, "w") as tar:
    def add(name: str, data: bytes):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    for split, rows in records.items():
      for r in rows:
        raw = {"problem": r["problem"], "level": r["level_str"], "type": r["type"],
               "solution": r["solution"]}
        add(f"MATH/{r['unique_id']}", json.dumps(raw).encode())
        add(f"MATH/{os.path.dirname(r['unique_id'])}/._junk.json", b"\x00\x05\x16\x07")


@needs_data
@pytest.mark.parametrize("lfs_pointer", [False, True])
def test_math_download_path_reads_release_tarball(tmp_path, monkeypatch, lfs_pointer):
  records = {s: [json.loads(l) for l in _math_subset(s)[:30] + _math_subset(s)[N_LINES:]]
             for s in ("train", "test")}
  tar_path = tmp_path / "MATH.tar"
  _raw_release_tar(tar_path, records)
  math500_path = tmp_path / "math500.jsonl"
  math500_lines = _lines("math/math500.jsonl")[:20]
  if lfs_pointer:
    _write(math500_path, ["version https://git-lfs.github.com/spec/v1\n", "oid sha256:35dc\n"])
  else:
    _write(math500_path, math500_lines)
  requested = []

  def fake_download(self, urls):
    requested.append(urls)
    files = {math_dataset.LatentEmMath.MATH_TAR_URL: tar_path,
             math_dataset.LatentEmMath.MATH500_URL: math500_path}
    return {k: files[url] for k, url in urls.items()}
  monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
  data_dir = str(tmp_path / "data")
  empty_manual = tmp_path / "empty"
  if lfs_pointer:
    with pytest.raises(ValueError, match="Git-LFS pointer.*MATH500_URL"):
      latent_tfds.prepare("latent_em_math", data_dir, manual_dir=str(empty_manual))
    return
  latent_tfds.prepare("latent_em_math", data_dir, manual_dir=str(empty_manual))
  assert requested == [{"tar": "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar",
                        "math500": "https://raw.githubusercontent.com/openai/prm800k/main/"
                                   "prm800k/math_splits/test.jsonl"}]
  for split in ("train", "test"):
    _check_math_examples(_examples(latent_tfds.load_split("latent_em_math", split, data_dir)),
                         records[split])
  _check_math_examples(_examples(latent_tfds.load_split("latent_em_math", "math500", data_dir)),
                       [json.loads(l) for l in math500_lines])


def test_parse_level_and_boxed_answer():
  assert [math_dataset.parse_level(v, "x") for v in (3, None, "Level 5", "Level ?")] == [
      3, -1, 5, -1]
  with pytest.raises(ValueError, match="x: level 'hard'"):
    math_dataset.parse_level("hard", "x")
  assert math_dataset.boxed_answer(r"so $\boxed{\frac{1}{2}}$ and then \boxed{ {a}_{b} }") == (
      "{a}_{b}")
  assert math_dataset.boxed_answer(r"so the answer is $\boxed{}$.") == ""


# ------------------------------------------------------------------------------------------
# Local text corpus
# ------------------------------------------------------------------------------------------


def _doc(i: int) -> str:
  return f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 101}" for j in range(i % 9 + 1)) + "\n"


def _sha_validation(text: str, fraction: float) -> bool:
  h = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)
  return h / 2**64 < fraction


def test_text_corpus_split_is_deterministic_and_covers_every_document(tmp_path):
  src = tmp_path / "src"
  (src / "parquet").mkdir(parents=True)
  jsonl_docs = [_doc(i) for i in range(120)]
  lines = [json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(jsonl_docs)]
  lines[10:10] = [json.dumps({"body": "  \n\t"}) + "\n", "\n", json.dumps({"body": ""}) + "\n"]
  _write(src / "a.jsonl", lines)
  parquet_docs = [_doc(i) for i in range(120, 200)] + ["   "]
  pq.write_table(pa.table({"body": parquet_docs, "n": list(range(81))}),
                 src / "parquet" / "b.parquet")
  fraction = 0.25
  data_dir = str(tmp_path / "data")
  builder = latent_tfds.build_text_corpus(
      "toy", [str(src / "*.jsonl"), str(src / "parquet" / "*.parquet")], text_field="body",
      validation_fraction=fraction, data_dir=data_dir)
  assert builder.info.metadata["skipped_empty"] == 3

  splits = {s: _examples(latent_tfds.load_split("latent_em_text_corpus/toy", s, data_dir))
            for s in ("train", "validation")}
  all_docs = jsonl_docs + parquet_docs[:-1]
  got = [e["text"] for s in splits.values() for e in s]
  assert sorted(got) == sorted(all_docs)  # every non-empty document exactly once
  for split, examples in splits.items():
    assert all(_sha_validation(e["text"], fraction) == (split == "validation")
               for e in examples)
  assert 0.1 < len(splits["validation"]) / len(all_docs) < 0.4
  # doc_id names the file (relative to the common folder) and the JSONL line / Parquet row.
  for e in splits["train"] + splits["validation"]:
    path, n = e["doc_id"].rsplit(":", 1)
    if path == "a.jsonl":
      assert json.loads(lines[int(n) - 1])["body"] == e["text"]
    else:
      assert path == os.path.join("parquet", "b.parquet") and parquet_docs[int(n)] == e["text"]

  # Same documents, other order and container: the same documents land in validation.
  shuffled = sorted(all_docs, key=lambda d: hashlib.md5(d.encode()).hexdigest())
  with gzip.open(tmp_path / "all.jsonl.gz", "wt", encoding="utf-8") as f:
    f.writelines(json.dumps({"body": d}) + "\n" for d in shuffled)
  latent_tfds.build_text_corpus("toy_gz", [str(tmp_path / "all.jsonl.gz")], text_field="body",
                                validation_fraction=fraction, data_dir=data_dir)
  again = _examples(latent_tfds.load_split("latent_em_text_corpus/toy_gz", "validation",
                                           data_dir))
  assert sorted(e["text"] for e in again) == sorted(e["text"] for e in splits["validation"])

  # A name is bound to its settings: rebuilding it differently is an error, not stale data.
  with pytest.raises(ValueError, match="already built.*overwrite=True"):
    latent_tfds.build_text_corpus("toy", [str(src / "*.jsonl")], text_field="body",
                                  validation_fraction=fraction, data_dir=data_dir)
  rebuilt = latent_tfds.build_text_corpus("toy", [str(src / "*.jsonl")], text_field="body",
                                          validation_fraction=0.0, data_dir=data_dir,
                                          overwrite=True)
  assert set(rebuilt.info.splits) == {"train"}
  assert rebuilt.info.splits["train"].num_examples == len(jsonl_docs)


def test_text_corpus_bad_input_names_file_and_fix(tmp_path):
  _write(tmp_path / "a.jsonl", [json.dumps({"text": "fine"}) + "\n",
                                json.dumps({"content": "no text field"}) + "\n"])
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'a.jsonl'}:2: field 'text' "
                                                 "is missing")):
    latent_tfds.build_text_corpus("bad", [str(tmp_path / "a.jsonl")],
                                  data_dir=str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError, match="no .* file matches"):
    latent_tfds.build_text_corpus("none", [str(tmp_path / "*.parquet")],
                                  data_dir=str(tmp_path / "data"))
  with pytest.raises(ValueError, match="validation_fraction=1.0 must be in"):
    latent_tfds.build_text_corpus("frac", [str(tmp_path / "a.jsonl")], validation_fraction=1.0)
  with pytest.raises(ValueError, match="must be built first with build_text_corpus"):
    latent_tfds.load_split("latent_em_text_corpus/never_built", "train", str(tmp_path / "d"))
  pq.write_table(pa.table({"txt": ["x"]}), tmp_path / "c.parquet")
  with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['txt'\]\)"):
    latent_tfds.build_text_corpus("pq", [str(tmp_path / "c.parquet")],
                                  data_dir=str(tmp_path / "data"))


def test_text_corpus_manual_config_reads_manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  docs = [_doc(i) for i in range(500)]  # the default 1% validation needs a few hundred
  _write(manual / "part1.jsonl", [json.dumps({"text": d}) + "\n" for d in docs[:300]])
  _write(manual / "README.txt", ["ignored: not a corpus file\n"])
  pq.write_table(pa.table({"text": docs[300:]}), manual / "part2.parquet")
  data_dir = str(tmp_path / "data")
  got = {s: [e["text"] for e in _examples(latent_tfds.load_split(
      "latent_em_text_corpus", s, data_dir, manual_dir=str(manual)))]
         for s in ("train", "validation")}
  want_validation = [d for d in docs if _sha_validation(d, 0.01)]
  assert want_validation and sorted(got["validation"]) == sorted(want_validation)
  assert sorted(got["train"]) == sorted(set(docs) - set(want_validation))
  assert text_corpus.LatentEmTextCorpus.BUILDER_CONFIGS[0].name == "manual"
