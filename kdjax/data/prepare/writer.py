"""Write splits of NumPy rows as a TFDS ArrayRecord dataset, all or nothing.

The dataset is built by a TFDS ``GeneratorBasedBuilder`` (no TensorFlow) into a
temporary directory inside ``data_dir`` and renamed to ``data_dir/NAME`` only
once every split is written, so a failure (a bad line found late, a full disk,
Ctrl-C) leaves no dataset behind. TFDS then reads it by name from the files
(``tfds.builder(NAME, data_dir=…)``), like any prepared dataset: kdjax's
loader, per-process reading and resume apply unchanged. Extra files
(the tokenizer) are copied into the version directory, next to
``dataset_info.json``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from kdjax.errors import ConfigError

VERSION = "1.0.0"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def check_name(name: str, data_dir: str, overwrite: bool) -> Path:
  """``data_dir/name`` after checking ``name`` is a new (or, with ``overwrite``, replaceable) dataset name."""
  import tensorflow_datasets as tfds

  if not _NAME.match(name or ""):
    raise ConfigError(f"dataset name {name!r}: use lower-case letters, digits and underscores, starting with a letter")
  if name in tfds.list_builders(with_community_datasets=False):
    raise ConfigError(f"dataset name {name!r} is a TFDS dataset already; choose another name")
  target = Path(data_dir) / name
  if target.exists() and not overwrite:
    raise ConfigError(
      f"dataset {name!r} already exists in {str(data_dir)!r}; pass overwrite (--overwrite) to replace it"
    )
  return target


def _feature(shape: tuple[int, ...], dtype, classes=None):
  import tensorflow_datasets as tfds

  if classes is not None:  # class labels: TFDS records the class count (a dataset's num_classes)
    return tfds.features.ClassLabel(names=[str(c) for c in classes])
  if not shape:
    return tfds.features.Scalar(dtype=dtype)
  return tfds.features.Tensor(shape=shape, dtype=dtype)


class Columns(Sequence):
  """Records of equally long arrays (feature → ``(N, …)``): record ``i`` is ``{feature: array[i]}``."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, i: int) -> dict:
    return {k: v[i] for k, v in self.arrays.items()}


def _builder_class(name: str, splits: dict, supervised: tuple[str, str], meta: dict, classes: dict):
  """A builder class writing ``splits`` (split → a sequence of records, each feature → array); ``classes``:
  feature → class names, for label features."""
  import tensorflow_datasets as tfds

  from kdjax.data.builders._base import LocalBuilder

  first = next(iter(splits.values()))[0]
  feats = {k: _feature(np.shape(v), np.asarray(v).dtype, classes.get(k)) for k, v in first.items()}

  def gen(records):
    for i in range(len(records)):
      yield i, records[i]

  class Prepared(LocalBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description=meta.get("description", ""),
        features=tfds.features.FeaturesDict(feats),
        supervised_keys=supervised,
        metadata=tfds.core.MetadataDict(meta),
        disable_shuffling=True,  # record i is row i, in the order prepared
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: gen(a) for s, a in splits.items()}

    def _generate_examples(self, records):  # pragma: no cover - _split_generators yields the generators
      yield from gen(records)

  Prepared.name = name
  return Prepared


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """TFDS's progress bars, prints and absl warnings off while a builder writes."""
  from tensorflow_datasets.core.utils import tqdm_utils

  active, absl = tqdm_utils._active, logging.getLogger("absl")
  level = absl.level
  tqdm_utils._active = False
  absl.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tqdm_utils._active = active
    absl.setLevel(level)


def write(
  name: str,
  data_dir: str,
  splits: dict[str, Sequence[dict]],
  *,
  supervised: tuple[str, str],
  metadata: dict,
  files: tuple[Path, ...] = (),
  classes: dict | None = None,
  overwrite: bool = False,
) -> Path:
  """Write ``splits`` (split → records, read one at a time) as dataset ``name`` in ``data_dir``; returns its
  version directory.

  ``files`` are copied into that directory; ``classes`` maps a label feature to its class names.
  """
  import tensorflow_datasets as tfds

  target = check_name(name, data_dir, overwrite)
  os.makedirs(data_dir, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".kdjax-prepare-{name}-", dir=data_dir))
  try:
    builder = _builder_class(name, splits, supervised, metadata, classes or {})(
      data_dir=str(tmp), file_format="array_record"
    )
    with _quiet():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    version_dir = tmp / name / VERSION
    for f in files:
      shutil.copy(f, version_dir / Path(f).name)
    if target.exists() and overwrite:  # the old dataset goes aside first, and away with the temporary directory
      os.rename(target, tmp / "replaced")
    try:
      os.rename(tmp / name, target)  # atomic: the dataset appears whole, or not at all
    except OSError:
      if not target.exists():
        raise
      raise ConfigError(
        f"dataset {name!r} appeared in {str(data_dir)!r} while this one was written (another "
        f"kdjax prepare?); pass overwrite (--overwrite) to replace it"
      ) from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target / VERSION
