"""kdjax's packages depend one way: nothing imports from a layer above its own.

Layers, bottom to top (a module may import from its own layer and those below):

  0  kdjax.errors, kdjax.batch, kdjax._interrupt
  1  kdjax.parallel, kdjax.losses
  2  kdjax.models, kdjax.generate
  3  kdjax.methods, kdjax.data, kdjax.responses, kdjax.checkpoint, kdjax.report, kdjax.export
  4  kdjax.config
  5  kdjax.engine
  6  kdjax.cli, kdjax.bench, kdjax.__main__, kdjax (the package's lazy re-exports)
"""

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1] / "kdjax"
LAYERS = {
  "kdjax.errors": 0,
  "kdjax.batch": 0,
  "kdjax._interrupt": 0,
  "kdjax._version": 0,
  "kdjax.parallel": 1,
  "kdjax.losses": 1,
  "kdjax.models": 2,
  "kdjax.generate": 2,
  "kdjax.methods": 3,
  "kdjax.data": 3,
  "kdjax.responses": 3,
  "kdjax.checkpoint": 3,
  "kdjax.report": 3,
  "kdjax.export": 3,
  "kdjax.config": 4,
  "kdjax.engine": 5,
  "kdjax.cli": 6,
  "kdjax.bench": 6,
  "kdjax.__main__": 6,
  "kdjax.experiments": 6,
  "kdjax": 6,
}


def layer(module: str) -> int:
  """The layer of ``module``: its longest prefix in :data:`LAYERS`."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in LAYERS:
      return LAYERS[".".join(parts[:n])]
  raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def module_name(path: Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def kdjax_imports(path: Path, module: str) -> list[tuple[int, str]]:
  """``(line, imported module)`` for every import of a kdjax module in ``path``, at any depth."""
  package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kdjax"]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      if base.split(".")[0] != "kdjax":
        continue
      for a in node.names:  # `from kdjax import losses` imports the module kdjax.losses
        found.append((node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in LAYERS else base))
  return found


def test_no_import_runs_up_a_layer():
  upward = []
  for path in sorted(ROOT.rglob("*.py")):
    module = module_name(path)
    for line, imported in kdjax_imports(path, module):
      if layer(imported) > layer(module):
        upward.append(
          f"{path.relative_to(ROOT.parent)}:{line} ({module}, layer {layer(module)}) imports "
          f"{imported} (layer {layer(imported)})"
        )
  assert not upward, "\n".join(upward)


LOWER = ("kdjax.losses", "kdjax.models", "kdjax.generate", "kdjax.parallel", "kdjax.data")


def test_lower_packages_load_without_the_engine():
  """Imported together in a fresh interpreter (so none of them alone can), they load no engine, CLI or config."""
  code = (
    f"import sys, {', '.join(LOWER)}; "
    "print(sorted(m for m in sys.modules if m.startswith(('kdjax.engine', 'kdjax.cli', 'kdjax.config'))))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]", f"importing {', '.join(LOWER)} loads {out.strip()}"
