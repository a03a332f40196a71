"""Where the frozen teacher lives and runs, relative to the student (:class:`Placement`).

* ``colocated`` (default): teacher and student share every device; the
  teacher's forward runs inside the student's jitted step. Right for a
  teacher that fits next to the student.
* ``sharded`` (``model > 1``): as ``colocated``, but the teacher's weights are
  split over a ``model`` (tensor-parallel) mesh axis of ``model`` devices by logical-axis
  rules (:mod:`kdjax.engine.teacher_placement`), so a teacher larger than one
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
from typing import Literal

from kdjax.errors import ConfigError

MEMORIES = ("device", "pinned_host")


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
  """

  teacher_devices: int = 0
  model: int = 1
  teacher_memory: Literal["device", "pinned_host"] = "device"

  def __post_init__(self):
    checks = (
      (self.teacher_devices >= 0, "teacher_devices", "≥ 0 (0: the teacher shares the student's devices)"),
      (self.model >= 1, "model", "≥ 1"),
      (self.teacher_memory in MEMORIES, "teacher_memory", f"one of {MEMORIES}"),
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
