"""From a seqio task to per-host numpy batches: deterministic, shardable and exactly resumable.

Layout of one packed row (seqio.DecoderFeatureConverter with our BOS):
  targets      x1 x2 .. xn EOS  y1 .. EOS  0 ..
  inputs       BOS x1 .. xn     BOS y1 ..  0 ..   (targets shifted right per segment)
  loss_weights 1 where targets are not padding, else 0
  segment_ids  1 1 .. 1         2 2 ..     0 ..   (packed document index, 0 = padding)
  positions    0 1 .. n         0 1 ..     0 ..   (restart per segment)
Unpacked rows (pack=False) hold one document each, with segment_ids 1 on it and positions 0..n.

Resume is exact: the same (task, split, seed, shards) gives the same batch sequence, and
BatchIterator(start_batch=k) skips the first k batches of it. Skipping re-reads the data (it
costs as much input processing as the skipped batches), but needs no saved tf.data state.
"""
from __future__ import annotations

import atexit
import gc
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import jax
import numpy as np
import seqio
import tensorflow as tf

from latent_em.data import sources

TaskOrName = Union[str, seqio.Task, seqio.Mixture]
BATCH_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


def host_batch_size(global_batch_size: int, num_shards: int) -> int:
  """The per-host share of the global batch; it must divide evenly."""
  if global_batch_size < 1 or global_batch_size % num_shards:
    raise ValueError(
        f"config.data.batch_size={global_batch_size} must be a positive multiple of the number "
        f"of hosts ({num_shards}); set it to a multiple of {num_shards}")
  return global_batch_size // num_shards


def _shard_info(shard_id: Optional[int], num_shards: Optional[int]
                ) -> tuple[int, int, Optional[seqio.ShardInfo]]:
  shard_id = jax.process_index() if shard_id is None else shard_id
  num_shards = jax.process_count() if num_shards is None else num_shards
  if not 0 <= shard_id < num_shards:
    raise ValueError(f"shard_id={shard_id} is not in [0, num_shards={num_shards})")
  info = seqio.ShardInfo(index=shard_id, num_shards=num_shards) if num_shards > 1 else None
  return shard_id, num_shards, info


def _model_features(ex: Mapping[str, tf.Tensor], pack: bool) -> dict[str, tf.Tensor]:
  """Renames seqio's decoder features; adds segment ids / positions for unpacked rows.

  seqio leaves one stray id in the padding of `inputs` (a BOS when packed, the shifted-in EOS
  when not); it is zeroed so that padding is 0 in every feature.
  """
  targets = ex["decoder_target_tokens"]
  weights = tf.cast(ex["decoder_loss_weights"], tf.float32)
  if pack:
    segment_ids = ex["decoder_segment_ids"]
    positions = ex["decoder_positions"]
    mask = tf.cast(segment_ids > 0, tf.int32)
  else:
    mask = tf.cast(targets != 0, tf.int32)
    segment_ids = mask
    positions = tf.range(tf.shape(targets)[-1], dtype=tf.int32) * mask
  return {
      "inputs": tf.cast(ex["decoder_input_tokens"], tf.int32) * mask,
      "targets": tf.cast(targets, tf.int32),
      "loss_weights": weights,
      "segment_ids": tf.cast(segment_ids, tf.int32),
      "positions": tf.cast(positions, tf.int32),
  }


def get_dataset(
    task_or_mixture_name: TaskOrName,
    split: str,
    seq_len: int,
    global_batch_size: int,
    *,
    bos_id: int,
    seed: Optional[int],
    shuffle: bool = True,
    repeat: bool = True,
    shard_id: Optional[int] = None,
    num_shards: Optional[int] = None,
    pack: bool = True,
    drop_remainder: bool = True,
    shuffle_buffer: Optional[int] = None,
) -> tf.data.Dataset:
  """Batches of this host's share of a task split.

  Args:
    task_or_mixture_name: a registered seqio task / mixture, or the object itself.
    split: e.g. "train" or "validation".
    seq_len: tokens per row.
    global_batch_size: rows per step over all hosts (config.data.batch_size).
    bos_id: the id that starts every segment's inputs.
    seed: shuffling seed; the same seed gives the same batch sequence.
    shuffle, repeat: shuffle documents (files, then a buffer) / loop over the split forever.
    shard_id, num_shards: this host and the host count (default: jax.process_index/count).
    pack: pack several documents per row (else one document per row, padded).
    drop_remainder: drop a last partial batch (False leaves it short).
    shuffle_buffer: examples in the shuffle buffer (config.data.shuffle_buffer); None keeps
      the task's own (register_raw_task's shuffle_buffer_size). Tasks only, not mixtures.

  Returns:
    A tf.data.Dataset of dicts with BATCH_KEYS, each [global_batch_size / num_shards, seq_len]:
    int32 except loss_weights (float32).
  """
  _, num_shards, shard_info = _shard_info(shard_id, num_shards)
  batch = host_batch_size(global_batch_size, num_shards)
  lengths = {"targets": seq_len}
  converter = seqio.DecoderFeatureConverter(pack=pack, bos_id=bos_id)
  num_epochs = None if repeat else 1
  if shuffle_buffer is None:
    ds = seqio.get_dataset(task_or_mixture_name, task_feature_lengths=lengths,
                           feature_converter=converter, dataset_split=split, shuffle=shuffle,
                           num_epochs=num_epochs, shard_info=shard_info, seed=seed,
                           verbose=False)
  else:
    # seqio.get_dataset has no buffer-size argument; this is its body with one.
    provider = _provider(task_or_mixture_name)
    if not isinstance(provider, seqio.Task):
      raise ValueError(f"shuffle_buffer applies to a Task, not the mixture {provider.name!r}; "
                       "set the buffer size on its tasks")
    if shuffle_buffer < 1:
      raise ValueError(f"config.data.shuffle_buffer={shuffle_buffer} must be >= 1")
    ds = provider.get_dataset(lengths, split=split, shuffle=shuffle,
                              shuffle_buffer_size=shuffle_buffer, seed=seed,
                              shard_info=shard_info, num_epochs=num_epochs)
    ds = converter(ds, task_feature_lengths=lengths)
  ds = ds.map(lambda ex: _model_features(ex, pack), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=drop_remainder)
  return ds.prefetch(tf.data.AUTOTUNE)


def _provider(task_or_mixture_name: TaskOrName) -> Union[seqio.Task, seqio.Mixture]:
  if isinstance(task_or_mixture_name, str):
    return seqio.get_mixture_or_task(task_or_mixture_name)
  return task_or_mixture_name


def _reraise(error: tf.errors.OpError) -> None:
  """Turns a tf.data error caused by bad input back into the BadInputError it wraps."""
  bad = sources.find_bad_input_error(str(error))
  if bad is not None:
    raise sources.BadInputError(str(bad)) from None
  raise error


class _NumpyBatches:
  """A dataset's numpy iterator that re-raises bad-input errors and is closed at exit."""

  def __init__(self, ds: tf.data.Dataset):
    self._it = ds.as_numpy_iterator()
    _LIVE.add(self)

  def __iter__(self) -> "_NumpyBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise StopIteration
    try:
      return next(self._it)
    except tf.errors.OpError as e:
      _reraise(e)

  def close(self) -> None:
    self._it = None


_LIVE: "weakref.WeakSet[_NumpyBatches]" = weakref.WeakSet()


@atexit.register
def _close_iterators() -> None:
  # A tf.data iterator over a Python generator (our file sources) that is destroyed during
  # interpreter shutdown can deadlock the process (TF issue #22632: the generator's finalizer
  # needs Python). Destroy the iterators while Python is still fully alive.
  for batches in list(_LIVE):
    batches.close()
  gc.collect()


class BatchIterator:
  """Yields numpy batches (dicts with BATCH_KEYS, [B_host, seq_len]) and knows how far it got.

  Its state, {"batches_consumed": k}, is saved with the train state; BatchIterator.from_state
  then resumes with batch k of the same sequence.
  """

  def __init__(self, dataset_fn: Callable[[], tf.data.Dataset], start_batch: int = 0):
    if start_batch < 0:
      raise ValueError(f"start_batch={start_batch} must be >= 0")
    self._dataset_fn = dataset_fn
    self._consumed = start_batch
    ds = dataset_fn()
    if start_batch:
      ds = ds.skip(start_batch)
    self._batches = _NumpyBatches(ds)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self._consumed += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"batches_consumed": self._consumed}

  @classmethod
  def from_state(cls, dataset_fn: Callable[[], tf.data.Dataset],
                 state: Mapping[str, Any]) -> "BatchIterator":
    if "batches_consumed" not in state:
      raise ValueError(f"data iterator state {dict(state)} has no 'batches_consumed'; was it "
                       "saved by BatchIterator.get_state()?")
    return cls(dataset_fn, start_batch=int(state["batches_consumed"]))


def iterate_eval(
    task_or_mixture_name: TaskOrName,
    split: str,
    seq_len: int,
    global_batch_size: int,
    *,
    bos_id: int,
    shard_id: Optional[int] = None,
    num_shards: Optional[int] = None,
    pack: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over this host's share of a split, in full-size batches.

  The last partial batch is padded with all-zero rows (loss_weights 0), so every batch has the
  shape [global_batch_size / num_shards, seq_len] and needs no recompilation. Hosts may get
  different numbers of batches; multi-host callers must agree on a count.
  """
  ds = get_dataset(task_or_mixture_name, split, seq_len, global_batch_size, bos_id=bos_id,
                   seed=None, shuffle=False, repeat=False, shard_id=shard_id,
                   num_shards=num_shards, pack=pack, drop_remainder=False)
  _, num_shards, _ = _shard_info(shard_id, num_shards)
  rows = host_batch_size(global_batch_size, num_shards)
  for batch in _NumpyBatches(ds):
    n = batch["targets"].shape[0]
    if n < rows:
      batch = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch


def packed_pass(
    task_name: TaskOrName,
    split: str,
    seq_len: int,
    *,
    bos_id: int,
    seed: Optional[int],
    pack: bool = True,
) -> dict[str, int]:
  """One shuffled pass over a task's split as training packs it (all hosts together):
  {"rows": rows of seq_len tokens it fills, "tokens": loss-bearing tokens in them}.

  Packing leaves the end of a row empty when the next document does not fit, so a pass takes
  more rows than tokens / seq_len (on the built-in corpus at 256 tokens about 1.16x for raw
  stories and 1.4-1.5x for thought-augmented ones). Training budgets in passes divide by the
  rows, so that "E epochs" means E real passes whatever the layout. Tasks only: a mixture's pass
  is set by its rates, not by its data.
  """
  provider = _provider(task_name)
  if not isinstance(provider, seqio.Task):
    raise ValueError(f"a packed pass is over a Task, not the mixture {provider.name!r}")
  ds = get_dataset(provider, split, seq_len, 1, bos_id=bos_id, seed=seed, shuffle=True,
                   repeat=False, shard_id=0, num_shards=1, pack=pack, drop_remainder=False)
  ds = ds.map(lambda b: tf.reduce_sum(tf.cast(b["loss_weights"] > 0, tf.int64)))
  try:
    rows, tokens = ds.reduce((np.int64(0), np.int64(0)), lambda acc, n: (acc[0] + 1, acc[1] + n))
  except tf.errors.OpError as e:
    _reraise(e)
  return {"rows": int(rows), "tokens": int(tokens)}


def count_rows(task_name: TaskOrName, split: str, seq_len: int, **kwargs) -> int:
  """Rows of seq_len tokens one shuffled pass over a task's split fills (see packed_pass)."""
  return packed_pass(task_name, split, seq_len, **kwargs)["rows"]


def count_tokens(
    task_or_mixture_name: TaskOrName,
    split: str,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
) -> int:
  """Target tokens (EOS included, padding excluded) in one pass over a split.

  Packing and splitting of long documents neither add nor drop tokens, so this is the number of
  loss-bearing tokens one epoch yields at any seq_len. A mixture counts each of its tasks once.
  """
  provider = _provider(task_or_mixture_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  info = seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None
  total = 0
  for task in tasks:
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1, shard_info=info)
    sizes = ds.map(lambda ex: tf.size(ex["targets"], out_type=tf.int64))
    try:
      total += int(sizes.reduce(np.int64(0), lambda a, b: a + b))
    except tf.errors.OpError as e:
      _reraise(e)
  return total
