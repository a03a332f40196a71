"""Streaming (tf.data) loader for datasets too large for host memory (imagenet2012).

Per process: ``tfds.split_for_jax_process(split, drop_remainder=True)``;
order: files in fixed order, then ``shuffle(buffer, seed=f(seed, epoch))``
(a pure function of (seed, epoch) for a given process count); views: TF
stateless ops seeded from ``view_key(seed, id, epoch, stream)``, the same
functions ``views.augment(kind="imagenet")`` runs eagerly.  Ids: the example's
global index in the split from its ``tfds_id`` (``<file>-NNNNN-of-MMMMM__i``
plus the shard offsets), or a 31-bit hash of ``tfds_id`` when the shard
lengths are unknown.  ``restore`` skips examples (before decoding) to the
saved (epoch, step).  Mixup partners are chosen within the process-local
batch (unlike ``Loader``, so results depend on the process count when mixing).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from kdjax import batch as B
from kdjax.data import views as V
from kdjax.data.loader import _process
from kdjax.data.tfds import get_builder


class StreamLoader:
  def __init__(self, name: str, split: str, batch_size: int, seed: int = 0, data_dir: str | None = None,
               view: V.ViewConfig | None = None, view_mode: str = "consistent", shuffle: bool = True,
               train: bool = True, shuffle_buffer: int = 10_000, process_index: int | None = None,
               process_count: int | None = None, download: bool = False):
    import tensorflow_datasets as tfds

    self.name, self.split = name, split
    self.view = view if view is not None else V.ViewConfig(kind="imagenet")
    if view_mode not in ("consistent", "independent"):
      raise ValueError(f"view_mode={view_mode!r}; expected 'consistent' or 'independent'")
    self.view_mode, self.seed, self.shuffle, self.train = view_mode, int(seed), shuffle, train
    self.shuffle_buffer = shuffle_buffer
    self.process_index, self.process_count = _process(process_index, process_count)
    if batch_size % self.process_count:
      raise ValueError(f"batch_size={batch_size} must be a multiple of process_count={self.process_count}")
    self.batch_size, self.local_batch_size = batch_size, batch_size // self.process_count
    self.builder = get_builder(name, data_dir, download=download)
    self.local_split = tfds.split_for_jax_process(
        split, process_index=self.process_index, process_count=self.process_count, drop_remainder=True)
    try:
      n = self.builder.info.splits[self.local_split].num_examples
    except Exception:
      n = 0
    self.num_local_examples = int(n)
    self.steps_per_epoch = max(n // self.local_batch_size, 0)
    try:
      lengths = list(self.builder.info.splits[split.split("[")[0]].shard_lengths)
    except Exception:
      lengths = []
    self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else None
    self._epoch, self._step = 0, 0

  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "step_in_epoch": self._step, "seed": self.seed}

  def restore(self, state: Mapping[str, Any]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"loader state has seed={state['seed']}, this loader seed={self.seed}")
    self._epoch, self._step = int(state["epoch"]), int(state["step_in_epoch"])

  def _ids(self, tfds_id):
    import tensorflow as tf

    if self._offsets is None:
      return tf.strings.to_hash_bucket_fast(tfds_id, 2**31 - 1)
    parts = tf.strings.split(tfds_id, "__")
    index = tf.strings.to_number(parts[-1], tf.int64)
    shard = tf.strings.to_number(tf.strings.regex_replace(parts[0], r".*-(\d+)-of-\d+$", r"\1"), tf.int64)
    return tf.gather(tf.constant(self._offsets), shard) + index

  def dataset(self, epoch: int, skip_batches: int = 0):
    """The tf.data pipeline of one epoch for this process."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    cfg, seed = self.view, self.seed
    ds = self.builder.as_dataset(
        split=self.local_split, shuffle_files=False,
        read_config=tfds.ReadConfig(add_tfds_id=True),
        decoders={"image": tfds.decode.SkipDecoding()})
    if self.shuffle and self.train:
      s = int(V.view_key(seed, 0, epoch, 7) & np.uint64(2**62 - 1))  # a 62-bit seed
      ds = ds.shuffle(self.shuffle_buffer, seed=s, reshuffle_each_iteration=False)
    if skip_batches:
      ds = ds.skip(skip_batches * self.local_batch_size)
    image_feature = self.builder.info.features["image"]

    def keys(ids, stream):
      k = V.view_key(seed, ids, epoch, stream)
      return np.stack([(k >> np.uint64(32)).astype(np.int64), (k & np.uint64(0xFFFFFFFF)).astype(np.int64)], -1)

    def one(ex):
      ex_id = self._ids(ex["tfds_id"])
      image = image_feature.decode_example(ex["image"])
      out = {"label": tf.cast(ex["label"], tf.int32), "id": tf.cast(ex_id, tf.int32),
             "epoch": tf.constant(epoch, tf.int32)}
      if self.train:
        k = tf.numpy_function(lambda i: keys(i, V.STREAM_STUDENT), [ex_id], tf.int64, stateful=False)
        k.set_shape([2])
        out[B.INPUTS] = V.tf_train_image(image, k, cfg)
        if self.view_mode == "independent":
          kt = tf.numpy_function(lambda i: keys(i, V.STREAM_TEACHER), [ex_id], tf.int64, stateful=False)
          kt.set_shape([2])
          out[B.TEACHER_INPUTS] = V.tf_train_image(image, kt, cfg)
      else:
        out[B.INPUTS] = V.tf_eval_image(image, cfg)
      return out

    ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch_size, drop_remainder=self.train)
    return ds.prefetch(tf.data.AUTOTUNE)

  def epoch_batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    import tensorflow_datasets as tfds

    for step, b in enumerate(tfds.as_numpy(self.dataset(epoch, skip_batches)), start=skip_batches):
      if self.view.mixes and self.train:
        b = self._mix(b, epoch, step)
      yield b

  def _mix(self, b, epoch, step):
    ids = b["id"]
    q = np.random.default_rng([self.seed, epoch, step, self.process_index, 0x6D6978]).permutation(len(ids))
    w, lam = V.mix_weights(self.view, V.view_key(self.seed, ids, epoch, V.STREAM_MIX), b[B.INPUTS].shape[1:])
    b[B.INPUTS] = V.apply_mix(w, b[B.INPUTS], b[B.INPUTS][q])
    if B.TEACHER_INPUTS in b:
      b[B.TEACHER_INPUTS] = V.apply_mix(w, b[B.TEACHER_INPUTS], b[B.TEACHER_INPUTS][q])
    b["label_b"], b["mix_lambda"] = b["label"][q], lam
    return b

  def __iter__(self):
    while True:
      got = False
      for b in self.epoch_batches(self._epoch, self._step):
        got = True
        self._step += 1
        yield b
      if not got and self._step == 0:
        raise ValueError(f"{self.name}/{self.split}: no batches for this process")
      self._epoch, self._step = self._epoch + 1, 0


def make_loader(name: str, split: str, batch_size: int, seed: int = 0, data_dir: str | None = None,
                view: V.ViewConfig | None = None, view_mode: str = "consistent", shuffle: bool = True,
                drop_remainder: bool = True, process_index: int | None = None,
                process_count: int | None = None, download: bool = False):
  """``Loader(load_arrays(...))`` for small datasets, ``StreamLoader`` for imagenet2012."""
  from kdjax.data.loader import Loader
  from kdjax.data.tfds import default_view, is_streaming, load_arrays

  view = view if view is not None else default_view(name)
  if is_streaming(name):
    return StreamLoader(name, split, batch_size, seed=seed, data_dir=data_dir, view=view,
                        view_mode=view_mode, shuffle=shuffle, process_index=process_index,
                        process_count=process_count, download=download)
  ds = load_arrays(name, split, data_dir, download=download)
  return Loader(ds, batch_size, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder, view=view,
                view_mode=view_mode, process_index=process_index, process_count=process_count)
