"""kdjax.methods: distillation methods as weighted sums of loss terms.

``build(cfg, student_info, teacher_info) -> Method`` turns a
:class:`kdjax.methods.MethodConfig` into terms with adapters
(:mod:`kdjax.methods.adapters`) and state; ``available()`` lists presets.
See :mod:`kdjax.methods.registry` for the preset table.
"""

from kdjax.methods.base import Context, InitInfo, Method, ModelInfo, Term
from kdjax.methods.config import MethodConfig
from kdjax.methods.logit import cross_entropy
from kdjax.methods.registry import PRESETS, available, available_terms, build, tap_templates

__all__ = [
  "MethodConfig",
  "build",
  "tap_templates",
  "available",
  "available_terms",
  "PRESETS",
  "Method",
  "Term",
  "Context",
  "ModelInfo",
  "InitInfo",
  "cross_entropy",
]
