"""TFDS datasets stored as ArrayRecord and read by index, offline-safe, without TensorFlow.

``data_dir``: the argument, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
Every dataset is prepared in TFDS's ``array_record`` file format and read with
random access through ``builder.as_data_source`` (no TensorFlow at run time).
The embedded datasets (``mnist1d``, ``digits``) are generated into
``data_dir`` on first use; TFDS's downloadable datasets (``mnist``,
``cifar100``, ``imagenet2012``) read their archives through TensorFlow, so
preparing them needs the ``tfds`` extra (``pip install 'kdjax[tfds]'``) and
``kdjax prepare NAME`` (or ``download=True``), once; training never imports
TensorFlow.

Two ways to hold a split, both with ``take(indices) -> (images, labels, ids)``:
:class:`ArrayDataset` (the whole split in host memory, for small datasets) and
:class:`RecordSource` (records read and decoded on demand, nothing held whole;
ImageNet-sized splits).

Example ids: the record's index in the split, ``0..N-1`` (for the embedded
datasets the generator's order), stable across runs and processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from kdjax import batch as batch_keys
from kdjax.errors import ConfigError


class DatasetUnavailableError(ConfigError):
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
  msg = (
    f"dataset {name!r} is not prepared in data_dir {data_dir!r}{why}; "
    f"prepare it once with `kdjax prepare {name} --data_dir DIR` (needs `pip install 'kdjax[tfds]'` and the "
    f"network) and copy DIR/{name.split('/')[0]} into {data_dir!r} (or point --data_dir / TFDS_DATA_DIR at it); "
    f"for manual-download datasets put the archives in {manual!r} first"
  )
  return DatasetUnavailableError(" ".join(msg.split()))


def _needs_tensorflow(name: str) -> DatasetUnavailableError:
  return DatasetUnavailableError(
    f"preparing {name!r} reads its downloaded files through TensorFlow, which this install lacks: "
    f"`pip install 'kdjax[tfds]'`, then `kdjax prepare {name}` (once; training never needs TensorFlow)"
  )


def _has_tensorflow() -> bool:
  import importlib.util

  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):
    return False


def get_builder(name: str, data_dir: str | None = None, *, download: bool = False, prepare: bool = True):
  """A TFDS builder for ``name``, prepared (or ``DatasetUnavailableError``).

  Never touches the network unless ``download=True``: GCS lookups are off and
  ``is_prepared()`` is checked first.  Embedded datasets are always built.
  """
  import tensorflow_datasets as tfds

  import kdjax.data.builders  # noqa: F401  (registration)

  data_dir = default_data_dir(data_dir)
  try:
    builder = _builder(name, data_dir)
    prepared = prepare and builder.is_prepared()
  except Exception as e:  # DatasetNotFoundError, bad config name, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DatasetUnavailableError(
      f"unknown TFDS dataset {name!r} (data_dir {data_dir!r}): {first}; "
      "your own data becomes one with `kdjax prepare text|images FILE --name NAME`"
    ) from None
  if prepared:
    return _check_format(builder, name)
  if not prepare:
    return builder
  if not (download or _is_embedded(builder)):
    raise _unavailable(name, data_dir)
  with _prepare_lock(data_dir, name):  # several processes (hosts of one node, sweep cells) may ask at once
    builder = _builder(name, data_dir)
    if builder.is_prepared():  # another process prepared it while this one waited
      return _check_format(builder, name)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception as e:
      if _is_embedded(builder):
        raise  # generated locally: a failure is a bug, not missing data
      if not _has_tensorflow():
        raise _needs_tensorflow(name) from None
      first = (str(e).strip().splitlines() or [""])[0][:200]
      raise _unavailable(name, data_dir, f" and preparing it failed ({type(e).__name__}: {first})") from None
  return builder


FILE_FORMAT = "array_record"


def _builder(name: str, data_dir: str):
  """``tfds.builder`` without its absl warning "Variant folder … has no dataset_info.json" for a
  dataset not prepared yet (kdjax says that better, or prepares it)."""
  import tensorflow_datasets as tfds

  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    return tfds.builder(name, data_dir=data_dir, try_gcs=False, file_format=FILE_FORMAT)
  finally:
    absl_log.setLevel(level)


def prepare(name: str, data_dir: str | None = None) -> str:
  """Download (needs the network) and store dataset ``name`` as ArrayRecord in ``data_dir``, once.

  Embedded datasets are generated locally.  Downloadable TFDS datasets read
  their archives through TensorFlow: without the ``tfds`` extra this is one
  :class:`DatasetUnavailableError` line saying how to get it.  Returns the
  prepared dataset's directory.
  """
  builder = get_builder(name, data_dir, prepare=False)
  if not (builder.is_prepared() or _is_embedded(builder) or _has_tensorflow()):
    raise _needs_tensorflow(name)
  return str(get_builder(name, data_dir, download=True).data_dir)


def _check_format(builder, name: str):
  """A dataset prepared earlier as TFRecord cannot be read by index: say how to convert it."""
  fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
  if fmt and str(fmt) != FILE_FORMAT:
    raise DatasetUnavailableError(
      f"dataset {name!r} in {builder.data_dir!r} is stored as {fmt}, and kdjax reads {FILE_FORMAT}: convert it "
      f"with `tfds convert_format --dataset_version_dir {builder.data_dir} --out_file_format {FILE_FORMAT}` "
      f"(needs `pip install 'kdjax[tfds]'`) or prepare it again with `kdjax prepare {name}`"
    )
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


PACKING = (
  batch_keys.SEGMENT_IDS,
  batch_keys.POSITIONS,
)  # packed token rows' per-position features, carried into batches


@dataclasses.dataclass
class ArrayDataset:
  """A split held in host memory: ``images`` (N, ...), ``labels`` int32 (N,) — or (N, L) next-token targets
  for a token dataset — (-1 = unlabelled / not scored), ``ids`` int64 (N,); ``extras``: per-example arrays
  (N, ...) a batch carries too (packed rows' :data:`PACKING`)."""

  fixed_shape = True

  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  name: str = ""
  split: str = ""
  extras: dict | None = None

  @property
  def extra_keys(self) -> tuple[str, ...]:
    return tuple(self.extras or ())

  def take_extras(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The ``extras`` of rows ``idx``."""
    return {k: v[idx] for k, v in (self.extras or {}).items()}

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int32)
    self.ids = np.asarray(self.ids, np.int64)
    n = len(self.images)
    if len(self.labels) != n or len(self.ids) != n:
      raise ConfigError(
        f"ArrayDataset {self.name}/{self.split}: {n} images, {len(self.labels)} labels, {len(self.ids)} ids"
      )

  def __len__(self) -> int:
    return len(self.images)

  def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``idx``: images (n, ...), labels int32 (n,), ids int64 (n,)."""
    return self.images[idx], self.labels[idx], self.ids[idx]


class RecordSource:
  """A prepared split read by index from its ArrayRecord files (nothing held in memory whole).

  ``take(idx)`` reads and decodes only records ``idx``: images as one array
  (n, ...) when the dataset's image shape is fixed, else a list of (H, W, C)
  arrays (ImageNet's JPEGs); labels int32 (-1 where the split has none); ids
  = record indices.  Picklable, so Grain worker processes open their own
  readers.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, *, download: bool = False):
    builder = get_builder(name, data_dir, download=download)
    self.name, self.split = name, split
    try:
      self._source = builder.as_data_source(split=split)
    except Exception as e:  # an unknown split or slice
      raise DatasetUnavailableError(f"{name}: cannot read split {split!r}: {str(e).strip().splitlines()[0]}") from None
    self.input_key, self.label_key = _supervised_keys(builder)
    self.fixed_shape = all(d is not None for d in builder.info.features[self.input_key].shape)
    self.extra_keys = tuple(k for k in PACKING if k in builder.info.features)
    self.ids = np.arange(len(self._source), dtype=np.int64)
    if not len(self.ids):
      raise ConfigError(f"{name}/{split} in {default_data_dir(data_dir)!r} has no examples")

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, idx: np.ndarray):
    idx = np.asarray(idx, np.int64)
    records = _read_records(self._source, idx.tolist())
    images = [np.asarray(r[self.input_key]) for r in records]
    labels = np.array([r.get(self.label_key, -1) for r in records], np.int32)
    return (np.stack(images) if self.fixed_shape else images), labels, self.ids[idx]

  def take_extras(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The :attr:`extra_keys` features of records ``idx`` (packed token rows' segment ids and positions)."""
    if not self.extra_keys:
      return {}
    records = _read_records(self._source, np.asarray(idx, np.int64).tolist())
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in self.extra_keys}


def _supervised_keys(builder) -> tuple[str, str]:
  """The (input, label) feature names: the builder's ``supervised_keys``, else ``("image", "label")``."""
  keys = builder.info.supervised_keys
  return (str(keys[0]), str(keys[1])) if keys and len(keys) == 2 else ("image", "label")


def _read_records(source, keys: list[int]) -> list:
  try:
    return source.__getitems__(keys)  # one batched read
  except TypeError:  # tfds.testing.mock_data's source implements only __getitem__
    return [source[k] for k in keys]


class ConcatSource:
  """Sources one after another; ids offset as :func:`concat` does."""

  def __init__(self, sources):
    self.sources = list(sources)
    self.starts = np.cumsum([0] + [len(s) for s in self.sources])
    ids, offset = [], 0
    for s in self.sources:
      ids.append(s.ids + offset)
      if len(s):
        offset = int(ids[-1].max()) + 1
    self.ids = np.concatenate(ids)
    self.name = "+".join(dict.fromkeys(s.name for s in self.sources))
    self.split = "+".join(s.split for s in self.sources)
    self.fixed_shape = all(getattr(s, "fixed_shape", True) for s in self.sources)

  def __len__(self) -> int:
    return int(self.starts[-1])

  def take(self, idx: np.ndarray):
    idx = np.asarray(idx, np.int64)
    which = np.searchsorted(self.starts, idx, side="right") - 1
    images, labels = [None] * len(idx), np.empty(len(idx), np.int32)
    for k in np.unique(which):
      at = np.flatnonzero(which == k)
      im, lab, _ = self.sources[k].take(idx[at] - self.starts[k])
      labels[at] = lab
      for j, a in enumerate(at):
        images[a] = im[j]
    return (np.stack(images) if self.fixed_shape else images), labels, self.ids[idx]


def load_arrays(name: str, split: str, data_dir: str | None = None, *, download: bool = False) -> ArrayDataset:
  """Read a whole split into NumPy (for datasets that fit in host memory)."""
  src = RecordSource(name, split, data_dir, download=download)
  if not src.fixed_shape:
    raise ConfigError(
      f"{name}/{split}: images of varying size cannot be held as one array; read it with "
      f"kdjax.data.RecordSource (kdjax.data.make_loader does)"
    )
  images, labels, ids = src.take(src.ids)
  extras = src.take_extras(src.ids) or None
  return ArrayDataset(images, labels, ids, name=name, split=split, extras=extras)


def open_split(name: str, split: str, data_dir: str | None = None, *, download: bool = False):
  """The split as an :class:`ArrayDataset` (small datasets) or a :class:`RecordSource` (ImageNet-sized ones, and
  large ones of ``kdjax prepare``)."""
  if is_streaming(name) or _prepared(name, data_dir).get("streaming"):
    return RecordSource(name, split, data_dir, download=download)
  return load_arrays(name, split, data_dir, download=download)


def concat(datasets: Sequence) -> ArrayDataset | ConcatSource:
  """Concatenate datasets (e.g. train + transfer).

  Ids stay unique: each dataset's ids are offset by (max id so far + 1), so
  the first keeps its ids and, for ``[train, transfer]`` with ids 0..N-1, the
  transfer examples get ids N..N+M-1.  In-memory datasets give an
  :class:`ArrayDataset`; any :class:`RecordSource` among them a :class:`ConcatSource`.
  """
  if not datasets:
    raise ConfigError("concat needs at least one dataset")
  if not all(isinstance(d, ArrayDataset) for d in datasets):
    return ConcatSource(datasets)
  shapes = {d.images.shape[1:] for d in datasets}
  if len(shapes) != 1:
    raise ConfigError(f"concat: image shapes differ: {sorted(shapes)}")
  c = ConcatSource(datasets)
  return ArrayDataset(
    np.concatenate([d.images for d in datasets]),
    np.concatenate([d.labels for d in datasets]),
    c.ids,
    name=c.name,
    split=c.split,
  )


# ----------------------------------------------------------------- info
TOKEN_DATASETS = ("arithmetic", "hmm_lm")  # inputs are token ids: view kind "tokens"
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
  packed_splits: tuple[str, ...] = ()  # splits whose rows hold several examples (``kdjax prepare text --pack``)


def _prepared(name: str, data_dir: str | None) -> dict:
  """What a dataset made by :mod:`kdjax.data.prepare` records about itself (``kind``: ``tokens``/``image``,
  ``streaming`` …); empty for any other dataset."""
  try:
    return dict(get_builder(name, data_dir, prepare=False).info.metadata or {})
  except ConfigError:
    return {}


def _prepared_kind(name: str, data_dir: str | None) -> str | None:
  return _prepared(name, data_dir).get("kind")


def tokenizer(name: str, data_dir: str | None = None):
  """The ``tokenizers.Tokenizer`` of token dataset ``name`` (config suffix allowed: ``arithmetic/add6``); for a
  dataset made by ``kdjax prepare text``, the tokenizer stored with it."""
  base = name.split("/")[0]
  if base == "arithmetic":
    from kdjax.data.builders import arithmetic

    return arithmetic.tokenizer()
  if _prepared_kind(name, data_dir) == "tokens":
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(str(get_builder(name, data_dir).data_dir), "tokenizer.json"))
  raise ConfigError(
    f"dataset {name!r} has no tokenizer kdjax knows (token datasets: {', '.join(TOKEN_DATASETS)} and those made "
    f"by `kdjax prepare text`)"
  )


def is_streaming(name: str) -> bool:
  return name.split("/")[0].split(":")[0] in STREAMING


def get_info(name: str, data_dir: str | None = None, image_size: int | None = None) -> DatasetSpec:
  """Classes, image shape (after views) and splits, from the builder's code (no data needed)."""
  builder = get_builder(name, data_dir, prepare=False)
  info = builder.info
  feats = info.features
  x_key, y_key = _supervised_keys(builder)
  vocab = (info.metadata or {}).get("vocab_size")  # token datasets: the classes are the vocabulary
  num_classes = int(vocab) if vocab else int(feats[y_key].num_classes)
  shape = tuple(feats[x_key].shape)
  if any(d is None for d in shape):
    s = image_size or 224
    shape = (s, s, shape[-1])
  base = name.split("/")[0].split(":")[0]
  splits = tuple(info.splits.keys()) if info.splits else _SPLITS.get(base, ("train", "test"))
  eval_split = "test" if "test" in splits else ("validation" if "validation" in splits else splits[-1])
  return DatasetSpec(
    name=name,
    num_classes=num_classes,
    image_shape=shape,
    image_dtype=np.dtype(feats[x_key].np_dtype).name,
    splits=splits,
    train_split="train",
    eval_split=eval_split,
    streaming=is_streaming(name),
    packed_splits=tuple((info.metadata or {}).get("packed_splits", ())),
  )


def raw_scale(name: str) -> float | None:
  """What a dataset's stored values are divided by to reach [0, 1].

  ``None`` means the dtype's default (255 for uint8, 1 for floats); digits
  stores 0..16 in uint8, so it returns 16.
  """
  base = name.split("/")[0].split(":")[0]
  scale = _STATS.get(base, (None,))[0]
  return scale if base == "digits" else None


def default_view(name: str, kind: str | None = None, *, data_dir: str | None = None, **overrides):
  """A ``ViewConfig`` with the dataset's scale/mean/std (and a sensible kind: ``tokens`` for token datasets,
  those made by ``kdjax prepare text`` in ``data_dir`` included)."""
  from kdjax.data.views import ViewConfig

  base = name.split("/")[0].split(":")[0]
  if kind is None:
    kind = (
      "tokens"
      if base in TOKEN_DATASETS or (base not in _STATS and _prepared_kind(name, data_dir) == "tokens")
      else {"cifar10": "cifar", "cifar100": "cifar"}.get(base, "imagenet" if is_streaming(base) else "none")
    )
  kw = {}
  if base in _STATS and kind != "imagenet":
    scale, mean, std = _STATS[base]
    kw = dict(scale=scale, mean=mean, std=std)
  kw.update(overrides)
  return ViewConfig(kind=kind, **kw)
