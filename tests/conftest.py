"""Shared test set-up: CPU only, quiet TensorFlow, one TFDS dir per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """A TFDS data_dir where the embedded datasets get built (once per worker)."""
  d = tmp_path_factory.mktemp("tfds")
  return str(d)


@pytest.fixture(scope="session")
def bench():
  """``scripts/bench.py`` imported as a module (it is a script, not part of the package)."""
  path = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
  spec = importlib.util.spec_from_file_location("kdjax_bench", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod
