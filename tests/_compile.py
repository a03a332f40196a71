"""Test helper: kdjax's executables compiled as outside the test suite.

The suite compiles with XLA:CPU's cheaper settings (``tests/conftest.py``), under which two different
programs can round one fusion differently. A claim that two programs give the same bits holds under
kdjax's real compile settings, so the tests that make one compile with XLA:CPU's default fusion
emitters (a per-executable option: the rest of the process keeps the cheap settings).
"""

from __future__ import annotations

import contextlib

import pytest

from kdjax.parallel import xla_cpu


@contextlib.contextmanager
def production_compile():
  real = xla_cpu.compiler_options

  def with_fusion_emitters(*args, **kwargs):
    return {**(real(*args, **kwargs) or {}), "xla_cpu_use_fusion_emitters": True}

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(xla_cpu, "compiler_options", with_fusion_emitters)
    yield
