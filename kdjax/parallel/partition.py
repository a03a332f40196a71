"""Teacher placement mechanics: tensor-parallel shardings, sub-meshes, device-to-device outputs.

Tensor parallelism follows logical axes: each teacher parameter gets one
logical name per dimension, and :data:`RULES` maps names to mesh axes
(``vocab``, ``heads``, ``mlp``, ``conv_out`` → ``model``; ``embed`` stays
whole). A model may declare ``PARTITION_RULES``: ``(regex over the dotted
parameter path, logical names)`` pairs, first match wins (the zoo
transformer splits attention and MLP the Megatron way: column-parallel in,
row-parallel out). Everything else follows its layer type:

  ``nnx.Linear``  kernel ``(in, out)`` → ``(embed, mlp)``, bias ``(mlp,)``
  ``nnx.Conv``    kernel ``(*window, in, out)`` → ``(…, conv_out)``, bias ``(conv_out,)``
  ``nnx.Embed``   embedding ``(V, D)`` → ``(vocab, embed)``
  norms, BatchNorm statistics, anything else → replicated.

Leaves under :data:`MIN_SPLIT_SIZE` entries stay replicated (splitting a bias
costs more in collectives than it saves); a larger one whose split dimension
the ``model`` axis does not divide is an error naming the layer.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdjax.errors import ConfigError

RULES = {"vocab": "model", "heads": "model", "mlp": "model", "conv_out": "model", "embed": None}
MIN_SPLIT_SIZE = 2**14
Axes = tuple[str | None, ...]


def _type_axes(module: nnx.Module, name: str, ndim: int) -> Axes | None:
  if isinstance(module, nnx.Linear):
    return {"kernel": ("embed", "mlp"), "bias": ("mlp",)}.get(name)
  if isinstance(module, nnx.Conv):
    return {"kernel": (None,) * (ndim - 1) + ("conv_out",), "bias": ("conv_out",)}.get(name)
  if isinstance(module, nnx.Embed):
    return {"embedding": ("vocab", "embed")}.get(name)
  return None


def logical_axes(model: nnx.Module) -> dict[str, Axes]:
  """Dotted parameter path → logical axis names, for every ``nnx.Param`` of ``model`` that is split."""
  rules = [(re.compile(p), tuple(a)) for p, a in getattr(model, "PARTITION_RULES", ())]
  out = {}
  for path, module in nnx.iter_modules(model):
    for name, var in vars(module).items():
      if not isinstance(var, nnx.Param):
        continue
      dotted = ".".join(str(p) for p in (*path, name))
      axes = next((a for r, a in rules if r.fullmatch(dotted)), None)
      axes = axes if axes is not None else _type_axes(module, name, len(var.shape))
      if axes is not None and any(RULES.get(a) for a in axes):
        out[dotted] = axes
  return out


def _dotted(keypath) -> str:
  parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath]
  if parts and parts[-1] in ("value", "raw_value"):  # the Variable's own field
    parts = parts[:-1]
  return ".".join(str(p) for p in parts)


def spec_for(dotted: str, shape: tuple[int, ...], axes: Axes | None, size: int, field: str) -> P:
  if size <= 1 or axes is None or math.prod(shape) < MIN_SPLIT_SIZE:
    return P()
  if len(axes) != len(shape):
    raise ConfigError(f"partition rule for {dotted!r} names {len(axes)} axes but the parameter has shape {shape}")
  spec = [RULES.get(a) for a in axes]
  for i, ax in enumerate(spec):
    if ax and shape[i] % size:
      fits = max(d for d in range(1, size) if shape[i] % d == 0)
      raise ConfigError(
        f"{field}={size} does not divide teacher layer {dotted!r} (dimension {i} of shape {shape}); "
        f"use a {field} that divides {shape[i]} (e.g. {fits})"
      )
  return P(*spec)


def _largest_dim_spec(shape: tuple[int, ...], size: int) -> P:
  """For a teacher given as a function (no layer types): split its largest dimension that divides."""
  if size <= 1 or math.prod(shape) < MIN_SPLIT_SIZE:
    return P()
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % size == 0:
      return P(*[("model" if j == i else None) for j in range(len(shape))])
  return P()


def teacher_specs(teacher: Any, params: Any, size: int, field: str = "placement.model") -> Any:
  """PartitionSpecs for a teacher's ``params`` split over a ``model`` axis of ``size`` devices.

  ``teacher`` is the NNX module the params came from (its layer types and
  ``PARTITION_RULES`` decide), or None for a function teacher.
  """
  axes = logical_axes(teacher) if isinstance(teacher, nnx.Module) else None

  def one(keypath, x):
    shape = tuple(getattr(x, "shape", ()))
    if axes is None:
      return _largest_dim_spec(shape, size)
    d = _dotted(keypath)
    return spec_for(d, shape, axes.get(d), size, field)

  return jax.tree_util.tree_map_with_path(one, params)
