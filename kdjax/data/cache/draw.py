"""Which views the cache holds and which one a training epoch reads.

View ``k`` of example ``id`` is the view the :class:`~kdjax.data.Loader`
would make at *epoch* ``k`` with seed ``view_seed``; in epoch ``e`` each
example draws its index ``k`` from ``(seed, id, e)`` alone, so every process
and every resumed run draws the same.
"""

from __future__ import annotations

import numpy as np

from kdjax.data import views

STREAM_CACHE = 3  # view-key stream of the per-epoch choice among the K views


def view_images(
  view: views.ViewConfig, images: np.ndarray, ids: np.ndarray, view_seed: int, view_index: np.ndarray | int
) -> np.ndarray:
  """View ``view_index`` of each example: ``(B, ...)`` raw → ``(B, ...)`` float32.

  Equal to the :class:`Loader`'s student view at epoch ``view_index`` with
  seed ``view_seed``.
  """
  return views.augment(view, images, views.view_key(view_seed, ids, view_index, views.STREAM_STUDENT))


def choose_views(seed: int, ids: np.ndarray, epoch: int | np.ndarray, num_views: int) -> np.ndarray:
  """Which cached view each example uses in ``epoch`` (a scalar or one per example): int64 ``(B,)`` in [0, K)."""
  if num_views == 1:
    return np.zeros(len(ids), np.int64)
  return views.randint(views.view_key(seed, ids, epoch, STREAM_CACHE), 0, num_views)
