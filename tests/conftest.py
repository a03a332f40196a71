"""Shared test set-up: CPU only, quiet TensorFlow, one TFDS data dir for the whole test run."""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite compiles many small programs and runs each for a few steps, so compiling is most of its
# time: XLA's cheapest compile settings (no LLVM optimisation, XLA:CPU's classic elemental emitters
# instead of its fusion emitters) cut it by about three. Every comparison in the suite is between runs
# made under the same settings (subprocesses inherit them), so no assertion depends on them.
FAST_COMPILE = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """A TFDS data_dir where the embedded datasets get built once per test run.

  pytest-xdist workers share it (their base temp dirs have one parent); kdjax
  prepares each dataset under a file lock, so concurrent workers wait for the
  first one instead of building it again.
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  d = root / "tfds_shared"
  d.mkdir(exist_ok=True)
  return str(d)


@pytest.fixture(scope="session")
def made_once(tmp_path_factory):
  """``made_once(name, make) -> dir``: a directory that ``make(dir)`` fills once per test run.

  pytest-xdist workers share it (like ``tfds_dir``); a worker that finds another one making it
  waits on a file lock instead of repeating the work — for fixtures that launch runs of their own.
  """

  def get(name: str, make) -> Path:
    base = tmp_path_factory.getbasetemp()
    d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    d.mkdir(exist_ok=True)
    with open(d / ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not (d / "done").exists():
        make(d)
        (d / "done").touch()
    return d

  return get


@pytest.fixture
def production_compile():
  """This test's kdjax executables compile with XLA:CPU's default settings (``tests/_compile.py``)."""
  from _compile import production_compile as compiled_as_outside

  with compiled_as_outside():
    yield


@pytest.fixture(scope="session")
def bench():
  """The benchmark through its ``scripts/bench.py`` wrapper, imported as a module (``kdjax.bench``'s names)."""
  path = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
  spec = importlib.util.spec_from_file_location("kdjax_bench", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
  """A test that starts several processes of its own is also a slow one, and all of them share one
  pytest-xdist group: under ``--dist loadgroup`` they run one after another on one worker while the
  other workers go on with the rest, so they never stack on each other."""
  xdist = config.pluginmanager.hasplugin("xdist")
  for item in items:
    if item.get_closest_marker("procs") is not None:
      item.add_marker(pytest.mark.slow)
      if xdist:
        item.add_marker(pytest.mark.xdist_group("procs"))
