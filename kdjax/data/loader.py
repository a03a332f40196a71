"""Deterministic, resumable, process-sharded batches from an in-memory dataset.

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

Iterating a ``Loader`` runs forever, epoch after epoch; ``state()`` is the
position of the next batch and ``restore(state)`` returns to it.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np

from kdjax import batch as B
from kdjax.data import views as V
from kdjax.data.tfds import ArrayDataset

_MIX_TAG = 0x6D6978  # "mix"


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  return int(process_index), int(process_count)


class Loader:
  """Training batches (this process's slice of each global batch) as NumPy dicts.

  Keys (:mod:`kdjax.batch`): ``inputs`` float32 (student view), ``label`` int32 (-1 = unlabelled),
  ``id`` int32, ``epoch`` int32; ``teacher_inputs`` in ``view_mode="independent"``;
  ``label_b`` int32 and ``mix_lambda`` float32 when mixing
  (``image = λ·x + (1−λ)·x_b``); ``mask`` bool when ``drop_remainder=False``
  (the last batch is padded by wrapping to the start of the epoch's order).
  """

  def __init__(self, ds: ArrayDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = True, view: V.ViewConfig | None = None,
               view_mode: str = "consistent", process_index: int | None = None,
               process_count: int | None = None):
    self.ds = ds
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.drop_remainder = bool(drop_remainder)
    self.view = view if view is not None else V.ViewConfig()
    if view_mode not in ("consistent", "independent"):
      raise ValueError(f"view_mode={view_mode!r}; expected 'consistent' or 'independent'")
    self.view_mode = view_mode
    if self.seed < 0:
      raise ValueError(f"seed={seed}: must be >= 0")
    self.process_index, self.process_count = _process(process_index, process_count)
    if self.batch_size <= 0 or self.batch_size % self.process_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={self.process_count}")
    self.local_batch_size = self.batch_size // self.process_count
    n = len(ds)
    self.steps_per_epoch = n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} examples) with drop_remainder=True")
    self._epoch, self._step = 0, 0
    self._order_cache: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return self.steps_per_epoch

  # -- position
  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "step_in_epoch": self._step, "seed": self.seed}

  def restore(self, state: Mapping[str, Any]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"loader state has seed={state['seed']}, this loader seed={self.seed}")
    epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    if not 0 <= step <= self.steps_per_epoch:
      raise ValueError(f"loader state step_in_epoch={step} not in [0, {self.steps_per_epoch}]")
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
    idx = o[step * b:(step + 1) * b]
    valid = np.ones(b, bool)
    if len(idx) < b:
      valid[len(idx):] = False
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
    ids = ds.ids[idx]
    images = ds.images[idx]
    out = {B.INPUTS: V.augment(cfg, images, V.view_key(self.seed, ids, epoch, V.STREAM_STUDENT))}
    teacher = None
    if self.view_mode == "independent":
      teacher = V.augment(cfg, images, V.view_key(self.seed, ids, epoch, V.STREAM_TEACHER))
    if cfg.mixes:
      q = np.random.default_rng([self.seed, int(epoch), int(step), _MIX_TAG]).permutation(self.batch_size)
      pidx = gidx[q[rows]]
      pids, pimages = ds.ids[pidx], ds.images[pidx]
      w, lam = V.mix_weights(cfg, V.view_key(self.seed, ids, epoch, V.STREAM_MIX), out[B.INPUTS].shape[1:])
      xb = V.augment(cfg, pimages, V.view_key(self.seed, pids, epoch, V.STREAM_STUDENT))
      out[B.INPUTS] = V.apply_mix(w, out[B.INPUTS], xb)
      if teacher is not None:
        tb = V.augment(cfg, pimages, V.view_key(self.seed, pids, epoch, V.STREAM_TEACHER))
        teacher = V.apply_mix(w, teacher, tb)
      out["label_b"] = ds.labels[pidx].astype(np.int32)
      out["mix_lambda"] = lam
    if teacher is not None:
      out[B.TEACHER_INPUTS] = teacher
    out["label"] = ds.labels[idx].astype(np.int32)
    out["id"] = ids.astype(np.int32)
    out["epoch"] = np.full(len(idx), epoch, np.int32)
    if not self.drop_remainder:
      out["mask"] = gvalid[rows]
    return out

  def epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    for step in range(self.steps_per_epoch):
      yield self.batch(epoch, step)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    while True:
      self._normalise_position()
      b = self.batch(self._epoch, self._step)
      self._step += 1
      self._normalise_position()
      yield b

  def __next__(self):  # convenience: next(loader)
    self._normalise_position()
    b = self.batch(self._epoch, self._step)
    self._step += 1
    self._normalise_position()
    return b


def eval_batches(ds: ArrayDataset, batch_size: int, view: V.ViewConfig | None = None,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Un-augmented (normalised) batches in dataset order, every batch the same shape.

  The last global batch is padded by repeating example 0; ``mask`` (bool, always
  present so the pytree never changes) is False on padding.  Multi-process:
  this process's contiguous slice of each global batch.
  """
  cfg = view if view is not None else V.ViewConfig()
  pi, pc = _process(process_index, process_count)
  if batch_size <= 0 or batch_size % pc:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={pc}")
  lb = batch_size // pc
  n = len(ds)
  for start in range(0, n, batch_size):
    g = np.arange(start, start + batch_size)[pi * lb:(pi + 1) * lb]
    mask = g < n
    idx = np.where(mask, g, 0)
    yield {B.INPUTS: V.normalize(cfg, ds.images[idx]), "label": ds.labels[idx].astype(np.int32),
           "id": ds.ids[idx].astype(np.int32), "mask": mask}


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
