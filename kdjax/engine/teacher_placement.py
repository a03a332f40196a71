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

import functools
import math
import re
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax.errors import ConfigError
from kdjax.placement import Placement

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


def _spec(dotted: str, shape: tuple[int, ...], axes: Axes | None, size: int, field: str) -> P:
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
    return _spec(d, shape, axes.get(d), size, field)

  return jax.tree_util.tree_map_with_path(one, params)


def check_memory_kind(mesh: Mesh, kind: str) -> None:
  """One line when the backend has no such memory (``pinned_host`` on a backend without host offload)."""
  if kind == "device":
    return
  kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
  if kind not in kinds:
    raise ConfigError(
      f"placement.teacher_memory={kind!r} is not supported on this backend "
      f"({mesh.devices.flat[0].platform}: memories {sorted(kinds)}); use placement.teacher_memory='device'"
    )


def teacher_shardings(teachers: Sequence[Any], state: Any, mesh: Mesh, placement: Placement) -> Any:
  """Shardings of a ``TeacherState`` on ``mesh``: params by :func:`teacher_specs`, the rest replicated,
  all in ``placement.teacher_memory``."""
  size = mesh.shape.get("model", 1)
  kind = None if placement.teacher_memory == "device" else placement.teacher_memory
  params = tuple(teacher_specs(t, p, size) for t, p in zip(teachers, state.params))
  named = lambda spec: NamedSharding(mesh, spec, memory_kind=kind)  # noqa: E731
  return state.replace(
    params=jax.tree.map(named, params, is_leaf=lambda s: isinstance(s, P)),
    model_state=jax.tree.map(lambda _: named(P()), state.model_state),
  )


def on_device(tree: Any, shardings: Any) -> Any:
  """Inside jit: bring leaves held in host memory onto the device (a no-op for device memory)."""

  def one(x, s):
    if s.memory_kind in (None, "device"):
      return x
    return jax.device_put(x, s.with_memory_kind("device"))

  return jax.tree.map(one, tree, shardings)


# ---------------------------------------------------------------- split placement


def split_devices(devices: Sequence[jax.Device], n_teacher: int) -> tuple[list, list]:
  """``(teacher devices, student devices)``: the first ``n_teacher / P`` devices of each of the P processes
  go to the teacher, so every process feeds both sub-meshes and outputs never cross hosts."""
  by_process: dict[int, list] = {}
  for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  n, procs = len(devices), len(by_process)
  if not 0 < n_teacher < n:
    raise ConfigError(
      f"placement.teacher_devices={n_teacher} must leave devices to the student: use 1 to {n - 1} of the {n} devices"
    )
  if n_teacher % procs:
    raise ConfigError(
      f"placement.teacher_devices={n_teacher} must be a multiple of the {procs} processes (each "
      f"process gives the teacher the same number of its devices)"
    )
  k = n_teacher // procs
  teacher = [d for p in sorted(by_process) for d in by_process[p][:k]]
  student = [d for p in sorted(by_process) for d in by_process[p][k:]]
  return teacher, student


def move_rows(x: jax.Array, dst: NamedSharding) -> jax.Array:
  """``x`` (rows split over one set of devices) as an array with sharding ``dst`` on another set.

  Every row moves from the local device holding it to the local devices
  that need it (explicit device-to-device copies; no host round trip). Both
  shardings must keep each process's rows on its own devices, as
  :func:`split_devices` and process-local batches arrange.
  """
  src: dict[int, jax.Array] = {}
  for s in x.addressable_shards:
    src.setdefault((s.index[0].start or 0) if s.index else 0, s.data)
  pieces = []
  for dev, idx in dst.addressable_devices_indices_map(x.shape).items():
    lo, hi = (idx[0].start or 0, x.shape[0] if idx[0].stop is None else idx[0].stop) if idx else (0, 1)
    parts = []
    for a in sorted(src):
      d = src[a]
      b = a + (d.shape[0] if d.ndim else 1)
      if b <= lo or a >= hi:
        continue
      parts.append(jax.device_put(d if (a >= lo and b <= hi) else _rows(d, max(lo, a) - a, min(hi, b) - a), dev))
    if sum(p.shape[0] if p.ndim else 1 for p in parts) != hi - lo:
      raise ConfigError(
        f"rows {lo}:{hi} needed on {dev} are not held by this process's teacher devices; "
        "both sub-meshes must split each process's rows over its own devices"
      )
    pieces.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
  return jax.make_array_from_single_device_arrays(x.shape, dst, pieces)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rows(x: jax.Array, lo: int, hi: int) -> jax.Array:
  """``x[lo:hi]`` on x's device, compiled with static bounds (an eager slice would send them from the host)."""
  return x[lo:hi]


def move_tree(tree: Any, dst: NamedSharding) -> Any:
  return jax.tree.map(lambda x: move_rows(x, dst), tree)
