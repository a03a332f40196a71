"""Cached teacher outputs served to training: a :class:`~kdjax.data.Loader` transform.

A batch's cached outputs are a function of its example ids, its epoch and
the run's seed (which of the K views each example draws), so a transform
adds them to the Loader's batch, after which any other transform (e.g. a
retokenizer) runs. The Loader's position stays the whole input state:
``state()`` / ``restore()`` resume exactly, whatever the process or worker
count.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable, Mapping

import numpy as np

from kdjax import batch as batch_lib
from kdjax.data import views as view_lib
from kdjax.data.cache.draw import choose_views, view_images
from kdjax.data.cache.format import check_view
from kdjax.data.cache.read import IdIndex, TeacherCache
from kdjax.data.loader import Loader
from kdjax.errors import ConfigError

VIEW_MODES = ("consistent", "independent")
_INT32 = np.iinfo(np.int32)


class CachedOutputs:
  """Loader transform adding the cached teacher outputs of each example's drawn view.

  Reads ``id`` and ``epoch``; adds ``teacher_logits`` float32
  ``(B, *output_shape)`` (or ``teacher_topk_logp`` / ``teacher_topk_idx``
  for a top-k cache, see :meth:`TeacherCache.outputs`) and ``view_index``
  int32 ``(B,)``. ``view_mode="consistent"``: ``inputs`` becomes view
  ``view_index`` of each example (re-read from ``ds``), the input the
  teacher saw. ``"independent"``: the Loader's own student view stays and
  its ``teacher_inputs`` go (the teacher's output is the cached view's).
  ``seed`` and ``view_mode`` are the Loader's, whose view is the cache's.
  """

  def __init__(self, ds, cache: TeacherCache, seed: int = 0, view_mode: str = "consistent"):
    check_view(cache.view)
    if view_mode not in VIEW_MODES:
      raise ConfigError(f"view_mode={view_mode!r}; expected one of {VIEW_MODES}")
    ids = np.asarray(ds.ids, np.int64)
    if len(ids) and (ids.min() < _INT32.min or ids.max() > _INT32.max):
      raise ConfigError(
        f"teacher cache: example ids span [{ids.min()}, {ids.max()}] but batches carry them as int32; "
        f"renumber the dataset's ids to fit"
      )
    cache.rows(ids)  # every example must be cached
    self.ds, self.cache, self.seed, self.view_mode = ds, cache, int(seed), view_mode
    self._index: IdIndex | None = None  # dataset row of each id, built on first use

  def __getstate__(self) -> dict:
    return dict(self.__dict__, _index=None)  # each Grain worker builds its own (not shipped to it)

  def _dataset_rows(self, ids: np.ndarray) -> np.ndarray:
    if self._index is None:
      self._index = IdIndex(np.asarray(self.ds.ids, np.int64))
    return self._index.rows(ids, "the training set")

  def views(self, images: np.ndarray, ids: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    """The Loader's ``views`` hook: inputs, cached outputs and ``view_index`` from the examples the Loader
    read, so each example is read and augmented once (:class:`CachedLoader` uses it)."""
    ids64 = np.asarray(ids, np.int64)
    k = choose_views(self.seed, ids64, np.full(len(ids64), epoch, np.int64), self.cache.num_views)
    if self.view_mode == "consistent":
      inputs = view_images(self.cache.view, images, ids, self.cache.view_seed, k)
    else:
      key = view_lib.view_key(self.seed, ids, epoch, view_lib.STREAM_STUDENT)
      inputs = view_lib.augment(self.cache.view, images, key)
    return {batch_lib.INPUTS: inputs, **self.cache.outputs(ids64, k), batch_lib.VIEW_INDEX: k.astype(np.int32)}

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with the cached teacher outputs and ``view_index`` (and the cached view as ``inputs``)."""
    ids = np.asarray(batch[batch_lib.ID], np.int64)
    k = choose_views(self.seed, ids, np.asarray(batch[batch_lib.EPOCH], np.int64), self.cache.num_views)
    inputs = batch[batch_lib.INPUTS]
    if self.view_mode == "consistent":
      images, _, ids = self.ds.take(self._dataset_rows(ids))
      inputs = view_images(self.cache.view, images, ids, self.cache.view_seed, k)
    rest = {key: v for key, v in batch.items() if key not in (batch_lib.INPUTS, batch_lib.TEACHER_INPUTS)}
    return {batch_lib.INPUTS: inputs, **self.cache.outputs(ids, k), batch_lib.VIEW_INDEX: k.astype(np.int32), **rest}


@dataclasses.dataclass(frozen=True)
class Chain:
  """Batch transforms applied in order (picklable when each of them is)."""

  transforms: tuple[Callable[[Any], Any], ...]

  def __call__(self, batch):
    for transform in self.transforms:
      batch = transform(batch)
    return batch


def chain(*transforms: Callable | None) -> Callable | None:
  """One transform applying ``transforms`` in order, ``None`` entries skipped (``None`` when none is left)."""
  present = tuple(t for t in transforms if t is not None)
  if len(present) <= 1:
    return present[0] if present else None
  return Chain(present)


class CachedLoader(Loader):
  """A :class:`Loader` over ``ds`` in the cache's view whose transform is :class:`CachedOutputs`.

  Each batch's examples are read once and given their cached view (or, with
  ``view_mode="independent"``, the Loader's student view) and the cached
  teacher outputs (the Loader's ``views`` hook), then ``transform``, if any; order, sharding over processes, the Grain
  pipeline and ``state()`` / ``restore()`` are the Loader's own.
  """

  def __init__(
    self,
    ds,
    cache: TeacherCache,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    view_mode: str = "consistent",
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int | None = None,
    transform: Callable | None = None,
  ):
    self.outputs = CachedOutputs(ds, cache, seed=seed, view_mode=view_mode)
    super().__init__(
      ds,
      batch_size,
      seed=seed,
      shuffle=shuffle,
      drop_remainder=drop_remainder,
      view=cache.view,
      view_mode=view_mode,
      process_index=process_index,
      process_count=process_count,
      worker_count=worker_count,
      transform=transform,
      views=self.outputs.views,
    )

  @property
  def cache(self) -> TeacherCache:
    return self.outputs.cache
