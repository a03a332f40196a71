"""The tree is formatted and linted by ruff (configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
  exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
  if exe is None:
    pytest.fail("ruff is not installed: pip install -e '.[test]'")
  return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_format_check():
  r = _ruff("format", "--check", ".")
  assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_check():
  r = _ruff("check", ".")
  assert r.returncode == 0, r.stdout + r.stderr
