"""kdjax: knowledge distillation research in JAX.

The public core, for training loops of your own::

    import kdjax
    distiller = kdjax.Distiller(student, teacher, method="kd", optimizer=optax.adam(1e-3))
    state = distiller.init(jax.random.key(0), batch)
    state, metrics = distiller.step(state, batch)

``kdjax.losses`` (pure loss functions), ``kdjax.models`` (the NNX zoo),
``kdjax.methods`` (terms and presets) and ``kdjax.batch`` (the batch keys)
are its parts. Names load on first use, so ``import kdjax`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from kdjax._version import __version__

_EXPORTS = {
  "Distiller": "kdjax.engine.distiller",
  "FunctionTeacher": "kdjax.engine.teachers",
  "evaluate": "kdjax.engine.evaluation",
  "exact_match": "kdjax.engine.evaluation",
  "student_model": "kdjax.engine.evaluation",
  "teacher_model": "kdjax.engine.evaluation",
  "export_hf": "kdjax.engine.evaluation",
  "layer_similarity": "kdjax.engine.layer_similarity",
  "auto_layer_map": "kdjax.engine.layer_similarity",
  "auto_layers": "kdjax.engine.layer_similarity",
  "LayerSimilarity": "kdjax.engine.layer_similarity",
  "train": "kdjax.engine.hooks",
  "TrainState": "kdjax.engine.state",
  "make_mesh": "kdjax.parallel.sharding",
  "MethodConfig": "kdjax.methods.config",
  "ModelOutput": "kdjax.models.base",
  "Checkpointer": "kdjax.checkpoint",
  "ResponseConfig": "kdjax.responses",
  "Placement": "kdjax.parallel.placement",
  "ConfigError": "kdjax.errors",
}
_MODULES = (
  "batch",
  "hooks",
  "teachers",
  "losses",
  "models",
  "methods",
  "checkpoint",
  "engine",
  "data",
  "report",
  "export",
  "generate",
)

__all__ = ["__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  elif name in ("hooks", "teachers"):  # kdjax.hooks, kdjax.teachers: the public core's parts
    value = importlib.import_module(f"kdjax.engine.{name}")
  elif name in _MODULES:
    value = importlib.import_module(f"kdjax.{name}")
  else:
    raise AttributeError(f"module 'kdjax' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(__all__)
