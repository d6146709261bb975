"""The churn probe (em/probe.py --what=churn) on hand-built E-step records: right/wrong
transitions counted against a hand count."""
import os
import re

import pytest

from latent_em.data import mathcorpus, records
from latent_em.em import probe


def _exercises(n):
  cfg = mathcorpus.CorpusConfig(exercises=True, min_steps=2, max_steps=3, n_warmstart=n,
                                n_bootstrap=0, n_validation=0, n_eval=0, max_operand=10,
                                max_value=20, plain=True)
  return [row["text"] for row in mathcorpus.make_splits(cfg)["warmstart"][:n]]


def _record(i, text, right):
  """An exercise as the E-step writes it: the question chunk (context, no thought) and the
  answer chunk with the oracle's working, or working with its last result off by one."""
  cut = text.index(mathcorpus.ANSWER_CUE) + len(mathcorpus.ANSWER_CUE)
  question, answer = text[:cut], text[cut:]
  thought = mathcorpus.oracle_thought(question, answer)
  assert thought, text
  if not right:
    last = list(re.finditer(r"= (\d+)\.", thought))[-1]
    thought = (thought[:last.start(1)] + str(int(last.group(1)) + 1)
               + thought[last.end(1):])
  return records.DocRecord(doc_id=f"d{i}", text=text, chunks=[
      records.ChunkRecord(prefix="", suffix=question, source="estep"),
      records.ChunkRecord(prefix=question, suffix=answer, thought=thought, source="estep")])


def _write(workdir, iteration, texts, right):
  d = os.path.join(workdir, "estep", f"iter_{iteration}", "estep")
  os.makedirs(d)
  records.write_shard([_record(i, t, r) for i, (t, r) in enumerate(zip(texts, right))],
                      os.path.join(d, "records-00000-of-00001.tfrecord"))


def test_churn_counts_transitions(tmp_path):
  texts = _exercises(8)
  it1 = [True, True, True, False, False, False, False, False]
  it2 = [True, False, True, True, False, False, False, True]
  it3 = [True, True, True, True, True, False, False, True]
  for t, right in enumerate((it1, it2, it3), 1):
    _write(str(tmp_path), t, texts, right)
  res = probe.churn(str(tmp_path))
  assert [r["right"] for r in res["iterations"]] == [3 / 8, 4 / 8, 6 / 8]
  first, second = res["transitions"]
  assert first["chunks"] == 8
  assert (first["right->right"], first["right->wrong"], first["wrong->right"],
          first["wrong->wrong"]) == (2 / 8, 1 / 8, 2 / 8, 3 / 8)
  assert first["p_right_lost"] == pytest.approx(1 / 3)
  assert first["p_wrong_fixed"] == pytest.approx(2 / 5)
  # Unchanged rightness keeps the same text here, a flip changes it.
  assert first["same_thought"] == 5 / 8
  assert second["wrong->right"] == 2 / 8 and second["right->wrong"] == 0


def test_churn_without_estep_records_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="estep/iter_1/estep"):
    probe.churn(str(tmp_path))


def test_churn_counts_records_split_inside_a_sentence(tmp_path):
  texts = _exercises(3)
  for t in (1, 2):
    d = os.path.join(str(tmp_path), "estep", f"iter_{t}", "estep")
    os.makedirs(d)
    recs = [_record(i, text, True) for i, text in enumerate(texts)]
    # The last record's answer chunk starts inside its first sentence: no verdict for it.
    bad = recs[-1]
    cut = len(bad.chunks[0].suffix) + 3
    bad.chunks[0].suffix, bad.chunks[1].suffix = bad.text[:cut], bad.text[cut:]
    records.write_shard(recs, os.path.join(d, "records-00000-of-00001.tfrecord"))
  res = probe.churn(str(tmp_path))
  assert [(r["chunks"], r["unaligned_records"], r["right"]) for r in res["iterations"]] == [
      (2, 1, 1.0), (2, 1, 1.0)]
