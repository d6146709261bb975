"""Thought-augmented seqio tasks: exact token layouts, coin flips per (doc, epoch, seed),
mix-in-raw and mixture rates, long-document splitting and token accounting.

Expected token ids come from the tokenizer's Python encoder applied to text built here from
the four latent tokens (independently of formats.document); the TF pipeline must match them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import seqio
import tensorflow as tf
from scipy import stats

from latent_em import config_lib
from latent_em import formats
from latent_em import tokenizer as tok_lib
from latent_em.data import pipeline
from latent_em.data import records
from latent_em.data import tasks
from latent_em.data import thought_tasks as tt
from latent_em.formats import EOL, POST, PRIOR, SOL

SEQ = 256
SEED = 11
FORMATS = ("random", "prior_only", "posterior_only", "pure", "raw")
P_MIN = 1e-3  # binomial tests: reject only when the count is clearly off its rate

# (doc_id, [(suffix, thought)]): unicode everywhere, one chunk without a thought.
SMALL = [
    ("doc-α", [("Café au lait costs 3 €. ", "milk and coffee, priced in euros"),
               ("Ça fait 6 € for two. ", "2 × 3 = 6")]),
    ("doc-β", [("Let x = 2. ", "x is a small number"),
               ("Then x² = 4. ", None),
               ("And x³ = 8; π≈3.14 stays. ", "cube: 2·2·2")]),
    ("doc-γ", [("Über alles. ", "a German phrase"), ("Naïve set theory. ", "sets of sets"),
               ("The end… ", "closing"), ("Really. ", "emphasis")]),
    ("doc-δ", [("Sum 1 + 1 = 2. ", "add one to one"), ("Done. ", "finished")]),
]


def _doc(doc_id: str, pairs) -> records.DocRecord:
  chunks, prev = [], ""
  for suffix, thought in pairs:
    chunks.append(records.ChunkRecord(prefix=prev, suffix=suffix, thought=thought,
                                      source="teacher"))
    prev = suffix
  return records.DocRecord(doc_id=doc_id, text="".join(s for s, _ in pairs), chunks=chunks)


def _big_docs(n: int) -> list[records.DocRecord]:
  words = ("sum", "prime", "even", "odd", "root", "cube", "half", "twice")
  return [_doc(f"big-{i}", [(f"Fact {i}.{j}: {words[(i + j) % 8]} é. ", f"note {j} {words[i % 8]}")
                            for j in range(3)]) for i in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("thought_tasks")
  small = [_doc(i, p) for i, p in SMALL]
  big = _big_docs(300)
  small_paths = records.shard_paths(str(root / "small"), 2)
  records.write_shard(small[:2], small_paths[0])
  records.write_shard(small[2:], small_paths[1])
  big_path = str(root / "big.tfrecord")
  records.write_shard(big, big_path)
  texts = [r.text for r in small + big] + [c.thought for r in small + big for c in r.chunks
                                           if c.thought]
  tok = tok_lib.load(tok_lib.train(texts, str(root / "tok.model"), 360))
  return {"root": root, "small": small, "big": big, "tok": tok, "big_path": big_path,
          "small_glob": str(root / "small-*-of-*.tfrecord")}


# ---------------------------------------------------------------------------------------------
# Helpers: independent references and batch decoding.


def _expected_text(rec: records.DocRecord, fmt: str, flips) -> str:
  if fmt == "raw":
    return rec.text
  if fmt == "pure":
    return "".join(c.thought for c in rec.chunks if c.thought)
  out = []
  for c, prior in zip(rec.chunks, flips):
    if c.thought is None:
      out.append(c.suffix)
    elif prior:
      out.append(SOL + PRIOR + c.thought + EOL + c.suffix)
    else:
      out.append(SOL + EOL + c.suffix + SOL + POST + c.thought + EOL)
  return "".join(out)


def _ids_by_parts(tok, text: str) -> list[int]:
  """Token ids with every latent token as its one id and the text between encoded alone."""
  ids = []
  for part in re.split("(" + "|".join(map(re.escape, formats.LATENT_TOKENS)) + ")", text):
    if part in tok.latent_ids:
      ids.append(tok.latent_ids[part])
    elif part:
      ids.extend(tok.encode(part))
  return ids


def _reference(tok, rec, fmt, epoch, **kw) -> tuple[int, ...]:
  text = tt.layout_document(rec, fmt, epoch=epoch, seed=SEED, **kw)
  return tuple(tok.encode(text) + [tok.eos_id])


def _packed_docs(batches, bos_id: int) -> list[tuple[int, ...]]:
  """The documents (targets per segment) of packed batches; checks the BOS-shifted inputs."""
  out = []
  for b in batches:
    for r in range(b["targets"].shape[0]):
      seg = b["segment_ids"][r]
      for s in sorted(set(seg.tolist()) - {0}):
        mask = seg == s
        targets, inputs = b["targets"][r][mask], b["inputs"][r][mask]
        assert inputs[0] == bos_id and list(inputs[1:]) == list(targets[:-1])
        assert (b["loss_weights"][r][mask] == 1).all()
        out.append(tuple(int(t) for t in targets))
  return out


def _task_docs(task, num_epochs=1, sequence_length=None, **kw) -> list[tuple[int, ...]]:
  ds = task.get_dataset(sequence_length, split="train", shuffle=False, num_epochs=num_epochs,
                        **kw)
  return [tuple(int(t) for t in ex["targets"]) for ex in ds.as_numpy_iterator()]


def _latent_count(doc, tok, token) -> int:
  return sum(1 for t in doc if t == tok.latent_ids[token])


# ---------------------------------------------------------------------------------------------
# Config and the deterministic choices.


def test_config_validation():
  cfg = config_lib.from_config(tt.ThoughtDataConfig, {"format": "prior_only",
                                                      "mix_in_raw_ratio": 0.25},
                               "config.mstep_data")
  assert cfg.format == "prior_only" and cfg.mix_in_raw_ratio == 0.25
  with pytest.raises(config_lib.ConfigError, match=r"config\.mstep_data\.format.*'bogus'"):
    config_lib.from_config(tt.ThoughtDataConfig, {"format": "bogus"}, "config.mstep_data")
  with pytest.raises(config_lib.ConfigError, match=r"config\.mstep_data\.mix_in_raw_ratio"):
    config_lib.from_config(tt.ThoughtDataConfig, {"mix_in_raw_ratio": 1.5}, "config.mstep_data")
  with pytest.raises(config_lib.ConfigError, match=r"config\.mstep_data\.sede.*seed"):
    config_lib.from_config(tt.ThoughtDataConfig, {"sede": 1}, "config.mstep_data")


def _ref_unit(kind, doc_id, epoch, seed, i) -> float:
  key = f"{kind}\0{seed}\0{epoch}\0{i}\0{doc_id}".encode("utf-8")
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


def test_coin_flips_are_a_stable_hash_of_doc_epoch_seed():
  # The documented blake2b formula: the same on every run, host and Python process.
  for doc_id, epoch, seed in [("doc-α", 0, 0), ("doc-α", 1, 0), ("x", 3, 17)]:
    assert tt.coin_flips(doc_id, 6, epoch, seed) == [
        _ref_unit("flip", doc_id, epoch, seed, i) < 0.5 for i in range(6)]
    assert tt.use_raw(doc_id, epoch, seed, 0.3) == (_ref_unit("raw", doc_id, epoch, seed, 0)
                                                    < 0.3)
  # A chunk's flip does not depend on how many chunks follow it.
  assert tt.coin_flips("d", 3, 2, 5) == tt.coin_flips("d", 9, 2, 5)[:3]
  ids = [f"doc-{i}" for i in range(2000)]
  e0 = [f for d in ids for f in tt.coin_flips(d, 5, 0, 0)]
  e1 = [f for d in ids for f in tt.coin_flips(d, 5, 1, 0)]
  s1 = [f for d in ids for f in tt.coin_flips(d, 5, 0, 1)]
  n = len(e0)
  assert stats.binomtest(sum(e0), n, 0.5).pvalue > P_MIN
  # Epochs and seeds give independent flips: they agree on about half of the chunks.
  for other in (e1, s1):
    assert stats.binomtest(sum(a == b for a, b in zip(e0, other)), n, 0.5).pvalue > P_MIN
  raw = [tt.use_raw(d, 0, 0, 0.2) for d in ids]
  assert stats.binomtest(sum(raw), len(ids), 0.2).pvalue > P_MIN
  assert not any(tt.use_raw(d, 0, 0, 0.0) for d in ids)
  assert all(tt.use_raw(d, 0, 0, 1.0) for d in ids)


def test_layout_document_matches_hand_built_text(env):
  for rec in env["small"]:
    flips = tt.coin_flips(rec.doc_id, len(rec.chunks), 2, SEED)
    for fmt in FORMATS:
      want = _expected_text(rec, fmt, {"prior_only": [True] * 4, "posterior_only": [False] * 4}
                            .get(fmt, flips))
      assert tt.layout_document(rec, fmt, epoch=2, seed=SEED) == want
    assert tt.layout_document(rec, "pure", epoch=0, seed=0) == "".join(
        c.thought for c in rec.chunks if c.thought is not None)
    assert tt.layout_document(rec, "prior_only", epoch=0, seed=0, mix_in_raw_ratio=1.0) == rec.text
  beta = env["small"][1]
  dropped = tt.layout_document(beta, "prior_only", epoch=0, seed=0, drop_thoughtless_chunks=True)
  assert "Then x² = 4. " not in dropped and dropped == (
      SOL + PRIOR + "x is a small number" + EOL + "Let x = 2. " +
      SOL + PRIOR + "cube: 2·2·2" + EOL + "And x³ = 8; π≈3.14 stays. ")


# ---------------------------------------------------------------------------------------------
# The TF path.


@pytest.mark.parametrize("fmt", FORMATS)
def test_task_tokens_are_exact_layouts(env, fmt):
  tok = env["tok"]
  task = tt.register_thought_task(f"test_tt_layout_{fmt}", {"train": [env["small_glob"]]},
                                  tok.vocabulary, fmt=fmt, seed=SEED)
  docs = _task_docs(task)
  by_flips = {"prior_only": lambda n: [True] * n, "posterior_only": lambda n: [False] * n}
  want = []
  for rec in env["small"]:
    flips = by_flips.get(fmt, lambda n: tt.coin_flips(rec.doc_id, n, 0, SEED))(len(rec.chunks))
    ids = _ids_by_parts(tok, _expected_text(rec, fmt, flips)) + [tok.eos_id]
    assert tuple(ids) == _reference(tok, rec, fmt, 0)
    want.append(tuple(ids))
  assert sorted(docs) == sorted(want)
  alpha = want[0]
  thought_ids = tok.encode(SMALL[0][1][0][1])
  if fmt == "prior_only":  # SoL PRIOR z EoL x ...
    assert list(alpha[:2 + len(thought_ids) + 1]) == (
        [tok.latent_ids[SOL], tok.latent_ids[PRIOR]] + thought_ids + [tok.latent_ids[EOL]])
  if fmt == "posterior_only":  # SoL EoL x SoL POST z EoL ...
    assert list(alpha[:2]) == [tok.latent_ids[SOL], tok.latent_ids[EOL]]
  if fmt in ("raw", "pure"):
    assert not any(t in tok.latent_ids.values() for d in docs for t in d)
  if fmt == "pure":
    assert tok.decode(list(alpha[:-1])) == "".join(t for _, t in SMALL[0][1])


def test_packed_batches_wrap_layouts_in_bos_eos(env):
  tok = env["tok"]
  tt.register_thought_task("test_tt_packed", {"train": [env["small_glob"]]}, tok.vocabulary,
                           fmt="random", seed=SEED)
  ds = pipeline.get_dataset("test_tt_packed", "train", SEQ, 2, bos_id=tok.bos_id, seed=0,
                            shuffle=False, repeat=False, shard_id=0, num_shards=1,
                            drop_remainder=False)
  docs = _packed_docs(ds.as_numpy_iterator(), tok.bos_id)  # checks inputs = BOS + targets[:-1]
  assert sorted(docs) == sorted(_reference(tok, r, "random", 0) for r in env["small"])
  assert all(d[-1] == tok.eos_id for d in docs)


def test_epochs_change_flips_and_runs_repeat_exactly(env):
  tok, small = env["tok"], env["small"]
  task = tt.register_thought_task("test_tt_epochs", {"train": [env["small_glob"]]},
                                  tok.vocabulary, seed=SEED, shuffle_buffer_size=len(small))
  docs = _task_docs(task, num_epochs=3)
  n = len(small)
  assert len(docs) == 3 * n
  refs = [[_reference(tok, rec, "random", e) for rec in small] for e in range(40)]
  for e in range(3):
    assert sorted(docs[e * n:(e + 1) * n]) == sorted(refs[e])
  assert refs[0] != refs[1]  # some chunk flips differently in epoch 1
  # Through pipeline.get_dataset (shuffled, repeated forever): reproducible for a seed, exactly
  # resumable (the epoch counter restarts with the dataset), and documents of later epochs carry
  # their own epoch's layout.
  def dataset():
    return pipeline.get_dataset("test_tt_epochs", "train", SEQ, 2, bos_id=tok.bos_id, seed=3,
                                shard_id=0, num_shards=1)
  batches = list(dataset().take(3).as_numpy_iterator())
  resumed = pipeline.BatchIterator(dataset, start_batch=1)
  for want in batches[1:]:
    got_batch = next(resumed)
    assert all((got_batch[k] == want[k]).all() for k in pipeline.BATCH_KEYS)
  got = _packed_docs(batches, tok.bos_id)
  assert len(got) >= 3 * n
  # A shuffle buffer of n documents and packing move a document only a few epochs away.
  allowed = {d for e in range(len(got) // n + 4) for d in refs[e]}
  assert set(got) <= allowed
  assert set(got) & (set(refs[1]) - set(refs[0]))


def test_prior_fraction_is_one_half(env):
  tok = env["tok"]
  task = tt.register_thought_task("test_tt_fraction", {"train": [env["big_path"]]},
                                  tok.vocabulary, seed=SEED)
  docs = _task_docs(task, num_epochs=2)
  big = env["big"]
  assert len(docs) == 2 * len(big)
  assert docs == [_reference(tok, rec, "random", e) for e in range(2) for rec in big]
  prior = sum(_latent_count(d, tok, PRIOR) for d in docs)
  post = sum(_latent_count(d, tok, POST) for d in docs)
  n_chunks = 2 * sum(len(r.chunks) for r in big)
  assert prior + post == n_chunks
  assert stats.binomtest(prior, n_chunks, 0.5).pvalue > P_MIN


def test_prior_rate_and_empty_thoughts(env):
  tok, big, small = env["tok"], env["big"], env["small"]
  # The TF path: prior form at `prior_rate`, the same documents as the Python reference.
  task = tt.register_thought_task("test_tt_prior_rate", {"train": [env["big_path"]]},
                                  tok.vocabulary, seed=SEED, prior_rate=0.9)
  docs = _task_docs(task, num_epochs=2)
  assert docs == [_reference(tok, rec, "random", e, prior_rate=0.9)
                  for e in range(2) for rec in big]
  prior = sum(_latent_count(d, tok, PRIOR) for d in docs)
  n_chunks = 2 * sum(len(r.chunks) for r in big)
  assert prior + sum(_latent_count(d, tok, POST) for d in docs) == n_chunks
  assert stats.binomtest(prior, n_chunks, 0.9).pvalue > P_MIN
  # A rate of 1/2 is the default layout; 1 and 0 are the prior and posterior forms.
  flips = tt.coin_flips("d", 50, 0, SEED)
  assert tt.coin_flips("d", 50, 0, SEED, 0.5) == flips
  assert all(tt.coin_flips("d", 50, 0, SEED, 1.0)) and not any(tt.coin_flips("d", 50, 0, SEED, 0.0))
  # Empty thoughts: the thoughtless chunk of `beta` gets `SoL PRIOR EoL x`, the rest as before.
  beta = small[1]
  assert tt.layout_document(beta, "prior_only", epoch=0, seed=0, empty_thoughts=True) == (
      SOL + PRIOR + "x is a small number" + EOL + "Let x = 2. " +
      SOL + PRIOR + EOL + "Then x² = 4. " +
      SOL + PRIOR + "cube: 2·2·2" + EOL + "And x³ = 8; π≈3.14 stays. ")
  assert tt.layout_document(beta, "pure", epoch=0, seed=0, empty_thoughts=True) == (
      tt.layout_document(beta, "pure", epoch=0, seed=0))
  task = tt.register_thought_task("test_tt_empty", {"train": [env["small_glob"]]},
                                  tok.vocabulary, seed=SEED, empty_thoughts=True, prior_rate=0.7)
  want = [_reference(tok, r, "random", 0, empty_thoughts=True, prior_rate=0.7) for r in small]
  assert sorted(_task_docs(task)) == sorted(want)
  # Token budgets count the same layout.
  got = tt.thought_token_stats(env["small_glob"], tok, seed=SEED, empty_thoughts=True,
                               prior_rate=0.7)
  assert got["total_tokens"]["random"] == pipeline.count_tokens("test_tt_empty", "train")
  assert got["total_tokens"]["random"] == sum(map(len, want))
  # Config: the key and the fix.
  with pytest.raises(config_lib.ConfigError, match=r"config\.mstep_data\.prior_rate"):
    config_lib.from_config(tt.ThoughtDataConfig, {"prior_rate": 1.5}, "config.mstep_data")
  with pytest.raises(config_lib.ConfigError, match=r"config\.mstep_data\.empty_thoughts"):
    config_lib.from_config(tt.ThoughtDataConfig,
                           {"empty_thoughts": True, "drop_thoughtless_chunks": True},
                           "config.mstep_data")


def test_mix_in_raw_ratio(env):
  tok, big, ratio = env["tok"], env["big"], 0.3
  task = tt.register_thought_task("test_tt_mix_raw", {"train": [env["big_path"]]},
                                  tok.vocabulary, fmt="random", mix_in_raw_ratio=ratio,
                                  seed=SEED)
  docs = _task_docs(task, num_epochs=2)
  latent = set(tok.latent_ids.values())
  raw_ids = {tuple(tok.encode(r.text) + [tok.eos_id]) for r in big}
  raw = [d for d in docs if not latent & set(d)]
  assert all(d in raw_ids for d in raw)
  assert len(raw) == sum(tt.use_raw(r.doc_id, e, SEED, ratio) for e in range(2) for r in big)
  assert stats.binomtest(len(raw), len(docs), ratio).pvalue > P_MIN


def test_mixture_rates(env):
  tok = env["tok"]
  tt.register_thought_task("test_tt_mix_thought", {"train": [env["big_path"]]}, tok.vocabulary,
                           fmt="prior_only", seed=SEED, shuffle_buffer_size=64)
  raw_path = os.path.join(env["root"], "raw.jsonl")
  with open(raw_path, "w", encoding="utf-8") as f:
    for i in range(100):
      f.write(json.dumps({"text": f"Raw line {i}: plain café text. "}, ensure_ascii=False) + "\n")
  tasks.register_raw_task("test_tt_mix_raw_text", {"train": [raw_path]}, tok.vocabulary,
                          shuffle_buffer_size=64)
  tt.register_mixture("test_tt_mixture", [("test_tt_mix_raw_text", 1.0)])
  mix = tt.register_mixture("test_tt_mixture", [("test_tt_mix_thought", 3.0),
                                                ("test_tt_mix_raw_text", 1.0)])
  assert isinstance(mix, seqio.Mixture) and len(mix.tasks) == 2  # re-registration replaced it
  ds = pipeline.get_dataset("test_tt_mixture", "train", SEQ, 8, bos_id=tok.bos_id, seed=0,
                            shard_id=0, num_shards=1)
  docs = _packed_docs(ds.take(20).as_numpy_iterator(), tok.bos_id)
  assert len(docs) > 500 and all(d[-1] == tok.eos_id for d in docs)  # whole documents
  # Identification: every prior_only document starts with SoL; raw documents have no latent id.
  thought = [d for d in docs if d[0] == tok.latent_ids[SOL]]
  latent = set(tok.latent_ids.values())
  assert all(not latent & set(d) for d in docs if d[0] != tok.latent_ids[SOL])
  assert stats.binomtest(len(thought), len(docs), 0.75).pvalue > P_MIN
  with pytest.raises(ValueError, match="no registered task or mixture 'nope'"):
    tt.register_mixture("test_tt_bad", [("nope", 1.0)])
  with pytest.raises(ValueError, match="must be > 0"):
    tt.register_mixture("test_tt_bad", [("test_tt_mix_thought", 0.0)])


def test_long_documents_split_into_consecutive_pieces(env):
  tok = env["tok"]
  task = tt.register_thought_task("test_tt_split", {"train": [env["small_glob"]]},
                                  tok.vocabulary, fmt="posterior_only")
  whole = _task_docs(task)
  assert sorted(whole) == sorted(_reference(tok, r, "posterior_only", 0) for r in env["small"])
  length = 8
  pieces = _task_docs(task, sequence_length={"targets": length})
  assert pieces == [d[i:i + length] for d in whole for i in range(0, len(d), length)]
  assert max(map(len, whole)) > length


def test_drop_thoughtless_chunks_and_sharding(env, tmp_path):
  tok, small = env["tok"], env["small"]
  path = str(tmp_path / "one.tfrecord")
  records.write_shard(small, path)
  task = tt.register_thought_task("test_tt_drop", {"train": [path]}, tok.vocabulary,
                                  fmt="random", seed=SEED, drop_thoughtless_chunks=True)
  want = [_reference(tok, r, "random", 0, drop_thoughtless_chunks=True) for r in small]
  assert _task_docs(task) == want
  assert "Then x² = 4. " not in tok.decode(list(want[1]))
  assert "Then x² = 4. " in tok.decode(list(_reference(tok, small[1], "random", 0)))
  # One file, two hosts: records are dealt by index; together the hosts see each doc once.
  hosts = [_task_docs(task, shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
  assert hosts == [want[0::2], want[1::2]]


def test_token_stats_match_count_tokens(env):
  tok, small = env["tok"], env["small"]
  got = tt.thought_token_stats(env["small_glob"], tok, seed=SEED)
  assert got["documents"] == 4 and got["chunks"] == 11 and got["chunks_with_thought"] == 10
  assert got["raw_tokens"] == sum(len(tok.encode(r.text)) for r in small)
  assert got["thought_tokens"] == sum(len(tok.encode(c.thought)) for r in small for c in r.chunks
                                      if c.thought is not None)
  for fmt in FORMATS:
    name = f"test_tt_count_{fmt}"
    tt.register_thought_task(name, {"train": [env["small_glob"]]}, tok.vocabulary, fmt=fmt,
                             seed=SEED)
    assert got["total_tokens"][fmt] == pipeline.count_tokens(name, "train"), fmt
  assert got["total_tokens"]["raw"] == got["raw_tokens"] + got["documents"]
  assert got["total_tokens"]["prior_only"] < got["total_tokens"]["posterior_only"]


def test_bad_files_are_named(env, tmp_path):
  tok = env["tok"]
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("{}\n")
  with pytest.raises(ValueError, match=r"files\['train'\].*docs\.jsonl.*from_jsonl"):
    tt.register_thought_task("test_tt_bad", {"train": [str(jsonl)]}, tok.vocabulary)
  prefix = str(tmp_path / "part")
  for p in records.shard_paths(prefix, 3)[:2]:
    records.write_shard(env["small"][:1], p)
  with pytest.raises(FileNotFoundError, match=r"config\.x.*part-00002-of-00003.*missing"):
    tt.register_thought_task("test_tt_bad", {"train": [prefix + "-*-of-*.tfrecord"]},
                             tok.vocabulary, config_keys={"train": "config.x"})
  # A TFRecord that is not a DocRecord shard fails when read, naming the file and record.
  alien = str(tmp_path / "alien.tfrecord")
  with tf.io.TFRecordWriter(alien) as w:
    w.write(tf.train.Example().SerializeToString())
  task = tt.register_thought_task("test_tt_alien", {"train": [alien]}, tok.vocabulary)
  with pytest.raises(tf.errors.OpError, match=r"alien\.tfrecord: record 0: schema_version"):
    _task_docs(task)
  with pytest.raises(ValueError, match="has no record files"):
    tt.register_thought_task("test_tt_bad", {"train": []}, tok.vocabulary)
  with pytest.raises(ValueError, match=r"format 'bogus' is not one of \['random'"):
    tt.register_thought_task("test_tt_bad", {"train": [env["big_path"]]}, tok.vocabulary,
                             fmt="bogus")
