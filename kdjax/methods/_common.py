"""Shared helpers of the term builders."""

from __future__ import annotations

import re
from typing import Any

import jax

from kdjax.errors import ConfigError
from kdjax.methods.config import MethodConfig
from kdjax.methods.base import ModelInfo

_STAGE = re.compile(r"^stage(\d+)$")


def opt(value: Any, default: Any) -> Any:
  """A ``MethodConfig`` field, or the preset default when it is ``None``."""
  return default if value is None else value


def stop(x):
  return jax.tree.map(jax.lax.stop_gradient, x)


def stages(info: ModelInfo) -> list[str]:
  """``"stage1"`` … ``"stageN"`` of a model, in order."""
  names = [n for n in info.feature_shapes if _STAGE.match(n)]
  return sorted(names, key=lambda n: int(_STAGE.match(n).group(1)))


def need_teacher(term: str, teacher: ModelInfo | None) -> ModelInfo:
  if teacher is None:
    raise ConfigError(
      f"term {term!r} distils from a teacher's features, but no teacher is configured "
      f"(use a distillation mode such as mode='offline')"
    )
  return teacher


def common_stages(term: str, student: ModelInfo, teacher: ModelInfo) -> list[str]:
  """Stage names both models expose (paired by index, as RepDistiller's feat[1:-1])."""
  s, t = stages(student), stages(teacher)
  common = [n for n in s if n in t]
  if not common:
    raise ConfigError(
      f"term {term!r} pairs student and teacher stages, but student {student.name!r} exposes "
      f"{sorted(student.feature_shapes)} and teacher {teacher.name!r} exposes "
      f"{sorted(teacher.feature_shapes)} (no common 'stageK')"
    )
  return common


def last_stage(term: str, info: ModelInfo) -> str:
  s = stages(info)
  if not s:
    raise ConfigError(
      f"term {term!r} needs a 'stageK' feature, but model {info.name!r} exposes {sorted(info.feature_shapes)}"
    )
  return s[-1]


def shape(info: ModelInfo, feature: str, term: str) -> tuple[int, ...]:
  if feature not in info.feature_shapes:
    raise ConfigError(
      f"term {term!r} needs feature {feature!r}, but model {info.name!r} exposes {sorted(info.feature_shapes)}"
    )
  return tuple(info.feature_shapes[feature])


Builder = Any  # (name, weight, cfg: MethodConfig, student, teacher) -> tuple[Term, ...]
__all__ = ["opt", "stop", "stages", "need_teacher", "common_stages", "last_stage", "shape", "MethodConfig"]
