"""Shared test set-up: CPU only, quiet TensorFlow, one TFDS dir per session."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """A TFDS data_dir where the embedded datasets get built (once per worker)."""
  d = tmp_path_factory.mktemp("tfds")
  return str(d)
