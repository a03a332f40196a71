"""Size and vocabulary rules of kdjax's source: small functions, a small Distiller, no mode strings in the engine."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kdjax"
MAX_FUNCTION_LINES = 60  # including the docstring
MAX_DISTILLER_LINES = 270
# (module, function) → why it may be longer.
LONG_FUNCTIONS: dict[tuple[str, str], str] = {}


def _functions():
  for path in sorted(ROOT.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield path.relative_to(ROOT.parent).as_posix(), node


def test_no_function_is_longer_than_a_screen():
  long = [
    f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
    for path, node in _functions()
    if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and (path, node.name) not in LONG_FUNCTIONS
  ]
  assert not long, "split these functions:\n" + "\n".join(long)


def test_the_distiller_class_stays_small():
  tree = ast.parse((ROOT / "engine" / "distiller.py").read_text())
  (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Distiller"]
  assert cls.end_lineno - cls.lineno + 1 <= MAX_DISTILLER_LINES


MODE_COMPARISON = re.compile(r"""mode\s*(==|!=|\bin\b|\bnot in\b)\s*[("']|["']\s*(==|!=)\s*\w*mode\b""")


def test_no_mode_string_is_compared_outside_the_teacher_sources():
  """Roles are objects: a mode name becomes a teacher source in one place (``kdjax.engine.teachers``)."""
  places = [ROOT / "engine", *ROOT.glob("cli*")]
  found = []
  for place in places:
    for path in sorted(place.rglob("*.py") if place.is_dir() else [place]):
      if path == ROOT / "engine" / "teachers.py":
        continue
      for i, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#")[0]
        if MODE_COMPARISON.search(code) and "view_mode" not in code and "memory" not in code:
          found.append(f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}")
  assert not found, "\n".join(found)
