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
