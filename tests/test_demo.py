"""scripts/demo.py end to end at toy length, with TensorFlow unimportable: table of 4 cells × 2 seeds + PNGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


NO_TENSORFLOW = """
import sys
from importlib.machinery import PathFinder


class _PathFinderWithoutTensorFlow(PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow":
      return None  # as if it were not installed
    return super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithoutTensorFlow if f is PathFinder else f for f in sys.meta_path]
"""


def no_tensorflow_env(tmp_path) -> dict:
  """An environment whose Python processes (Grain's workers too) cannot import TensorFlow."""
  d = tmp_path / "no_tensorflow"
  d.mkdir()
  (d / "sitecustomize.py").write_text(NO_TENSORFLOW)
  path = os.pathsep.join([str(d), *filter(None, [os.environ.get("PYTHONPATH")])])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
  assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr
  return env


def test_demo_prints_table_and_writes_plots(tmp_path):
  out = tmp_path / "res" / "demo.md"
  env = no_tensorflow_env(tmp_path)  # fresh data_dir below: datasets are prepared without TensorFlow too
  env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "demo.py"),
      "--seeds",
      "2",
      "--steps",
      "30",
      "--workdir",
      str(tmp_path / "wd"),
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "seeds" not in line]
  cells = {r.split("|")[1].strip(): r for r in rows}
  assert set(cells) == {"cnn1d (teacher training)", "mlp scratch", "cnn1d→mlp kd", "cnn1d→mlp kd +transfer"}
  for row in cells.values():
    assert row.split("|")[2].strip() == "2"  # two seeds per cell
  # The table's mean equals the mean of the runs' results.json.
  accs = [
    json.loads((tmp_path / "wd" / "kd" / f"seed{s}" / "results.json").read_text())["test_accuracy"] for s in range(2)
  ]
  shown = float(cells["cnn1d→mlp kd +transfer"].split("|")[3].split("±")[0])
  np.testing.assert_allclose(shown, 100 * np.mean(accs), atol=0.006)
  assert out.exists() and out.read_text().startswith("# MNIST-1D")
  pngs = sorted(p.name for p in out.parent.glob("*.png"))
  assert pngs == ["demo_bars.png", "demo_curves.png"], pngs
  for p in out.parent.glob("*.png"):
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
