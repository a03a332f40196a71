"""Where the frozen teacher lives and runs, relative to the student (:class:`Placement`).

* ``colocated`` (default): teacher and student share every device; the
  teacher's forward runs inside the student's jitted step. Right for a
  teacher that fits next to the student.
* ``sharded`` (``model > 1``): as ``colocated``, but the teacher's weights are
  split over a ``model`` (tensor-parallel) mesh axis of ``model`` devices by logical-axis
  rules (:mod:`kdjax.parallel.partition`), so a teacher larger than one
  device's memory runs. The student stays data-parallel over every device.
* ``split`` (``teacher_devices > 0``): the devices are partitioned into a teacher sub-mesh
  (``teacher_devices`` of them, split over ``model`` inside it when > 1) and
  a student sub-mesh (the rest). The teacher's forward for batch t+1 is
  dispatched while the student updates on batch t (one batch in flight), and
  its outputs move device to device into the student's step, which takes
  them as an input.

``teacher_memory="pinned_host"`` keeps the teacher's weights in pinned host
memory and brings them onto the device for each forward (where the backend
has that memory kind).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec

from kdjax.errors import ConfigError
from kdjax.parallel import sharding
from kdjax.parallel.partition import teacher_specs

MEMORIES = ("device", "pinned_host")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Placement:
  """Teacher placement; every field at its default is the colocated teacher.

  Attributes:
    teacher_devices: 0: the teacher shares the student's devices; N > 0:
      ``split`` — the teacher gets a sub-mesh of N devices (taken equally from
      every process), the student the others.
    model: devices the teacher's weights are split over (the ``model`` mesh
      axis, tensor parallelism); > 1 without ``teacher_devices`` is
      ``sharded``, with it the teacher's sub-mesh is split that way.
    teacher_memory: ``device`` or ``pinned_host`` (weights stay in pinned host
      memory and come onto the device for each forward).
    teacher_dtype: the dtype a frozen teacher's floating parameters are held
      in, cast once before they are placed: ``auto`` (default) holds them in
      the teacher's compute dtype (``compute_dtype`` of kdjax's zoo and
      Hugging Face models, e.g. ``dtype=jnp.bfloat16``) when that is
      narrower, and leaves other models' as they are; ``bfloat16`` (or
      ``float16``, ``float32``) casts any teacher's, a user's model included.
  """

  teacher_devices: int = 0
  model: int = 1
  teacher_memory: Literal["device", "pinned_host"] = "device"
  teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

  def __post_init__(self):
    checks = (
      (self.teacher_devices >= 0, "teacher_devices", "≥ 0 (0: the teacher shares the student's devices)"),
      (self.model >= 1, "model", "≥ 1"),
      (self.teacher_memory in MEMORIES, "teacher_memory", f"one of {MEMORIES}"),
      (self.teacher_dtype in TEACHER_DTYPES, "teacher_dtype", f"one of {TEACHER_DTYPES}"),
      (
        not self.teacher_devices or self.teacher_devices % self.model == 0,
        "model",
        f"a divisor of placement.teacher_devices={self.teacher_devices}",
      ),
    )
    for ok, name, want in checks:
      if not ok:
        raise ConfigError(f"placement.{name} must be {want}, got {getattr(self, name)!r}")

  @property
  def kind(self) -> str:
    """``colocated``, ``sharded`` or ``split``."""
    return "split" if self.teacher_devices else ("sharded" if self.model > 1 else "colocated")

  @property
  def split(self) -> bool:
    return self.kind == "split"


def held_dtype(teacher: Any, placement: Placement) -> Any:
  """The dtype ``teacher``'s floating parameters are held in (None: as they are); see ``Placement.teacher_dtype``."""
  if placement.teacher_dtype != "auto":
    return jnp.dtype(placement.teacher_dtype)
  compute = getattr(teacher, "compute_dtype", None)
  return None if compute is None or jnp.dtype(compute).itemsize >= 4 else jnp.dtype(compute)


def cast_floating(params: Any, dtype: Any) -> Any:
  """``params`` with every floating leaf cast to ``dtype``; other leaves, and all of them for a None ``dtype``,
  as they are."""
  if dtype is None:
    return params

  def one(a):
    if not (hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)) or a.dtype == dtype:
      return a
    if isinstance(a, jax.ShapeDtypeStruct):  # an abstract model (Distiller.check)
      return jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
    return a.astype(dtype)

  return jax.tree.map(one, params)


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
    params=jax.tree.map(named, params, is_leaf=lambda s: isinstance(s, PartitionSpec)),
    model_state=jax.tree.map(lambda _: named(PartitionSpec()), state.model_state),
  )


def on_device(tree: Any, shardings: Any) -> Any:
  """Inside jit: bring leaves held in host memory onto the device (a no-op for device memory)."""

  def one(x, s):
    if s.memory_kind in (None, "device"):
      return x
    return jax.device_put(x, s.with_memory_kind("device"))

  return jax.tree.map(one, tree, shardings)


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


def placement_meshes(mesh: Mesh | None, placement: Placement) -> tuple[Mesh, Mesh]:
  """``(student mesh, teacher mesh)`` for ``placement`` (the same mesh unless it is ``split``); a teacher
  loaded onto the teacher mesh (``from_pretrained(..., mesh=)``) is placed without moving."""
  if placement.kind == "sharded":
    mesh = mesh if mesh is not None else sharding.make_mesh(model=placement.model)
    if mesh.shape.get("model", 1) != placement.model:
      raise ConfigError(
        f"placement.model={placement.model} but the mesh's 'model' axis has "
        f"{mesh.shape.get('model', 1)} devices; build it with kdjax.make_mesh(model={placement.model})"
      )
    return mesh, mesh
  mesh = mesh if mesh is not None else sharding.make_mesh()
  if not placement.split:
    return mesh, mesh
  teacher, student = split_devices(list(mesh.devices.flat), placement.teacher_devices)
  fsdp = mesh.shape.get("fsdp", 1)
  if len(student) % fsdp:
    raise ConfigError(
      f"placement.teacher_devices={placement.teacher_devices} leaves {len(student)} student devices, "
      f"which run.mesh_fsdp={fsdp} does not divide"
    )
  return (
    sharding.make_mesh(0, fsdp, devices=student),
    sharding.make_mesh(0, 1, devices=teacher, model=placement.model),
  )


def check_split_rows(rows: int, name: str, student_mesh: Mesh, teacher_mesh: Mesh, placement: Placement) -> None:
  """A global batch of ``rows`` must split over the teacher's data-parallel devices and the student's."""
  teacher = teacher_mesh.size // teacher_mesh.shape.get("model", 1)
  total = teacher_mesh.size + student_mesh.size
  for n, whose in ((teacher, "teacher"), (student_mesh.size, "student")):
    if rows % n:
      raise ConfigError(
        f"{name}={rows} does not split over the {whose}'s {n} data-parallel devices (placement."
        f"teacher_devices={placement.teacher_devices} of {total}); "
        f"use a multiple of {n} or another placement.teacher_devices"
      )
