"""Loading TFDS image-classification datasets into host memory, offline-safe.

``data_dir``: the argument, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
Nothing is downloaded unless ``download=True``; the embedded datasets
(``mnist1d``, ``digits``) are generated into ``data_dir`` on first use.

Example ids: the position of the example in the split as TFDS reads it with
``shuffle_files=False`` (deterministic for a prepared dataset; for the
embedded datasets equal to the generator's order), so ids are ``0..N-1`` and
stable across runs and processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Sequence

import numpy as np


class DatasetUnavailableError(ValueError):
  """A dataset is not in ``data_dir`` and could not be prepared; the message is one line."""


def default_data_dir(data_dir: str | None = None) -> str:
  if data_dir:
    return os.path.expanduser(str(data_dir))
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _is_embedded(builder) -> bool:
  from kdjax.data.builders._base import LocalBuilder

  return isinstance(builder, LocalBuilder)


def _unavailable(name: str, data_dir: str, why: str = "") -> DatasetUnavailableError:
  manual = os.path.join(data_dir, "downloads", "manual")
  msg = (f"dataset {name!r} is not prepared in data_dir {data_dir!r}{why}; "
         f"prepare it on a machine with network (`tfds build {name} --data_dir DIR`) and copy "
         f"DIR/{name.split('/')[0]} into {data_dir!r} (or point --data_dir / TFDS_DATA_DIR at it), "
         f"or pass download=True (CLI: --data.download); for manual-download datasets put the archives in {manual!r}")
  return DatasetUnavailableError(" ".join(msg.split()))


def get_builder(name: str, data_dir: str | None = None, *, download: bool = False, prepare: bool = True):
  """A TFDS builder for ``name``, prepared (or ``DatasetUnavailableError``).

  Never touches the network unless ``download=True``: GCS lookups are off and
  ``is_prepared()`` is checked first.  Embedded datasets are always built.
  """
  import tensorflow_datasets as tfds

  import kdjax.data.builders  # noqa: F401  (registration)

  data_dir = default_data_dir(data_dir)
  # tfds logs "Variant folder … has no dataset_info.json" (absl) for a missing
  # dataset; the one-line error below says it better.
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    prepared = prepare and builder.is_prepared()
  except Exception as e:  # DatasetNotFoundError, bad config name, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DatasetUnavailableError(
        f"unknown TFDS dataset {name!r} (data_dir {data_dir!r}): {first}") from None
  finally:
    absl_log.setLevel(level)
  if not prepare or prepared:
    return builder
  if not (download or _is_embedded(builder)):
    raise _unavailable(name, data_dir)
  with _prepare_lock(data_dir, name):  # several processes (hosts of one node, sweep cells) may ask at once
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if builder.is_prepared():  # another process prepared it while this one waited
      return builder
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception as e:
      first = (str(e).strip().splitlines() or [""])[0][:200]
      raise _unavailable(name, data_dir, f" and preparing it failed ({type(e).__name__}: {first})") from None
  return builder


@contextlib.contextmanager
def _prepare_lock(data_dir: str, name: str):
  """An exclusive OS file lock per (data_dir, dataset) held while preparing it."""
  import fcntl

  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, ".kdjax-prepare-" + name.replace("/", "_").replace(":", "_") + ".lock")
  with open(path, "a") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(fh, fcntl.LOCK_UN)


@dataclasses.dataclass
class ArrayDataset:
  """A split held in host memory: ``images`` (N, ...), ``labels`` int32 (N,) (-1 = unlabelled), ``ids`` int64 (N,)."""

  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  name: str = ""
  split: str = ""

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int32)
    self.ids = np.asarray(self.ids, np.int64)
    n = len(self.images)
    if len(self.labels) != n or len(self.ids) != n:
      raise ValueError(f"ArrayDataset {self.name}/{self.split}: {n} images, "
                       f"{len(self.labels)} labels, {len(self.ids)} ids")

  def __len__(self) -> int:
    return len(self.images)


def load_arrays(name: str, split: str, data_dir: str | None = None, *, download: bool = False) -> ArrayDataset:
  """Read a whole split into NumPy (for datasets that fit in host memory)."""
  import tensorflow_datasets as tfds

  builder = get_builder(name, data_dir, download=download)
  # Chunked reads (batch_size=-1 aborts TF on tfds.testing.mock_data's generator datasets).
  ds = builder.as_dataset(split=split, batch_size=4096, shuffle_files=False)
  images, labels = [], []
  for chunk in tfds.as_numpy(ds):
    images.append(np.asarray(chunk["image"]))
    if "label" in chunk:
      labels.append(np.asarray(chunk["label"]))
  if not images:
    raise ValueError(f"{name}/{split} in {default_data_dir(data_dir)!r} has no examples")
  images = np.concatenate(images)
  n = len(images)
  labels = np.concatenate(labels) if labels else np.full(n, -1)
  return ArrayDataset(images, labels, np.arange(n, dtype=np.int64), name=name, split=split)


def concat(datasets: Sequence[ArrayDataset]) -> ArrayDataset:
  """Concatenate in-memory datasets (e.g. train + transfer).

  Ids stay unique: each dataset's ids are offset by (max id so far + 1), so
  the first keeps its ids and, for ``[train, transfer]`` with ids 0..N-1, the
  transfer examples get ids N..N+M-1.
  """
  if not datasets:
    raise ValueError("concat needs at least one ArrayDataset")
  shapes = {d.images.shape[1:] for d in datasets}
  if len(shapes) != 1:
    raise ValueError(f"concat: image shapes differ: {sorted(shapes)}")
  ids, offset = [], 0
  for d in datasets:
    ids.append(d.ids + offset)
    if len(d):
      offset = int(ids[-1].max()) + 1
  return ArrayDataset(
      np.concatenate([d.images for d in datasets]),
      np.concatenate([d.labels for d in datasets]),
      np.concatenate(ids),
      name="+".join(dict.fromkeys(d.name for d in datasets)),
      split="+".join(d.split for d in datasets),
  )


# ----------------------------------------------------------------- info
STREAMING = ("imagenet2012", "imagenet2012_subset", "imagenet_v2", "imagenet2012_real")
_SPLITS = {
    "mnist1d": ("train", "test", "transfer"),
    "imagenet2012": ("train", "validation"),
}
_STATS = {  # name -> (scale, mean, std) for default_view
    "cifar10": (255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (255.0, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": (255.0, (0.1307,), (0.3081,)),
    "fashion_mnist": (255.0, (0.2860,), (0.3530,)),
    "digits": (16.0, None, None),
    "mnist1d": (1.0, None, None),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model/engine needs to know about a dataset."""

  name: str
  num_classes: int
  image_shape: tuple[int, ...]  # one example, after views
  image_dtype: str  # stored dtype
  splits: tuple[str, ...]
  train_split: str
  eval_split: str
  streaming: bool


def is_streaming(name: str) -> bool:
  return name.split("/")[0].split(":")[0] in STREAMING


def get_info(name: str, data_dir: str | None = None, image_size: int | None = None) -> DatasetSpec:
  """Classes, image shape (after views) and splits, from the builder's code (no data needed)."""
  builder = get_builder(name, data_dir, prepare=False)
  info = builder.info
  feats = info.features
  label = feats["label"]
  shape = tuple(feats["image"].shape)
  if any(d is None for d in shape):
    s = image_size or 224
    shape = (s, s, shape[-1])
  base = name.split("/")[0].split(":")[0]
  splits = tuple(info.splits.keys()) if info.splits else _SPLITS.get(base, ("train", "test"))
  eval_split = "test" if "test" in splits else ("validation" if "validation" in splits else splits[-1])
  return DatasetSpec(name=name, num_classes=int(label.num_classes), image_shape=shape,
                     image_dtype=np.dtype(feats["image"].np_dtype).name, splits=splits,
                     train_split="train", eval_split=eval_split, streaming=is_streaming(name))


def raw_scale(name: str) -> float | None:
  """What a dataset's stored values are divided by to reach [0, 1].

  ``None`` means the dtype's default (255 for uint8, 1 for floats); digits
  stores 0..16 in uint8, so it returns 16.
  """
  base = name.split("/")[0].split(":")[0]
  scale = _STATS.get(base, (None,))[0]
  return scale if base == "digits" else None


def default_view(name: str, kind: str | None = None, **overrides):
  """A ``ViewConfig`` with the dataset's scale/mean/std (and a sensible kind)."""
  from kdjax.data.views import ViewConfig

  base = name.split("/")[0].split(":")[0]
  if kind is None:
    kind = {"cifar10": "cifar", "cifar100": "cifar"}.get(base, "imagenet" if is_streaming(base) else "none")
  kw = {}
  if base in _STATS and kind != "imagenet":
    scale, mean, std = _STATS[base]
    kw = dict(scale=scale, mean=mean, std=std)
  kw.update(overrides)
  return ViewConfig(kind=kind, **kw)
