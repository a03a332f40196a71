"""kdjax installed from its wheel (not editable) works away from the source tree.

The package is built and installed into a fresh virtualenv whose only other
packages are this interpreter's (a ``.pth`` line points at its site-packages,
so nothing is downloaded). Then, from a directory outside the checkout, the
installed ``kdjax`` imports its own copy, finds the benchmark and the shipped
experiments by short name, and trains: ``kdjax bench``,
``kdjax train-teacher mnist1d_kd`` and ``kdjax distill mnist1d_kd``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "kdjax", "experiments")


def _source_copy(dst: Path) -> Path:
  """The files a build reads, copied: building writes ``build/`` and ``*.egg-info`` next to them."""
  dst.mkdir()
  for name in SOURCES:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, dst / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(src, dst / name)
  return dst


def _site_packages(python: Path) -> Path:
  out = subprocess.run(
    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  )
  return Path(out.stdout.strip())


def _venv(env_dir: Path) -> Path:
  """A virtualenv without pip that sees this interpreter's packages after its own; returns its python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
  python = env_dir / "bin" / "python"
  # A plain path line (not site.addsitedir): the host's own .pth files, such as an editable kdjax's
  # import hook, stay out, so `import kdjax` can only find the installed copy.
  host = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (_site_packages(python) / "_host_packages.pth").write_text("\n".join(sorted(host)) + "\n")
  return python


def _install(python: Path, source: Path) -> None:
  """Build kdjax's wheel and install it into ``python``'s environment, offline and leaving the host alone."""
  pytest.importorskip("pip")
  cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation"]
  # --ignore-installed: the host's kdjax is visible through the .pth line; pip must not try to replace it.
  cmd += ["--ignore-installed", "--no-index", "--no-cache-dir", "--quiet", str(source)]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
  """A virtualenv holding a wheel install of kdjax; returns its directory."""
  base = tmp_path_factory.mktemp("install")
  env_dir = base / "env"
  _install(_venv(env_dir), _source_copy(base / "src"))
  return env_dir


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may point back at the checkout
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_package_is_its_own_copy_with_the_experiments(installed, tmp_path):
  code = (
    "import json, kdjax, kdjax.bench; from kdjax.cli import experiments; "
    "print(json.dumps([kdjax.__file__, kdjax.bench.__file__, str(experiments.EXPERIMENTS_DIR)]))"
  )
  r = _run([str(installed / "bin" / "python"), "-c", code], tmp_path)
  assert r.returncode == 0, r.stderr
  package, bench, experiments = map(Path, json.loads(r.stdout.splitlines()[-1]))
  for p in (package, bench, experiments):
    assert p.is_relative_to(installed) and not p.resolve().is_relative_to(ROOT), p
  assert (experiments / "mnist1d_kd.py").is_file() and not experiments.is_symlink()


def test_bench_runs_from_the_installed_package(installed, tmp_path):
  r = _run([str(installed / "bin" / "kdjax"), "bench", "--quick", "--cases", "kd"], tmp_path)
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  assert [row["case"] for row in rows] == ["matmul_peak", "kd"]
  assert rows[1]["pair"] == "cnn1d-mlp" and rows[1]["images_per_sec"] > 0


def test_teacher_and_student_train_by_short_name(installed, tmp_path, tfds_dir):
  """The experiment's defaults as a user runs them: the teacher in ./workdirs, then KD from it."""
  kdjax = str(installed / "bin" / "kdjax")
  data = ["--data.data_dir", tfds_dir, "--optim.steps", "50"]
  r = _run([kdjax, "train-teacher", "mnist1d_kd", *data, "--run.quiet"], tmp_path)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "workdirs" / "mnist1d" / "teacher" / "results.json").is_file()
  r = _run([kdjax, "distill", "mnist1d_kd", *data, "--workdir", str(tmp_path / "kd")], tmp_path)
  assert r.returncode == 0, r.stderr
  res = json.loads((tmp_path / "kd" / "results.json").read_text())
  assert res["steps"] == 50 and res["method"] == "kd" and res["test_accuracy"] > 0
