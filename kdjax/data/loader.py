"""Deterministic, resumable, process-sharded batches on a Grain pipeline.

A dataset is any source with ``take(indices) -> (images, labels, ids)``,
``ids`` and ``len``: an in-memory :class:`~kdjax.data.tfds.ArrayDataset` or a
:class:`~kdjax.data.tfds.RecordSource` that reads ArrayRecord files by index
(each process then reads only the records of its own rows, plus their mixing
partners).

Order: epoch ``e`` visits ``perm_e = default_rng([seed, e]).permutation(N)``
(identity when ``shuffle=False``); global batch ``k`` is
``perm_e[k*B:(k+1)*B]``.  With ``P`` processes, process ``p`` yields rows
``[p*B/P, (p+1)*B/P)`` of every global batch, so concatenating the processes'
batches gives the 1-process batch exactly.  Views are keyed by
``(seed, id, epoch, stream)`` (see ``kdjax.data.views``), so they too are
independent of the process count.

Mixup/cutmix partner: row ``r`` of global batch ``(epoch, step)`` is mixed
with row ``q[r]`` where ``q = default_rng([seed, epoch, step, 0x6D6978]).permutation(B)``
(a process computes its partners' views itself: all processes hold the data).

Iterating a ``Loader`` runs forever, epoch after epoch, through a Grain
pipeline whose element ``k`` is global step ``k`` (epoch ``k // steps_per_epoch``)
made by :meth:`Loader.batch`, with ``worker_count`` worker processes
(``grain``'s ``mp_prefetch``) or, with 0, one prefetch thread.  Batches are a
pure function of their index, so ``state()`` (the position of the next batch
the caller takes) restored by ``restore(state)`` continues with exactly the
batch an uninterrupted run would have seen, whatever the worker count.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any
from collections.abc import Iterator, Mapping

import numpy as np

from kdjax import batch as batch_keys
from kdjax.data import views as view_lib
from kdjax.data.tfds import ArrayDataset
from kdjax.errors import ConfigError

_MIX_TAG = 0x6D6978  # "mix"
_UNBOUNDED = 1 << 50  # steps in the pipeline's index range (it is lazy)


def default_workers(ds) -> int:
  """Input worker processes sized for the machine: none for a split held in memory (its
  vectorised views beat the cost of shipping batches between processes), else up to 8,
  leaving a core for the training loop."""
  if isinstance(ds, ArrayDataset):
    return 0
  return max(0, min(8, (os.cpu_count() or 1) - 1))


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, process_count={process_count})")
  return int(process_index), int(process_count)


class Loader:
  """Training batches (this process's slice of each global batch) as NumPy dicts.

  Keys (:mod:`kdjax.batch`): ``inputs`` float32 (student view), ``label`` int32 (-1 = unlabelled),
  ``id`` int32, ``epoch`` int32; ``teacher_inputs`` in ``view_mode="independent"``; ``segment_ids`` and
  ``positions`` int32 (B, L) for packed token rows (``kdjax prepare text --pack``);
  ``label_b`` int32 and ``mix_lambda`` float32 when mixing
  (``image = λ·x + (1−λ)·x_b``); ``mask`` bool when ``drop_remainder=False``
  (the last batch is padded by wrapping to the start of the epoch's order).
  ``worker_count``: Grain worker processes making batches ahead (``None``:
  :func:`default_workers`). ``transform``: a picklable ``batch → batch``
  applied last to every batch, e.g. :class:`kdjax.data.retokenize.Retokenizer`.
  ``views``: a picklable ``(images, ids, epoch) → dict`` that makes the
  batch's inputs from the examples it reads, in place of the Loader's own
  augmentations (a teacher-output cache serves each example's cached view
  with the teacher's outputs on it: :class:`kdjax.data.cache.CachedOutputs`).
  """

  def __init__(
    self,
    ds,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    view: view_lib.ViewConfig | None = None,
    view_mode: str = "consistent",
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int | None = None,
    transform=None,
    views=None,
  ):
    self.ds = ds
    self.transform, self.views = transform, views
    self.worker_count = default_workers(ds) if worker_count is None or worker_count < 0 else int(worker_count)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.drop_remainder = bool(drop_remainder)
    self.view = view if view is not None else view_lib.ViewConfig()
    if view_mode not in ("consistent", "independent"):
      raise ConfigError(f"view_mode={view_mode!r}; expected 'consistent' or 'independent'")
    self.view_mode = view_mode
    if self.seed < 0:
      raise ConfigError(f"seed={seed}: must be >= 0")
    self.process_index, self.process_count = _process(process_index, process_count)
    if self.batch_size <= 0 or self.batch_size % self.process_count:
      raise ConfigError(f"batch_size={batch_size} must be a positive multiple of process_count={self.process_count}")
    self.local_batch_size = self.batch_size // self.process_count
    n = len(ds)
    self.steps_per_epoch = n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)
    if self.steps_per_epoch == 0:
      raise ConfigError(f"batch_size={batch_size} is larger than the dataset ({n} examples) with drop_remainder=True")
    self._epoch, self._step = 0, 0
    self._order_cache: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return self.steps_per_epoch

  # -- position
  def state(self, behind: int = 0) -> dict[str, int]:
    """The position: the next batch to draw, or ``behind`` batches earlier (a loop holding that many drawn but
    untrained batches records where training really is)."""
    k = self._epoch * self.steps_per_epoch + self._step - behind
    return {"epoch": k // self.steps_per_epoch, "step_in_epoch": k % self.steps_per_epoch, "seed": self.seed}

  def restore(self, state: Mapping[str, Any]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ConfigError(f"loader state has seed={state['seed']}, this loader seed={self.seed}")
    epoch, step = int(state[batch_keys.EPOCH]), int(state["step_in_epoch"])
    if not 0 <= step <= self.steps_per_epoch:
      raise ConfigError(f"loader state step_in_epoch={step} not in [0, {self.steps_per_epoch}]")
    self._epoch, self._step = epoch, step
    self._normalise_position()

  def _normalise_position(self):
    if self._step >= self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0

  # -- order
  def order(self, epoch: int) -> np.ndarray:
    """The global visiting order of epoch ``epoch`` (a pure function of (seed, epoch))."""
    if self._order_cache is not None and self._order_cache[0] == epoch:
      return self._order_cache[1]
    n = len(self.ds)
    o = np.random.default_rng([self.seed, int(epoch)]).permutation(n) if self.shuffle else np.arange(n)
    self._order_cache = (epoch, o)
    return o

  def global_indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    o = self.order(epoch)
    b = self.batch_size
    idx = o[step * b : (step + 1) * b]
    valid = np.ones(b, bool)
    if len(idx) < b:
      valid[len(idx) :] = False
      idx = np.concatenate([idx, np.resize(o, b - len(idx))])
    return idx, valid

  # -- batches
  def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of ``epoch`` for this process (does not move the position)."""
    gidx, gvalid = self.global_indices(epoch, step)
    lo = self.process_index * self.local_batch_size
    rows = np.arange(lo, lo + self.local_batch_size)
    idx = gidx[rows]
    ds, cfg = self.ds, self.view
    images, labels, ids = ds.take(idx)
    extras = ds.take_extras(idx) if getattr(ds, "extra_keys", ()) else {}  # packed rows: segment ids, positions
    if self.views is not None:
      out = {**self.views(images, ids, epoch), "label": labels, "id": ids.astype(np.int32), **extras}
      return self._finish(out, idx, epoch, gvalid[rows])
    out = {
      batch_keys.INPUTS: view_lib.augment(
        cfg, images, view_lib.view_key(self.seed, ids, epoch, view_lib.STREAM_STUDENT)
      )
    }
    teacher = None
    if self.view_mode == "independent":
      teacher = view_lib.augment(cfg, images, view_lib.view_key(self.seed, ids, epoch, view_lib.STREAM_TEACHER))
    if cfg.mixes:
      q = np.random.default_rng([self.seed, int(epoch), int(step), _MIX_TAG]).permutation(self.batch_size)
      pimages, plabels, pids = ds.take(gidx[q[rows]])
      w, lam = view_lib.mix_weights(
        cfg, view_lib.view_key(self.seed, ids, epoch, view_lib.STREAM_MIX), out[batch_keys.INPUTS].shape[1:]
      )
      xb = view_lib.augment(cfg, pimages, view_lib.view_key(self.seed, pids, epoch, view_lib.STREAM_STUDENT))
      out[batch_keys.INPUTS] = view_lib.apply_mix(w, out[batch_keys.INPUTS], xb)
      if teacher is not None:
        tb = view_lib.augment(cfg, pimages, view_lib.view_key(self.seed, pids, epoch, view_lib.STREAM_TEACHER))
        teacher = view_lib.apply_mix(w, teacher, tb)
      out[batch_keys.LABEL_B] = plabels
      out[batch_keys.MIX_LAMBDA] = lam
    if teacher is not None:
      out[batch_keys.TEACHER_INPUTS] = teacher
    out[batch_keys.LABEL] = labels
    out[batch_keys.ID] = ids.astype(np.int32)
    return self._finish({**out, **extras}, idx, epoch, gvalid[rows])

  def _finish(self, out: dict, idx: np.ndarray, epoch: int, valid: np.ndarray) -> dict[str, np.ndarray]:
    out[batch_keys.EPOCH] = np.full(len(idx), epoch, np.int32)
    if not self.drop_remainder:
      out[batch_keys.MASK] = valid
    return out if self.transform is None else self.transform(out)

  def epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    for step in range(self.steps_per_epoch):
      yield self.batch(epoch, step)

  def _global_step_batch(self, k: int) -> dict[str, np.ndarray]:
    return self.batch(k // self.steps_per_epoch, k % self.steps_per_epoch)

  def pipeline(self, start: int = 0):
    """The Grain pipeline of this process's batches from global step ``start`` on (unbounded)."""
    import grain

    ds = grain.MapDataset.range(start, start + _UNBOUNDED).map(self._global_step_batch)
    # One thread makes batches ahead (two in flight) in this process, or in each worker process.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if not self.worker_count:
      return ds
    _absl_flags_defaults()  # grain's workers read absl flags, which a program without absl never parses
    return ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=self.worker_count, per_worker_buffer_size=2),
      worker_init_fn=_die_with_parent,
    )

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    self._normalise_position()
    it = iter(self.pipeline(self._epoch * self.steps_per_epoch + self._step))
    try:
      for b in it:
        self._step += 1
        self._normalise_position()
        yield b
    finally:
      close = getattr(it, "close", None)
      if close is not None:
        close()  # stops the worker processes now, not whenever the iterator is collected

  def __next__(self):  # convenience: next(loader)
    self._normalise_position()
    b = self.batch(self._epoch, self._step)
    self._step += 1
    self._normalise_position()
    return b


def eval_batches(
  ds,
  batch_size: int,
  view: view_lib.ViewConfig | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Un-augmented (normalised) batches in dataset order, every batch the same shape.

  The last global batch is padded by repeating example 0; ``mask`` (bool, always
  present so the pytree never changes) is False on padding.  Multi-process:
  this process's contiguous slice of each global batch.
  """
  cfg = view if view is not None else view_lib.ViewConfig()
  pi, pc = _process(process_index, process_count)
  if batch_size <= 0 or batch_size % pc:
    raise ConfigError(f"batch_size={batch_size} must be a positive multiple of process_count={pc}")
  lb = batch_size // pc
  n = len(ds)
  for start in range(0, n, batch_size):
    g = np.arange(start, start + batch_size)[pi * lb : (pi + 1) * lb]
    mask = g < n
    idx = np.where(mask, g, 0)
    images, labels, ids = ds.take(idx)
    yield {
      batch_keys.INPUTS: view_lib.normalize(cfg, images),
      "label": labels,
      "id": ids.astype(np.int32),
      "mask": mask,
    }


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
  """Assemble each process-local array into a global ``jax.Array``.

  ``sharding``: one ``jax.sharding.Sharding`` for all entries (e.g.
  ``NamedSharding(mesh, P("data"))``) or a dict name -> sharding.
  """
  import jax

  out = {}
  for k, v in batch.items():
    s = sharding[k] if isinstance(sharding, Mapping) else sharding
    out[k] = jax.make_array_from_process_local_data(s, np.asarray(v))
  return out


def _die_with_parent(worker_index: int, worker_count: int) -> None:
  """Grain worker set-up: on Linux the kernel kills the worker when the training process dies, so a
  SIGKILLed run leaves no orphaned input workers (elsewhere Grain's own shutdown is all there is)."""
  del worker_index, worker_count
  if sys.platform.startswith("linux"):
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the line above
      os._exit(1)


def _absl_flags_defaults() -> None:
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_loader(
  name: str,
  split: str,
  batch_size: int,
  seed: int = 0,
  data_dir: str | None = None,
  view: view_lib.ViewConfig | None = None,
  view_mode: str = "consistent",
  shuffle: bool = True,
  drop_remainder: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
  download: bool = False,
  worker_count: int | None = None,
) -> Loader:
  """A :class:`Loader` over TFDS split ``name/split``: held in memory for small datasets, read
  record by record (:class:`~kdjax.data.tfds.RecordSource`) for ImageNet-sized ones."""
  from kdjax.data.tfds import default_view, open_split

  view = view if view is not None else default_view(name, data_dir=data_dir)
  ds = open_split(name, split, data_dir, download=download)
  return Loader(
    ds,
    batch_size,
    seed=seed,
    shuffle=shuffle,
    drop_remainder=drop_remainder,
    view=view,
    view_mode=view_mode,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
  )
