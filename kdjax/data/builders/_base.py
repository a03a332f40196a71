"""Shared base for kdjax's embedded builders."""

from __future__ import annotations

import inspect

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A ``GeneratorBasedBuilder`` whose data is generated locally (no downloads).

  Overrides ``code_path``: TFDS 4.9.x resolves it through
  ``importlib_resources``, which it only installs on Python < 3.9, so on 3.11
  any builder defined outside TFDS fails in ``download_and_prepare`` with
  ``No module named 'importlib_resources'``.  The plain file path is what that
  code computes anyway.
  """

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  def token_info(self, length: int, vocab_size: int) -> tfds.core.DatasetInfo:
    """The info of a token dataset: ``inputs``/``targets`` ``(length,)`` int32 (targets −1 where unscored),
    ``prompt_length``; generation order kept, so a record's index is its example id."""
    import numpy as np

    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "inputs": tfds.features.Tensor(shape=(length,), dtype=np.int32),
          "targets": tfds.features.Tensor(shape=(length,), dtype=np.int32),
          "prompt_length": tfds.features.Scalar(dtype=np.int32),
        }
      ),
      supervised_keys=("inputs", "targets"),
      metadata=tfds.core.MetadataDict(vocab_size=vocab_size),
      disable_shuffling=True,
    )
