"""Meshes and shardings: data parallelism (and optional FSDP) with jit.

kdjax's distributed engine is ``jax.jit`` over a ``Mesh`` with axes
``("data", "fsdp")``, plus ``"model"`` for a tensor-parallel teacher: the
batch is sharded over every axis, the student's parameters are replicated
over ``data`` and (optionally) split over ``fsdp``, a sharded teacher's over
``model`` (:mod:`kdjax.parallel.partition`). The same code
runs on one CPU, eight forced host devices, a GPU or many hosts after
``jax.distributed.initialize()``; XLA inserts the collectives.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax.errors import ConfigError

BATCH_AXES = ("data", "fsdp", "model")
# Leaves smaller than this stay replicated under FSDP: splitting a BN scale
# over devices costs more in collectives than it saves in memory.
FSDP_MIN_SIZE = 2**14


def make_mesh(data: int = 0, fsdp: int = 1, devices: Any = None, *, model: int = 1) -> Mesh:
  """A ``("data", "fsdp")`` mesh over all devices (of all processes), ``("data", "fsdp", "model")`` with ``model > 1``.

  Args:
    data: size of the data axis; 0 means ``device_count // (fsdp · model)``.
    fsdp: size of the parameter-sharding axis.
    devices: use these devices instead of all of them (e.g. one device of
      eight, to compare device counts in one process).
    model: size of the teacher's tensor-parallel axis.
  """
  n = len(devices) if devices is not None else jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"run.mesh_fsdp={fsdp} must divide the device count {n}")
  if model < 1 or n % (fsdp * model):  # fsdp alone divides n (checked above)
    raise ConfigError(f"placement.model={model} × run.mesh_fsdp={fsdp} must divide the device count {n}")
  data = data or n // (fsdp * model)
  if data * fsdp * model != n:
    tp = f" × placement.model={model}" if model > 1 else ""
    raise ConfigError(f"run.mesh_data={data} × run.mesh_fsdp={fsdp}{tp} must equal the device count {n}")
  shape, names = ((data, fsdp, model), BATCH_AXES) if model > 1 else ((data, fsdp), BATCH_AXES[:2])
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def teacher_batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch as a tensor-parallel teacher reads it: split over ``data``/``fsdp``, whole on each ``model`` group."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES[:2] if a in mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Split the largest dimension divisible by ``fsdp`` (big leaves only)."""
  if fsdp <= 1 or not shape or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree: Any, mesh: Mesh, fsdp: bool = True) -> Any:
  """NamedShardings for a parameter pytree (FSDP where the mesh has it)."""
  size = mesh.shape["fsdp"] if fsdp else 1

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, fsdp_spec(shape, size))

  return jax.tree.map(one, tree)


def check_batch_size(global_batch: int, mesh: Mesh, name: str = "data.batch_size") -> None:
  n = mesh.size
  if global_batch % n:
    raise ConfigError(f"{name}={global_batch} is not divisible by the {n} devices of the mesh; use a multiple of {n}")
  if global_batch % jax.process_count():
    raise ConfigError(f"{name}={global_batch} is not divisible by the {jax.process_count()} processes")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble this process's slice of the global batch into global arrays."""
  sharding = batch_sharding(mesh)
  with jax.transfer_guard_host_to_device("allow"):  # the intended upload, also inside a loop that guards the rest
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def param_bytes(tree: Any) -> dict[str, int]:
  """``{"total", "max_per_device"}``: the bytes of a pytree of global arrays,
  and the most any one (local) device holds of it, read from the arrays'
  addressable shards (so FSDP/tensor-parallel splits show up)."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  per: dict[Any, int] = {}
  for x in leaves:
    for s in x.addressable_shards:
      per[s.device] = per.get(s.device, 0) + s.data.nbytes
  return {"total": int(sum(x.nbytes for x in leaves)), "max_per_device": int(max(per.values(), default=0))}


def global_put(tree: Any, shardings: Any) -> Any:
  """Place host values (identical on every process) as global arrays with ``shardings``."""

  def one(x, s):
    if not jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      x = np.asarray(x)
    if isinstance(x, np.ndarray):
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.device_put(x, s)

  return jax.tree.map(one, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as NumPy on every process (gathers what other processes hold)."""
  if jax.process_count() > 1 and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
