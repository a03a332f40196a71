"""A teacher on devices of its own, running one batch ahead of the student (``split`` placement).

The teacher's forward on batch t+1 is dispatched on its sub-mesh while the
student trains on batch t; its outputs move device to device onto the
student's sub-mesh and enter the student's step as part of the batch
(``batch["teacher_outputs"]``), so the step stays a pure function.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import jax

from kdjax import batch as batch_keys
from kdjax.engine.state import TeacherState
from kdjax.engine.teachers import Frozen
from kdjax.models.base import ModelOutput
from kdjax.parallel import placement as placement_lib
from kdjax.parallel import sharding


class RunAhead:
  """The split teacher's forward, compiled on its sub-mesh, and the queue of outputs dispatched ahead.

  Args:
    source: the frozen teachers (built: their static halves known).
    state: their parameters, placed on ``teacher_mesh``.
    teacher_mesh, student_mesh: the two sub-meshes.
    check_rows: raises when a global batch of that many rows does not split over both.
    compiler_options: XLA options for the teacher's executable.
  """

  def __init__(
    self,
    source: Frozen,
    state: TeacherState,
    teacher_mesh: jax.sharding.Mesh,
    student_mesh: jax.sharding.Mesh,
    check_rows: Callable[[int, str], None],
    compiler_options: dict,
  ):
    self.source, self.state = source, state
    self.teacher_mesh, self.student_mesh = teacher_mesh, student_mesh
    self.check_rows, self.compiler_options = check_rows, compiler_options
    self._forward: dict[bool, Callable] = {}
    self._ahead: collections.deque = collections.deque()  # (batch, teacher outputs) dispatched ahead

  def _compiled(self, features: bool) -> Callable:
    """``(teacher_state, x) -> tuple of ModelOutput`` (features only when asked: they cross sub-meshes)."""
    if features not in self._forward:
      rows = sharding.batch_sharding(self.teacher_mesh)

      def forward(teacher, x):
        return tuple(ModelOutput(o.logits, o.features if features else {}) for o in self.source.run(teacher, x))

      shardings = jax.tree.map(lambda a: a.sharding, self.state)
      self._forward[features] = jax.jit(
        forward, in_shardings=(shardings, rows), out_shardings=rows, compiler_options=self.compiler_options
      )
    return self._forward[features]

  def outputs(self, batch: Mapping[str, Any], features: bool) -> tuple[ModelOutput, ...]:
    """The teachers' outputs on ``batch`` (this process's rows, or global arrays), computed on the teacher's
    sub-mesh and moved device to device onto the student's; asynchronous like any JAX call."""
    x = batch_keys.teacher_inputs(batch)
    self.check_rows(x.shape[0] * (1 if isinstance(x, jax.Array) else jax.process_count()), "batch rows")
    rows = sharding.batch_sharding(self.teacher_mesh)
    if isinstance(x, jax.Array):
      x = placement_lib.move_rows(x, rows)
    else:
      x = sharding.shard_batch({"x": x}, self.teacher_mesh)["x"]
    outs = self._compiled(features)(self.state, x)
    return placement_lib.move_tree(outs, sharding.batch_sharding(self.student_mesh))

  def push(self, batch: Mapping[str, Any], outputs: tuple[ModelOutput, ...]) -> None:
    """Remember the outputs dispatched ahead for ``batch`` (:meth:`take` on the same batch object returns them)."""
    self._ahead.append((batch, outputs))

  def take(self, batch: Mapping[str, Any]) -> tuple[ModelOutput, ...] | None:
    """The outputs dispatched ahead for ``batch`` (older ones are dropped), or None."""
    while self._ahead:
      b, outs = self._ahead.popleft()
      if b is batch:
        return outs
    return None
